"""The stage cache: keys built by the runner from everything a stage can read, LRU pruning, and the
shared cache of LLM answers and embeddings that no stage cache owns."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import polars as pl
import pytest
import yaml

from curate import cache as cache_mod
from curate.cache import StageCache, module_fingerprint, parse_size, shared_cache_dir
from curate.pipeline import run_recipe
from curate.recipe import load_recipe
from curate.records import make_record, message, to_table
from tests.test_pipeline import write_inputs

STAGES = [
    {"normalize": {"system_prompt": "Be brief."}},
    {"filter": {}},
    {"dedup": {"reference": "ref.parquet", "minhash": True}},
    {"decontaminate": {"methods": ["exact", "ngram"]}},
]


def write(project: Path, seed: int = 0, stages: list | None = None) -> Path:
    recipe = {
        "name": "keys",
        "seed": seed,
        "inputs": [{"path": "data/alpaca.jsonl"}, {"path": "data/chats.jsonl"}],
        "eval_sets": [{"name": "ev", "path": "eval.jsonl"}],
        "stages": stages or STAGES,
    }
    path = project / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def write_reference(folder: Path, text: str) -> None:
    """A one-record dataset version file, for dedup's `reference`."""
    source = {"name": "ref", "path": "ref.jsonl", "row": 0, "format": "messages"}
    record = make_record([message("user", text), message("assistant", "Yes.")], source)
    pl.from_arrow(to_table([record])).write_parquet(folder / "ref.parquet")


@pytest.fixture
def project(tmp_path: Path) -> Path:
    write_inputs(tmp_path / "data")
    (tmp_path / "eval.jsonl").write_text(json.dumps({"question": "What is the capital of Peru?"}) + "\n")
    write_reference(tmp_path, "Unrelated question here?")
    write(tmp_path)
    return tmp_path


def computed(project: Path) -> list[str]:
    """Run the recipe; the stages this run computed (the rest came from the cache)."""
    result = run_recipe(load_recipe(project / "recipe.yaml"), project / "out")
    return [s["name"] for s in result.run["stages"] if not s["cached"]]


ALL = ["normalize", "filter", "dedup", "decontaminate"]


def test_an_unchanged_recipe_computes_nothing(project: Path):
    assert computed(project) == ALL
    assert computed(project) == []


def test_the_seed_is_in_every_stage_key(project: Path):
    computed(project)
    write(project, seed=1)
    assert computed(project) == ALL


def test_the_eval_sets_reach_only_the_stages_that_use_them(project: Path):
    computed(project)
    (project / "eval.jsonl").write_text(json.dumps({"question": "Name a primary colour."}) + "\n")
    assert computed(project) == ["decontaminate"]


def test_a_declared_file_is_in_the_key(project: Path):
    computed(project)
    write_reference(project, "Another unrelated question?")
    assert computed(project) == ["dedup", "decontaminate"]


def test_an_option_is_in_the_key(project: Path):
    computed(project)
    write(project, stages=[*STAGES[:1], {"filter": {"min_chars": 5}}, *STAGES[2:]])
    assert computed(project) == ["filter", "dedup", "decontaminate"]


def _edited(monkeypatch, relative: str) -> None:
    """Make the runner see `relative` (a module file of curate) as edited."""
    target = (Path(cache_mod.__file__).parent / relative).resolve()
    original = cache_mod._read_source

    def read(path: Path) -> bytes:
        data = original(path)
        return data + b"\n# edited\n" if Path(path).resolve() == target else data

    monkeypatch.setattr(cache_mod, "_read_source", read)
    module_fingerprint.cache_clear()


@pytest.mark.parametrize(
    ("module", "recomputed"),
    [
        ("stages/filter.py", ["filter", "dedup", "decontaminate"]),  # the stage's own code
        ("text/clean.py", ALL),  # imported by normalize (and the readers: ingest too)
        ("text/lsh.py", ["dedup", "decontaminate"]),  # imported by dedup only
        ("decisions.py", ALL),  # how every stage's decisions are applied
        ("cli.py", []),  # imported by no stage
        ("train/trainer.py", []),
    ],
)
def test_code_in_the_key_is_the_stage_and_what_it_imports(project: Path, monkeypatch, module, recomputed):
    computed(project)
    _edited(monkeypatch, module)
    try:
        assert computed(project) == recomputed
    finally:
        monkeypatch.undo()
        module_fingerprint.cache_clear()


def test_a_fingerprint_follows_imports_inside_functions():
    files = {
        p.relative_to(Path(cache_mod.__file__).parent).as_posix()
        for p in cache_mod._closure("curate.stages.normalize")
    }
    assert {"stages/normalize.py", "stages/base.py", "text/clean.py", "records.py"} <= files
    assert "templates.py" in files  # imported inside NormalizeStage.setup
    assert not files & {"cli.py", "stages/dedup.py", "stages/filter.py", "pipeline.py"}


def _entry(store: StageCache, key: str, size: int, used: float) -> None:
    folder = store.entries_dir / key
    folder.mkdir(parents=True)
    (folder / "part.parquet").write_bytes(b"x" * size)
    (folder / "done.json").write_text(json.dumps({"result": {"name": key[:1]}, "run": "r", "bytes": size}))
    os.utime(folder / "done.json", (used, used))


def test_prune_keeps_the_newest_entries_under_the_limit(tmp_path: Path):
    store = StageCache(tmp_path / ".cache", max_bytes=2500)
    now = time.time()
    for i, key in enumerate(["a-old", "b-mid", "c-new", "d-newest"]):
        _entry(store, key, 1000, now - 100 + i * 10)
    crashed = store.entries_dir / ".tmp-zzz-999999999"
    crashed.mkdir()
    done = store.prune()
    assert sorted(e["key"] for e in store.entries()) == ["c-new", "d-newest"]
    assert (done["removed"], done["freed_bytes"], done["bytes"]) == (2, 2000, 2000)
    assert not crashed.exists()  # a write whose process is gone is cleared away
    # an entry the current run uses stays, whatever its age
    _entry(store, "e-old", 1000, now - 1000)
    store.prune(max_bytes=1000, protect=frozenset({"e-old"}))
    assert [e["key"] for e in store.entries()] == ["e-old"]


def test_a_cache_hit_counts_as_a_use(tmp_path: Path):
    store = StageCache(tmp_path / ".cache", max_bytes=2000)
    now = time.time()
    _entry(store, "a-old", 1000, now - 100)
    _entry(store, "b-new", 1000, now - 50)
    assert store.get("a-old") is not None  # used now
    _entry(store, "c", 1000, now - 10)
    store.prune()
    assert sorted(e["key"] for e in store.entries()) == ["a-old", "c"]


def test_runs_prune_to_the_recipes_limit_and_keep_their_own_entries(project: Path):
    write(project, stages=STAGES[:2])
    recipe = yaml.safe_load((project / "recipe.yaml").read_text())
    (project / "recipe.yaml").write_text(yaml.safe_dump({**recipe, "cache": {"max_size": "1KB"}}))
    first = run_recipe(load_recipe(project / "recipe.yaml"), project / "out")
    kept = {e["key"] for e in StageCache(project / "out" / ".cache").entries()}
    assert len(kept) == 3  # ingest, normalize, filter: over the limit, but this run's own
    (project / "recipe.yaml").write_text(yaml.safe_dump({**recipe, "seed": 5, "cache": {"max_size": "1KB"}}))
    run_recipe(load_recipe(project / "recipe.yaml"), project / "out")
    now = {e["key"] for e in StageCache(project / "out" / ".cache").entries()}
    assert len(now) == 3 and len(now & kept) == 1  # the shared ingest entry stays; the old stages went
    assert (first.folder / "data.parquet").is_file()  # versions are never pruned


def test_the_shared_cache_is_per_user_and_configurable(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("CURATE_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert shared_cache_dir() == tmp_path / "xdg" / "curate"
    monkeypatch.setenv("CURATE_CACHE_DIR", str(tmp_path / "env"))
    assert shared_cache_dir() == tmp_path / "env"
    assert shared_cache_dir(str(tmp_path / "recipe")) == tmp_path / "recipe"


def test_embeddings_land_in_the_shared_cache_not_the_stage_cache(project: Path, tmp_path: Path):
    shared = tmp_path / "shared"
    write(project, stages=[{"decontaminate": {"methods": ["embedding"]}}])
    recipe = yaml.safe_load((project / "recipe.yaml").read_text())
    (project / "recipe.yaml").write_text(yaml.safe_dump({**recipe, "cache": {"shared_dir": str(shared)}}))
    run_recipe(load_recipe(project / "recipe.yaml"), project / "out")
    assert list((shared / "embeddings").glob("*.sqlite"))
    assert not list((project / "out").rglob("*.sqlite"))
    StageCache(project / "out" / ".cache").prune(max_bytes=0)
    assert list((shared / "embeddings").glob("*.sqlite"))  # pruning the stage cache leaves it


def test_sizes_parse():
    assert parse_size("20GB") == 20 << 30
    assert parse_size("1.5 mb") == int(1.5 * (1 << 20))
    assert parse_size("512") == 512 == parse_size(512)
