"""`curate freeze`: N records of a version, stratified by source and seeded, into a frozen eval file
with its hash; the next run decontaminates against it and drops exactly those records."""

from __future__ import annotations

import hashlib
import json
from collections import Counter

import polars as pl
import pytest
import yaml
from click.testing import CliRunner

from curate.cli import main
from curate.errors import CurateError
from curate.freeze import freeze_records, shares, write_frozen
from curate.pipeline import run_recipe
from curate.recipe import recipe_from_dict
from tests.conftest import REPO


def test_shares_are_proportional_and_exact():
    assert shares({"a": 50, "b": 30, "c": 20}, 10) == {"a": 5, "b": 3, "c": 2}
    assert shares({"a": 7, "b": 7, "c": 7}, 10) == {"a": 4, "b": 3, "c": 3}
    assert shares({"a": 1, "b": 99}, 50) == {"a": 1, "b": 49}  # 0.5 rounds up by remainder, capped
    assert shares({"a": 3, "b": 2}, 9) == {"a": 3, "b": 2}


@pytest.fixture(scope="module")
def demo_raw() -> dict:
    raw = yaml.safe_load((REPO / "pipelines" / "demo.yaml").read_text())
    raw["stages"] = [s for s in raw["stages"] if next(iter(s)) not in ("evol", "blend")]
    return raw


def test_freeze_then_the_next_run_drops_exactly_the_frozen_records(tmp_path, demo_raw):
    first = run_recipe(recipe_from_dict(demo_raw, REPO / "pipelines"), tmp_path / "out")
    frozen = tmp_path / "frozen.jsonl"
    shown = CliRunner().invoke(
        main,
        ["freeze", str(first.folder), "--out", str(frozen), "-n", "27", "--json"],
        catch_exceptions=False,
    )
    sidecar = json.loads(shown.output)
    items = [json.loads(line) for line in frozen.read_text().splitlines()]
    kept = pl.read_parquet(first.folder / "data.parquet")
    sizes = Counter(s["name"] for s in kept["source"].to_list())
    assert len(items) == sidecar["n"] == 27
    assert sidecar["per_source"] == {k: v for k, v in shares(dict(sizes), 27).items() if v}
    assert Counter(i["source"]["name"] for i in items) == Counter(sidecar["per_source"])
    assert sidecar["sha256"] == hashlib.sha256(frozen.read_bytes()).hexdigest()
    assert sidecar["version"] == first.manifest["version"]
    by_id = {r["id"]: r for r in kept.to_dicts()}
    for item in items:
        record = by_id[item["id"]]
        assert item["question"] == next(m["content"] for m in record["messages"] if m["role"] == "user")
        assert item["messages"][-1] == {"role": "assistant", "content": item["answer"]}

    # the same version, N and seed freeze the same records; another seed others; other content is refused
    again, _ = freeze_records(first.folder, 27, 0)
    assert [i["id"] for i in again] == [i["id"] for i in items]
    write_frozen(frozen, again, {})  # identical: fine, the first sidecar stands
    assert json.loads((tmp_path / "frozen.jsonl.json").read_text())["sha256"] == sidecar["sha256"]
    other, _ = freeze_records(first.folder, 27, 1)
    assert {i["id"] for i in other} != {i["id"] for i in items}
    with pytest.raises(CurateError, match="frozen eval set already"):
        write_frozen(frozen, other, {})

    # the next run, with the frozen file among its eval sets, drops exactly those records
    demo_raw = {**demo_raw, "eval_sets": [*demo_raw["eval_sets"]]}
    demo_raw["eval_sets"] = [
        {**e, "path": str((REPO / "pipelines" / e["path"]).resolve())} for e in demo_raw["eval_sets"]
    ]
    demo_raw["inputs"] = [
        {**e, "path": str((REPO / "pipelines" / e["path"]).resolve())} for e in demo_raw["inputs"]
    ]
    demo_raw["eval_sets"].append(
        {
            "name": "frozen",
            "path": str(frozen),
            "fields": {"question": "question", "answer": "answer", "id": "id"},
        }
    )
    second = run_recipe(recipe_from_dict(demo_raw, tmp_path), tmp_path / "out2")
    dropped = pl.read_parquet(second.folder / "dropped.parquet").filter(pl.col("stage") == "decontaminate")
    evidence = [json.loads(e) for e in dropped["evidence"].to_list()]
    frozen_drops = {
        r for r, e in zip(dropped["id"].to_list(), evidence, strict=True) if e["eval_set"] == "frozen"
    }
    assert frozen_drops == {i["id"] for i in items}
    assert second.manifest["counts"]["kept"] == first.manifest["counts"]["kept"] - 27
