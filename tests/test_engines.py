"""The engine seam: two engines that cut the work differently write the same version, byte for byte.

The local engine spreads 8,192-record batches and runs of files over worker processes; the serial
engine reads one file per task and cuts 3,000-record batches in this process. What a Ray engine
must match is exactly this: the runner, the stages and the version do not depend on the engine.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pyarrow as pa
import pytest

from curate.decisions import Decisions
from curate.engines import LocalEngine, SerialEngine
from curate.pipeline import run_recipe
from curate.recipe import recipe_from_dict
from curate.records import make_record, message, to_table
from curate.stages.base import STAGES, Stage, option
from tests.same_version import assert_same_version, raw_recipe


def test_local_workers_and_the_serial_engine_write_the_same_version(shared_data: Path, tmp_path: Path):
    recipe = raw_recipe(
        shared_data,
        [
            {"normalize": {"system_prompt": "You are a helpful assistant."}},
            {"filter": {"min_chars": 10}},
            {"dedup": {"minhash": {"threshold": 0.8}}},
            {"decontaminate": {"methods": ["exact", "ngram", "minhash"]}},
        ],
    )
    # raw/ is below the sizes where workers pay off: send every task to them anyway
    local = run_recipe(recipe, tmp_path / "local", engine=LocalEngine(workers=2, min_rows=0, min_bytes=0))
    serial = run_recipe(recipe, tmp_path / "serial", engine=SerialEngine(batch_rows=3000))
    assert (local.run["engine"], serial.run["engine"]) == ("local", "serial")
    assert_same_version(local, serial)
    stages = {s["name"]: s["dropped"] for s in local.manifest["stages"]}
    assert stages["dedup"]["exact_duplicate"] > 4000 and stages["dedup"]["near_duplicate"] > 100
    assert stages["decontaminate"]["eval_overlap"] >= 252  # all of self-instruct's user-oriented set


@dataclass
class EchoConfig:
    suffix: str = option(" Again.", help="Text appended to the answer of each copy.")


class EchoStage(Stage):
    """Adds a synthetic copy of every record on an even input row, and drops those on rows divisible by 7."""

    name = "echo"
    Config = EchoConfig

    def process(self, table: pa.Table) -> Decisions:
        decisions = Decisions(table.num_rows)
        added = []
        for i, record in enumerate(table.to_pylist()):
            row = record["source"]["row"]
            if row % 7 == 0:
                decisions.drop(i, "every_seventh", {"row": row})
            elif row % 2 == 0:
                turns = [message(m["role"], m["content"]) for m in record["messages"]]
                turns[-1] = message(turns[-1]["role"], (turns[-1]["content"] or "") + self.config.suffix)
                source = {"name": "echo", "path": None, "row": None, "format": "synthetic"}
                added.append(make_record(turns, source, origin="synthetic", parent_id=record["id"]))
        if added:
            decisions.add(to_table(added))
        return decisions


@pytest.fixture
def echo():
    STAGES["echo"] = EchoStage
    yield
    del STAGES["echo"]


def test_records_a_stage_adds_come_after_the_kept_ones_on_every_engine(
    echo, shared_data: Path, tmp_path: Path
):
    raw = {
        "name": "echo",
        "inputs": [{"path": "raw/code_alpaca_2k.json.gz"}, {"path": "raw/gpteacher_codegen.json.gz"}],
        "stages": [{"echo": {}}],
    }
    recipe = recipe_from_dict(raw, base_dir=shared_data)
    local = run_recipe(recipe, tmp_path / "local", engine=LocalEngine(workers=1))
    serial = run_recipe(recipe, tmp_path / "serial", engine=SerialEngine(batch_rows=777))
    assert_same_version(local, serial)
    c = local.manifest["counts"]
    rows = pl.read_parquet(local.folder / "data.parquet")
    sources = pl.concat(
        [pl.read_parquet(local.folder / "data.parquet"), pl.read_parquet(local.folder / "dropped.parquet")],
        how="diagonal",
    ).filter(pl.col("origin") == "real")
    even = sources.filter(pl.col("source").struct.field("row") % 2 == 0)
    expected_added = even.filter(pl.col("source").struct.field("row") % 7 != 0).height
    assert c["synthetic"] == expected_added > 1000
    assert c["input"] == c["kept"] + c["dropped"] + c["quarantined"] - c["synthetic"]
    assert local.manifest["stages"][0]["added"] == expected_added
    origins = rows["origin"].to_list()
    first_synthetic = origins.index("synthetic")
    assert set(origins[:first_synthetic]) == {"real"} and set(origins[first_synthetic:]) == {"synthetic"}
    synthetic = rows.slice(first_synthetic)
    real_ids = set(rows.filter(pl.col("origin") == "real")["id"])
    assert set(synthetic["parent_id"]) <= real_ids
    last = synthetic["messages"][0][-1]["content"]
    assert last.endswith(" Again.")
    edits = pl.read_parquet(local.folder / "edits.parquet")
    assert edits.filter(pl.col("change") == "added (synthetic)").height == expected_added
    line = json.loads((local.folder / "train.jsonl").read_text().splitlines()[-1])
    assert line["messages"][-1]["content"].endswith(" Again.")
