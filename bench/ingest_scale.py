"""`curate run` on several copies of ../shared/data/raw, with one worker and with every core.

Copies raw/ COPIES times into a temporary folder (one input each, so the records are all real and
distinct by source) and runs normalize + filter over them, end to end, once per worker count.

    python bench/ingest_scale.py [--copies 4]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from curate.pipeline import run_recipe
from curate.recipe import recipe_from_dict

RAW = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "raw"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=4, help="copies of raw/ to read")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        for i in range(args.copies):
            shutil.copytree(RAW, base / f"raw{i}")
        size = sum(p.stat().st_size for p in base.rglob("*") if p.is_file())
        inputs = [{"path": f"raw{i}"} for i in range(args.copies)]
        recipe = recipe_from_dict(
            {"inputs": inputs, "stages": [{"normalize": {}}, {"filter": {}}]}, base_dir=base
        )
        print(f"{args.copies} copies of raw/: {size / 1e6:.0f} MB gzipped; {os.cpu_count()} cores")
        for workers in sorted({1, os.cpu_count() or 1}):
            with tempfile.TemporaryDirectory() as out:
                start = time.perf_counter()
                manifest = run_recipe(recipe, Path(out), workers=workers).manifest
                secs = time.perf_counter() - start
            counts = manifest["counts"]
            print(
                f"workers {workers}: {secs:.1f} s, {counts['input'] / secs:,.0f} records/s "
                f"(input {counts['input']:,}, kept {counts['kept']:,}, dropped {counts['dropped']:,}, "
                f"quarantined {counts['quarantined']:,})"
            )


if __name__ == "__main__":
    main()
