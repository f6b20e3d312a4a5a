"""The demo recipe on the hand-written sample data: every planted problem found (see examples/README.md)."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
import yaml

from curate.pipeline import run_recipe
from curate.recipe import load_recipe, recipe_from_dict
from tests.conftest import REPO

GENERATING = ("evol", "blend")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo recipe without its generation step: the real-data part every test below checks."""
    raw = yaml.safe_load((REPO / "pipelines" / "demo.yaml").read_text())
    raw["stages"] = [s for s in raw["stages"] if next(iter(s)) not in GENERATING]
    recipe = recipe_from_dict(raw, REPO / "pipelines")
    result = run_recipe(recipe, tmp_path_factory.mktemp("demo") / "out")
    return result.folder, result.manifest


def test_demo_version_id_is_stable(demo):
    """The id is a digest of the recipe, the input bytes, every kept and dropped record and the
    version files' format (versions.FILES_FORMAT): a change of behaviour would change it. It was
    v741d460cb039 before the files' format 2, the same before and after the runner moved to
    streaming parts, and the same without the generation step the demo gained later."""
    _, manifest = demo
    assert manifest["version"] == "ve178e7e4fe13"


def test_the_whole_demo_generates_offline_and_blends(tmp_path_factory, demo):
    """The demo as users run it: its evol step runs SmolLM2 on this machine (no key, no network),
    eliminates what failed, keeps lineage, and a second run makes no new generation."""
    out = tmp_path_factory.mktemp("whole-demo") / "out"
    result = run_recipe(load_recipe(REPO / "pipelines" / "demo.yaml"), out)
    m = result.manifest
    real_part = {s["name"]: s for s in demo[1]["stages"]}
    for stage in m["stages"][:4]:  # the stages before generation are those of the checked run
        assert (stage["in"], stage["out"], stage["dropped"]) == tuple(
            real_part[stage["name"]][k] for k in ("in", "out", "dropped")
        )
    evol = m["stages"][4]
    report = evol["report"]
    assert (report["seeds"], report["provider"], report["model"]) == (3, "local", "smollm2")
    assert report["kept"] + sum(report["eliminated"].values()) + report["failed"] == 3 == evol["added"]
    assert (
        evol["llm"]["answered"] + evol["llm"]["cached"] >= 3 and m["llm"]["cost"] is None
    )  # an earlier test may have asked
    made = pl.read_parquet(result.folder / "data.parquet").filter(pl.col("origin") == "synthetic")
    assert made.height == report["kept"] == m["counts"]["kept"] - 270
    kept_real = set(pl.read_parquet(result.folder / "data.parquet")["id"].to_list())
    assert set(made["parent_id"].to_list()) <= kept_real
    c = m["counts"]
    assert c["input"] == c["kept"] + c["dropped"] + c["quarantined"] - c["synthetic"]
    assert m["stages"][5]["report"]["real"] == 270
    again = run_recipe(load_recipe(REPO / "pipelines" / "demo.yaml"), out)
    assert again.manifest["version"] == m["version"] and not again.run["new"]


def dropped_rows(folder: Path) -> dict[tuple[str, int], dict]:
    rows = pl.read_parquet(folder / "dropped.parquet").to_dicts()
    return {(r["source"]["path"].rsplit("/", 1)[-1], r["source"]["row"]): r for r in rows}


def test_demo_counts_per_stage(demo):
    _, manifest = demo
    assert manifest["counts"] == {"input": 305, "kept": 270, "dropped": 34, "quarantined": 1, "synthetic": 0}
    stages = {s["name"]: (s["in"], s["out"], s["dropped"]) for s in manifest["stages"]}
    assert stages == {
        "normalize": (304, 304, {}),
        "filter": (304, 279, {"empty_turn": 2, "prompt_only": 20, "refusal": 3}),
        "dedup": (279, 271, {"exact_duplicate": 4, "near_duplicate": 4}),
        "decontaminate": (271, 270, {"eval_overlap": 1}),
    }
    assert manifest["eval_overlap"] == {"checked": True, "exact_copies": 0, "allowed": False}


def test_every_planted_item_is_dropped_for_its_reason(demo):
    folder, _ = demo
    dropped = dropped_rows(folder)
    expected = {
        ("chats_sharegpt.jsonl", 45): "exact_duplicate",
        ("openai_messages.jsonl.gz", 40): "exact_duplicate",
        ("prompt_completion.csv", 36): "exact_duplicate",
        ("alpaca.json", 88): "exact_duplicate",
        ("alpaca.json", 77): "near_duplicate",
        ("openai_messages.jsonl.gz", 50): "near_duplicate",
        ("prompt_completion.csv", 66): "near_duplicate",
        ("prompt_completion.csv", 88): "near_duplicate",
        ("alpaca.json", 40): "refusal",
        ("chats_sharegpt.jsonl", 27): "refusal",
        ("openai_messages.jsonl.gz", 25): "refusal",
        ("alpaca.json", 60): "empty_turn",
        ("openai_messages.jsonl.gz", 33): "empty_turn",
        ("prompt_completion.csv", 48): "eval_overlap",
    }
    for where, reason in expected.items():
        assert dropped[where]["reason"] == reason, where
    assert sum(1 for r in dropped.values() if r["reason"] == "prompt_only") == 20
    contaminated = json.loads(dropped[("prompt_completion.csv", 48)]["evidence"])
    assert contaminated["eval_set"] == "demo_eval" and contaminated["eval_id"] == "demo-eval-007"


def test_duplicates_point_at_the_kept_original(demo):
    folder, _ = demo
    dropped = dropped_rows(folder)
    kept = pl.read_parquet(folder / "data.parquet")
    kept_at = {(r["source"]["path"].rsplit("/", 1)[-1], r["source"]["row"]): r["id"] for r in kept.to_dicts()}
    pairs = {
        ("chats_sharegpt.jsonl", 45): ("alpaca.json", 10),
        ("alpaca.json", 77): ("alpaca.json", 14),
        ("openai_messages.jsonl.gz", 50): ("chats_sharegpt.jsonl", 20),
        ("prompt_completion.csv", 88): ("prompt_completion.csv", 7),
    }
    for copy, original in pairs.items():
        evidence = json.loads(dropped[copy]["evidence"])
        assert evidence["duplicate_of"] == kept_at[original], copy
    near = json.loads(dropped[("alpaca.json", 77)]["evidence"])
    assert 0.9 < near["jaccard"] <= 1.0


def test_quarantine_and_train_file(demo):
    folder, _ = demo
    (entry,) = [json.loads(x) for x in (folder / "quarantine.jsonl").read_text().splitlines()]
    assert entry["file"].endswith("chats_sharegpt.jsonl") and entry["line"] == 38
    lines = (folder / "train.jsonl").read_text().splitlines()
    assert len(lines) == 270
    first = json.loads(lines[0])
    assert first["tools"] is None  # every line has the same keys: messages and tools
    assert first["messages"][0] == {
        "role": "system",
        "content": "You are a helpful assistant.",
        "tool_calls": None,
        "name": None,
    }
    assert all(json.loads(x)["messages"][-1]["role"] == "assistant" for x in lines)
    per_file = pl.read_parquet(folder / "data.parquet")["source"].struct.field("path").value_counts()
    counts = {p.rsplit("/", 1)[-1]: n for p, n in per_file.rows()}
    assert counts == {
        "alpaca.json": 91,
        "chats_sharegpt.jsonl": 57,
        "openai_messages.jsonl.gz": 56,
        "prompt_completion.csv": 46,
        "preferences.jsonl": 20,
    }
    assert pl.read_parquet(folder / "data.parquet")["rejected"].drop_nulls().len() == 20
