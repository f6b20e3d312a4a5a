"""Benchmark: `curate diff` of two versions of 85k records and of two of 1M, seconds and peak memory.

The versions are normalize alone and normalize + filter (its defaults: empty turns, prompt-only
records, refusals), over ../shared/data/raw (85,669 records) and over 12 copies of it (1,028,028
records, the perturbed copies of bench/memory.py, written once under the work folder), so both
versions of a pair hold about as many records as the input. Each diff runs in a
fresh process (peak memory is that process's VmHWM, imports included), twice; the faster counts.
The reference is the floor any diff pays: the same fresh process reading the `id` and `source`
columns of both data.parquet files and nothing else.

    python bench/diff.py [--copies 1 12] [--work /tmp/curate-bench-diff]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory import make_inputs  # noqa: E402  (the perturbed copies of raw/)

_DIFF = """
import json, sys, time
started = time.perf_counter()
from curate.report.diff import diff_versions
report = diff_versions(sys.argv[1], sys.argv[2])
seconds = time.perf_counter() - started
peak = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"seconds": seconds, "peak_mib": peak / 1024, "counts": report["counts"]}))
"""

_READ = """
import json, sys, time
started = time.perf_counter()
import polars as pl
for folder in sys.argv[1:3]:
    pl.read_parquet(folder + "/data.parquet", columns=["id", "source"])
seconds = time.perf_counter() - started
peak = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"seconds": seconds, "peak_mib": peak / 1024}))
"""


def versions(folders: list[Path], work: Path) -> list[Path]:
    """The two versions (normalize, then normalize + filter) of the inputs, made once under `work`."""
    from curate.pipeline import run_recipe
    from curate.recipe import recipe_from_dict
    from curate.versions import resolve_version

    out = []
    for name, stages in (("plain", [{"normalize": {}}]), ("filtered", [{"normalize": {}}, {"filter": {}}])):
        folder = work / f"{len(folders)}-copies-{name}"
        if not (folder / "latest").exists():
            raw = {"inputs": [{"path": str(f), "name": f.name} for f in folders], "stages": stages}
            print(f"  building the {name} version (once)...", flush=True)
            run_recipe(recipe_from_dict(raw, base_dir=Path("/")), folder)
        out.append(resolve_version(folder))
    return out


def measure(script: str, a: Path, b: Path) -> dict:
    best = None
    for _ in range(2):
        done = subprocess.run(
            [sys.executable, "-c", script, str(a), str(b)], capture_output=True, text=True, check=True
        )
        result = json.loads(done.stdout.strip().splitlines()[-1])
        if best is None or result["seconds"] < best["seconds"]:
            best = result
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, nargs="+", default=[1, 12], help="sizes, in copies of raw/")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "curate-bench-diff")
    args = parser.parse_args()
    print(f"{'records A/B':>19} {'diff s':>8} {'peak MiB':>9} {'read ids s':>11} {'x read':>7}   counts")
    for copies in args.copies:
        inputs = make_inputs(args.work / "inputs", copies)
        a, b = versions(inputs, args.work)
        # alternate: read, diff, read, diff (each best of two in fresh processes)
        floor, diff = measure(_READ, a, b), measure(_DIFF, a, b)
        floor = min(floor, measure(_READ, a, b), key=lambda r: r["seconds"])
        diff = min(diff, measure(_DIFF, a, b), key=lambda r: r["seconds"])
        records = "/".join(
            f"{json.loads((v / 'manifest.json').read_text())['counts']['kept']:,}" for v in (a, b)
        )
        ratio = diff["seconds"] / floor["seconds"]
        print(
            f"{records:>19} {diff['seconds']:>8.2f} {diff['peak_mib']:>9,.0f} {floor['seconds']:>11.2f}"
            f" {ratio:>7.1f}   {diff['counts']}",
            flush=True,
        )


if __name__ == "__main__":
    main()
