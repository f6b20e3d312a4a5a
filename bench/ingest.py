"""Ingest speed: read + detect + convert (+ normalize) of all of ../shared/data/raw, against json.loads.

The reference is the cheapest honest reading of the same files: a plain loop of `json.loads` per
JSONL line (or one `json.load` per JSON array), through the same gzip decompression. The ratio
records/s(curate) / records/s(reference) says what conversion costs on top of parsing.

    python bench/ingest.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import pyarrow as pa

from curate.dataset import BATCH_ROWS
from curate.formats import InputSpec, input_files, read_input
from curate.formats.readers import iter_file
from curate.records import record_ids

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def reference(files: list[Path]) -> int:
    """Records parsed by a plain json.loads loop (invalid lines skipped, as a reader must)."""
    n = 0
    for path in files:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            if path.name.endswith(".json.gz"):
                n += len(json.load(f))
                continue
            for line in f:
                try:
                    json.loads(line)
                except ValueError:
                    continue
                n += 1
    return n


def read_all(spec: InputSpec) -> pa.Table:
    """Canonical records (one Arrow table, ids included) of every file, as an ingest task reads them."""
    return pa.concat_tables(batch.table for batch in read_input(spec, DATA))


def ingest(spec: InputSpec, normalize=None) -> int:
    """Canonical records of every file as the runner reads them, then normalized."""
    table = read_all(spec)
    return table.num_rows if normalize is None else normalized(table, normalize)


def normalized(table: pa.Table, normalize) -> int:
    """The normalize stage as an engine runs it: on batches of BATCH_ROWS rows, decisions applied."""
    from curate.decisions import apply_decisions

    kept = 0
    for o in range(0, table.num_rows, BATCH_ROWS):
        batch = table.slice(o, BATCH_ROWS)
        kept += apply_decisions("normalize", batch, normalize.process(batch)).kept.num_rows
    return kept


def normalize_stage():
    from curate.stages import STAGES, StageContext
    from curate.stages.base import build_config

    cls = STAGES["normalize"]
    ctx = StageContext(base_dir=DATA)
    stage = cls(build_config(cls.Config, {}, "normalize"), ctx)
    stage.setup()
    return stage


def run_path() -> int:
    """`curate run` itself with one normalize stage: hashing, ingest, the stage, the version files."""
    from curate.pipeline import run_recipe
    from curate.recipe import recipe_from_dict

    recipe = recipe_from_dict({"inputs": [{"path": "raw"}], "stages": [{"normalize": {}}]}, base_dir=DATA)
    with tempfile.TemporaryDirectory() as out:
        return run_recipe(recipe, Path(out)).manifest["counts"]["kept"]


def parse(files: list[Path]) -> int:
    """Rows parsed by curate's readers alone (orjson), before detection and conversion."""
    return sum(1 for path in files for _, value, _ in iter_file(path) if isinstance(value, dict))


def ids(messages) -> int:
    return len(record_ids(messages))


def timed(fn, *args) -> tuple[float, int]:
    t = time.perf_counter()
    n = fn(*args)
    return time.perf_counter() - t, n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs of each; the fastest counts")
    args = parser.parse_args()
    spec = InputSpec(path="raw")
    files = input_files(spec, DATA)
    stage = normalize_stage()
    # The content id and the stage, timed alone on records already read, show what each costs.
    records = read_all(spec)
    messages = records["messages"].combine_chunks()
    runs = {
        "reference": (reference, files),
        "parse": (parse, files),
        "read": (ingest, spec),
        "normalize": (ingest, spec, stage),
        "ids": (ids, messages),
        "stage": (normalized, records, stage),
        "run": (run_path,),
    }
    # Rounds interleave the contenders, so a busy machine slows them alike; the fastest round counts.
    best: dict[str, float] = {}
    counts: dict[str, int] = {}
    for _ in range(args.repeat):
        for key, (fn, *fn_args) in runs.items():
            secs, counts[key] = timed(fn, *fn_args)
            best[key] = min(best.get(key, secs), secs)
    ref_n = counts["reference"]
    assert len(set(counts.values())) == 1, counts
    ref_s, read_s, norm_s = best["reference"], best["read"], best["normalize"]
    mb = sum(p.stat().st_size for p in files) / 1e6
    print(f"files: {len(files)} ({mb:.1f} MB gzipped), records: {ref_n:,}; best of {args.repeat}")
    print(f"python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} cores")
    print(f"{'':40}{'seconds':>9}{'records/s':>12}{'ratio':>8}")
    rows = [
        ("reference: gzip + json.loads loop", ref_s),
        ("curate's readers: gzip + parse (orjson)", best["parse"]),
        ("curate: read + detect + convert", read_s),
        ("curate: read + detect + normalize", norm_s),
        ("  of which the content ids", best["ids"]),
        ("  of which the normalize stage", best["stage"]),
        ("curate run (normalize), end to end", best["run"]),
    ]
    for label, secs in rows:
        print(f"{label:40}{secs:9.2f}{ref_n / secs:12,.0f}{ref_s / secs:8.2f}x")


if __name__ == "__main__":
    main()
