"""The demo's first run on a fresh install: compiled kernels are cached on disk, so only a first
run compiles them; how long does it take?

Each run copies the committed tree (no `__pycache__`, so no numba cache) to a temporary folder
and runs `python -m curate.cli run pipelines/demo.yaml` there, with an empty shared cache. The
reference is the same first run with the warm-up process turned off (CURATE_WARM=0: every kernel
compiles in the run itself, as before curate.warm); "again" is a second run in the same copy
(kernels loaded from the cache, every stage recomputed in a new output folder). Sides alternate.

    python bench/first_run.py [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def fresh_copy(root: Path) -> Path:
    files = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-co", "--exclude-standard"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    tree = root / "curate-copy"
    for name in files:
        if "__pycache__" in name or not (REPO / name).is_file():
            continue
        target = tree / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((REPO / name).read_bytes())
    return tree


def timed_run(tree: Path, out: Path, shared: Path, warm: bool) -> float:
    env = {
        **os.environ,
        "PYTHONPATH": str(tree),
        "CURATE_CACHE_DIR": str(shared),
        "CURATE_WARM": "1" if warm else "0",
    }
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "curate.cli", "run", "pipelines/demo.yaml", "--out", str(out), "--json"],
        cwd=tree,
        env=env,
        check=True,
        capture_output=True,
    )
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    results: dict[str, list[float]] = {"warm-up": [], "no warm-up": [], "again": []}
    for r in range(args.rounds):
        for warm in (True, False) if r % 2 == 0 else (False, True):
            with tempfile.TemporaryDirectory() as tmp:
                root = Path(tmp)
                tree = fresh_copy(root)
                results["warm-up" if warm else "no warm-up"].append(
                    timed_run(tree, root / "out1", root / "shared", warm)
                )
                if warm:
                    results["again"].append(timed_run(tree, root / "out2", root / "shared", warm))
    print(f"first run of the demo on a fresh install, {os.cpu_count()} cores, best of {args.rounds}")
    reference = min(results["no warm-up"])
    for name, runs in results.items():
        listed = ", ".join(f"{x:.1f}" for x in runs)
        print(f"{name:12} {min(runs):6.1f} s   {reference / min(runs):5.2f}x   (runs: {listed})")


if __name__ == "__main__":
    main()
