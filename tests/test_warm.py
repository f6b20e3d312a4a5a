"""The kernel warm-up: a second process compiles the later stages' kernels once per install."""

from __future__ import annotations

import json
from pathlib import Path

from curate.pipeline import run_recipe
from curate.recipe import recipe_from_dict
from curate.stages.base import StageContext, build_config
from curate.stages.dedup import DedupStage
from curate.warm import Warmer, tiny_records


def test_a_first_run_warms_the_later_stages_once(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("CURATE_WARM", "1")
    rows = [
        {"instruction": f"Say the number {i} in words.", "input": "", "output": f"It is {i}."}
        for i in range(20)
    ]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    raw = {
        "inputs": [{"path": "a.jsonl"}],
        "stages": [{"normalize": {}}, {"dedup": {"minhash": True}}, {"filter": {}}],
    }
    shared = tmp_path / "shared"
    raw["cache"] = {"shared_dir": str(shared)}
    recipe = recipe_from_dict(raw, tmp_path)
    first = run_recipe(recipe, tmp_path / "out1")
    markers = sorted(p.name for p in (shared / "kernels").iterdir())
    assert len(markers) == 2  # dedup and filter; normalize, the first stage, compiles during ingest
    stages = [
        (i, s.name, s.config, StageContext(base_dir=tmp_path)) for i, s in enumerate(recipe.stages) if i
    ]
    assert Warmer(stages, shared).start() == []  # nothing left to compile: no process
    # numba caches beside the modules, so another install (a fresh clone) warms up again
    with monkeypatch.context() as patched:
        patched.setattr("curate.warm._INSTALLED_AT", str(tmp_path / "another-clone"))
        assert sorted(Warmer(stages, shared).pending) == [1, 2]
    again = run_recipe(recipe, tmp_path / "out2")
    assert again.manifest["version"] == first.manifest["version"]
    assert sorted(p.name for p in (shared / "kernels").iterdir()) == markers


def test_a_warm_up_that_fails_costs_the_run_nothing(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("CURATE_WARM", "1")
    config = build_config(DedupStage.Config, {"minhash": True}, "dedup")
    broken = StageContext(base_dir=tmp_path / "missing", eval_sets=[{"name": "x", "path": "nope"}])
    warmer = Warmer(
        [
            (1, "decontaminate", build_config(DedupStage.Config, {}, "d"), broken),
            (2, "dedup", config, broken),
        ],
        tmp_path,
    )
    assert warmer.start() == ["decontaminate", "dedup"]
    warmer.wait_for(2)
    warmer.finish()
    assert len(list((tmp_path / "kernels").iterdir())) == 2  # both ended; the failed one compiles in the run


def test_the_made_up_records_exercise_dedup():
    records = tiny_records()
    stage = DedupStage(
        build_config(DedupStage.Config, {"minhash": True}, "dedup"), StageContext(base_dir=Path("."))
    )
    applied = stage.apply(records)
    assert [v.reason if v else None for v in applied.verdicts()] == [None, "near_duplicate", None]
