"""Every file of ../shared/data/raw through the runner: no unknown formats, exact counts, 5 bad lines."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import pytest

from curate.engines import LocalEngine
from curate.pipeline import run_recipe
from curate.recipe import recipe_from_dict


def manifest_counts(shared_data: Path) -> dict[str, int]:
    with open(shared_data / "MANIFEST.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    return {r["local_path"]: int(r["records"]) for r in rows if r["local_path"].startswith("raw/")}


def raw_recipe(shared_data: Path):
    raw = shared_data / "raw"
    return recipe_from_dict(
        {
            "name": "all-raw",
            "inputs": [{"path": str(p)} for p in sorted(raw.iterdir())],
            "stages": [{"normalize": {}}, {"filter": {"drop_refusals": False, "max_tokens": 1_000_000}}],
        },
        base_dir=shared_data,
    )


@pytest.fixture(scope="module")
def raw_version(shared_data: Path, tmp_path_factory):
    # raw/ is below the sizes where workers pay off: make it go through them anyway
    engine = LocalEngine(workers=2, min_rows=0, min_bytes=0)
    result = run_recipe(raw_recipe(shared_data), tmp_path_factory.mktemp("raw") / "out", engine=engine)
    return result.folder, result.manifest


def test_every_raw_file_converts_with_exact_counts(raw_version, shared_data: Path):
    _, manifest = raw_version
    expected = manifest_counts(shared_data)
    got: Counter = Counter()
    for entry in manifest["inputs"]:
        key = (
            "raw/t0_train_50k/*.jsonl.gz" if entry["path"].startswith("raw/t0_train_50k/") else entry["path"]
        )
        got[key] += entry["records"] + entry["quarantined"]
    assert dict(got) == expected
    assert sum(1 for e in manifest["inputs"] if e["path"].startswith("raw/t0_train_50k/")) == 294
    assert manifest["counts"]["input"] == sum(expected.values()) == 85_674


def test_only_the_invalid_json_lines_are_quarantined(raw_version):
    folder, manifest = raw_version
    assert manifest["counts"]["quarantined"] == 5
    quarantined = {e["path"]: e["quarantined"] for e in manifest["inputs"] if e["quarantined"]}
    assert quarantined == {
        "raw/instructionwild_v2_user_2.jsonl.gz": 2,
        "raw/instructionwild_v2_user_3.jsonl.gz": 3,
    }
    c = manifest["counts"]
    assert c["input"] == c["kept"] + c["dropped"] + c["quarantined"] - c["synthetic"]
    assert c["kept"] + c["dropped"] == 85_669


def test_one_worker_gives_byte_identical_output(raw_version, shared_data: Path, tmp_path):
    parallel_folder, parallel = raw_version
    one = run_recipe(raw_recipe(shared_data), tmp_path / "out", workers=1)
    serial_folder, serial = one.folder, one.manifest
    assert serial["version"] == parallel["version"]
    for name in ("data.parquet", "dropped.parquet", "edits.parquet", "train.jsonl", "quarantine.jsonl"):
        assert (serial_folder / name).read_bytes() == (parallel_folder / name).read_bytes(), name
