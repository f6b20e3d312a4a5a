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
import platform
import tempfile
import time
from pathlib import Path

import pyarrow as pa

from curate.engines.local import ROW_CHUNK
from curate.formats import InputSpec, input_files, read_input
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


def ingest(spec: InputSpec, normalize=None) -> int:
    """Canonical records (Arrow tables, ids included) of every file, then normalized as the runner
    does it: in slices of ROW_CHUNK rows of the whole table."""
    table = pa.concat_tables(batch.table for batch in read_input(spec, DATA))
    if normalize is None:
        return table.num_rows
    return sum(
        normalize.process_table(table.slice(o, ROW_CHUNK)).kept.num_rows
        for o in range(0, table.num_rows, ROW_CHUNK)
    )


def normalize_stage():
    from curate.stages import STAGES, StageContext
    from curate.stages.base import build_config

    cls = STAGES["normalize"]
    ctx = StageContext(base_dir=DATA, cache_dir=Path(tempfile.mkdtemp()))
    stage = cls(build_config(cls.Config, {}, "normalize"), ctx)
    stage.setup()
    return stage


def run_path(workers: int) -> int:
    """`curate run` itself with one normalize stage: hashing, ingest, the stage, the version files."""
    from curate.pipeline import recipe_from_dict, run_recipe

    recipe = recipe_from_dict({"inputs": [{"path": "raw"}], "stages": [{"normalize": {}}]}, base_dir=DATA)
    with tempfile.TemporaryDirectory() as out:
        _, manifest = run_recipe(recipe, Path(out), workers=workers)
    return manifest["counts"]["kept"]


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
    # The content id is part of every record; timing it alone shows what conversion itself costs.
    messages = pa.concat_arrays([b.table["messages"].combine_chunks() for b in read_input(spec, DATA)])
    runs = {
        "reference": (reference, files),
        "read": (ingest, spec),
        "normalize": (ingest, spec, stage),
        "ids": (ids, messages),
        "engine1": (run_path, 1),
        "engine2": (run_path, 2),
    }
    # Rounds interleave the contenders, so a busy machine slows them alike; the fastest round counts.
    best: dict[str, float] = {}
    counts: dict[str, int] = {}
    for _ in range(args.repeat):
        for key, (fn, *fn_args) in runs.items():
            secs, counts[key] = timed(fn, *fn_args)
            best[key] = min(best.get(key, secs), secs)
    ref_n = counts["reference"]
    assert ref_n == counts["read"] == counts["normalize"] == counts["ids"] == counts["engine2"], counts
    ref_s, read_s, norm_s, id_s = best["reference"], best["read"], best["normalize"], best["ids"]
    mb = sum(p.stat().st_size for p in files) / 1e6
    print(f"files: {len(files)} ({mb:.1f} MB gzipped), records: {ref_n:,}; best of {args.repeat}")
    print(f"python {platform.python_version()}, {platform.machine()}")
    print(f"{'':34}{'seconds':>9}{'records/s':>12}{'ratio':>8}")
    rows = [
        ("reference: gzip + json.loads loop", ref_s),
        ("curate: read + detect + convert", read_s),
        ("curate: ... + normalize stage", norm_s),
        ("  of which the ids (record_ids)", id_s),
        ("  read + detect + convert w/o ids", read_s - id_s),
        ("curate run (normalize), 1 worker", best["engine1"]),
        ("curate run (normalize), 2 workers", best["engine2"]),
    ]
    for label, secs in rows:
        print(f"{label:34}{secs:9.2f}{ref_n / secs:12,.0f}{ref_s / secs:8.2f}x")


if __name__ == "__main__":
    main()
