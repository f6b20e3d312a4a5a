"""Peak memory and records/s of `curate run` (normalize + filter + dedup + decontaminate) as data grows.

Inputs are ../shared/data/raw (85,669 records) and copies of it, each copy perturbed the way
bench/dedup.py perturbs records, but in the raw files themselves, so every copy goes through the
readers and detection as real data does: per copy and row, a quarter of the rows stay exact
copies, a quarter get " v<copy>" after every text (near-duplicates), and half have every "e" in
their texts swapped for another letter (new text of the same length). Sizes are given in copies:
12 copies (the original and 11 perturbed) are about 1M records, 117 about 10M.

Each run is a fresh process; its peak memory is that of the whole process tree (the runner and any
worker it spawns), sampled every 50 ms from /proc, with the main process's own VmHWM beside it.
The reference is today's in-memory runner before the streaming change (`--reference` commit, run
from a git worktree in a temporary folder), measured in the same session where it fits in memory;
both sides run once on a small input first (so the compiled kernels are loaded, not compiled,
when timed) and then alternate.

    python bench/memory.py --copies 1 12          # 85k and 1M, both runners
    python bench/memory.py --copies 117 --new-only  # 10M, the streaming runner alone
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RAW = REPO.parent / "shared" / "data" / "raw"
EVAL = REPO.parent / "shared" / "data" / "eval"
LETTERS = "qxzjkvwybfg"


# inputs ------------------------------------------------------------------------------------------


def _perturb(value, row: int, copy: int):
    """The copy's version of a parsed row: strings with a space in them (prose, not roles) change."""
    mode = (row * 2654435761 + copy) % 4
    if mode == 0:
        return value

    def text(s: str) -> str:
        if " " not in s:
            return s
        return s + f" v{copy}" if mode == 1 else s.replace("e", LETTERS[(copy - 1) % len(LETTERS)])

    def walk(v):
        if isinstance(v, str):
            return text(v)
        if isinstance(v, list):
            return [walk(x) for x in v]
        if isinstance(v, dict):
            return {k: walk(x) for k, x in v.items()}
        return v

    return walk(value)


def _write_copy(args: tuple[Path, Path, int]) -> None:
    source, target, copy = args
    target.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(source, "rt", encoding="utf-8") as f:
        text = f.read()
    with gzip.open(target, "wt", encoding="utf-8", compresslevel=1) as out:
        if source.name.endswith(".json.gz"):
            rows = json.loads(text)
            json.dump([_perturb(r, i, copy) for i, r in enumerate(rows)], out, ensure_ascii=False)
            return
        for i, line in enumerate(text.splitlines()):
            try:
                value = json.loads(line)
            except ValueError:
                out.write(line + "\n")  # the invalid lines stay invalid
                continue
            out.write(json.dumps(_perturb(value, i, copy), ensure_ascii=False) + "\n")


def make_inputs(root: Path, copies: int) -> list[Path]:
    """Folders copy-0 (raw/ as is) to copy-<copies - 1>, made once and kept under `root`."""
    files = sorted(p for p in RAW.rglob("*.gz"))
    jobs = []
    folders = []
    for copy in range(copies):
        folder = root / f"copy-{copy}"
        folders.append(folder)
        if (folder / "done").is_file():
            continue
        for f in files:
            target = folder / f.relative_to(RAW)
            if copy == 0:
                target.parent.mkdir(parents=True, exist_ok=True)
                if not target.exists():
                    os.symlink(f, target)
            else:
                jobs.append((f, target, copy))
    if jobs:
        print(f"writing {len({copy for _, _, copy in jobs})} perturbed copies of raw/ (once)...", flush=True)
        with ProcessPoolExecutor(os.cpu_count()) as pool:
            list(pool.map(_write_copy, jobs, chunksize=4))
    for folder in folders:
        (folder / "done").write_text("")
    return folders


def recipe(folders: list[Path]) -> dict:
    return {
        "name": "memory",
        "inputs": [{"path": str(f), "name": f.name} for f in folders],
        "eval_sets": [
            {"name": "gsm8k", "path": str(EVAL / "gsm8k_test.jsonl.gz")},
            {"name": "humaneval", "path": str(EVAL / "HumanEval.jsonl.gz")},
            {"name": "alpaca_eval", "path": str(EVAL / "alpaca_eval_text_davinci_003_outputs.json.gz")},
            {"name": "mt_bench", "path": str(EVAL / "mt_bench_question.jsonl.gz")},
        ],
        "stages": [
            {"normalize": {"system_prompt": "You are a helpful assistant."}},
            {"filter": {}},
            {"dedup": {"exact": True, "minhash": {"threshold": 0.8, "num_perm": 128, "ngram": 5}}},
            {"decontaminate": {"methods": ["exact", "ngram", "minhash"]}},
        ],
    }


# one measured run ----------------------------------------------------------------------------------

_RUN = """
import json, sys, time
from pathlib import Path
try:
    from curate.recipe import recipe_from_dict
except ImportError:
    from curate.pipeline import recipe_from_dict
from curate.pipeline import run_recipe
raw, out = json.loads(sys.argv[1]), Path(sys.argv[2])
started = time.perf_counter()
result = run_recipe(recipe_from_dict(raw, base_dir=Path("/")), out)
import curate
assert curate.__file__.startswith(sys.argv[3]), curate.__file__
manifest = result.manifest if hasattr(result, "manifest") else result[1]
seconds = time.perf_counter() - started
peak = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"seconds": seconds, "counts": manifest["counts"], "version": manifest["version"],
                  "main_peak_kib": peak}))
"""


def _tree_rss(pid: int) -> int:
    """RSS in KiB of a process and all its descendants."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo += [int(c) for c in f.read().split()]
        except (OSError, StopIteration):
            continue
    return total


def measure(code_root: Path, raw: dict, workdir: Path) -> dict:
    """One run of `curate run` in a fresh process with curate from `code_root`."""
    out = Path(tempfile.mkdtemp(dir=workdir))
    env = {**os.environ, "PYTHONPATH": str(code_root), "CURATE_CACHE_DIR": str(workdir / "shared-cache")}
    # run from the tree itself: `python -c` puts the working folder first on sys.path
    proc = subprocess.Popen(
        [sys.executable, "-c", _RUN, json.dumps(raw), str(out), str(code_root)],
        stdout=subprocess.PIPE,
        env=env,
        text=True,
        cwd=code_root,
    )
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _tree_rss(proc.pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, _ = proc.communicate()
    done.set()
    sampler.join()
    subprocess.run(["rm", "-rf", str(out)], check=False)
    if proc.returncode:
        return {"failed": proc.returncode}
    result = json.loads(stdout.strip().splitlines()[-1])
    result["tree_peak_mib"] = peak / 1024
    result["main_peak_mib"] = result.pop("main_peak_kib") / 1024
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, nargs="+", default=[1, 12], help="sizes, in copies of raw/")
    parser.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "curate-bench-inputs")
    parser.add_argument(
        "--reference", default="1dae393", help="commit of the in-memory runner to compare with"
    )
    parser.add_argument("--new-only", action="store_true", help="do not run the reference")
    parser.add_argument("--rounds", type=int, default=1, help="alternating rounds per size")
    args = parser.parse_args()
    folders = make_inputs(args.data, max(args.copies))
    with tempfile.TemporaryDirectory(dir=args.data) as tmp:
        workdir = Path(tmp)
        sides = {"streaming": REPO}
        if not args.new_only:
            tree = workdir / "reference"
            subprocess.run(
                ["git", "-C", str(REPO), "worktree", "add", "-f", "--detach", str(tree), args.reference],
                check=True,
                capture_output=True,
            )
            sides["in-memory"] = tree
        try:
            warm = recipe(folders[:1])
            warm["inputs"] = [{"path": str(RAW / "code_alpaca_2k.json.gz")}]
            for root in sides.values():
                measure(root, warm, workdir)  # compile or load the kernels once, untimed
            print(
                f"{'records':>11} {'runner':>10} {'seconds':>8} {'records/s':>10} {'tree peak':>10} "
                f"{'main peak':>10}  version"
            )
            for copies in args.copies:
                raw = recipe(folders[:copies])
                results: dict[str, list[dict]] = {name: [] for name in sides}
                for r in range(args.rounds):
                    order = list(sides) if r % 2 == 0 else list(reversed(sides))
                    for name in order:
                        results[name].append(measure(sides[name], raw, workdir))
                for name, runs in results.items():
                    ok = [x for x in runs if "failed" not in x]
                    if not ok:
                        print(f"{'':>11} {name:>10} failed ({runs[0]['failed']})")
                        continue
                    best = min(ok, key=lambda x: x["seconds"])
                    n = best["counts"]["input"]
                    tree = max(x["tree_peak_mib"] for x in ok)
                    main_peak = max(x["main_peak_mib"] for x in ok)
                    print(
                        f"{n:>11,} {name:>10} {best['seconds']:8.1f} {n / best['seconds']:10,.0f} "
                        f"{tree:8,.0f}MB {main_peak:8,.0f}MB  {best['version']}",
                        flush=True,
                    )
                if len(results) == 2 and all(results.values()):
                    new, old = (
                        min(results[k], key=lambda x: x.get("seconds", 1e9))
                        for k in ("streaming", "in-memory")
                    )
                    if "seconds" in new and "seconds" in old:
                        print(
                            f"{'':>11} ratio      speed {old['seconds'] / new['seconds']:.2f}x, "
                            f"memory {new['tree_peak_mib'] / old['tree_peak_mib']:.2f}x, "
                            f"same version: {new['version'] == old['version']}",
                            flush=True,
                        )
        finally:
            if "in-memory" in sides:
                subprocess.run(
                    ["git", "-C", str(REPO), "worktree", "remove", "--force", str(sides["in-memory"])],
                    check=False,
                    capture_output=True,
                )


if __name__ == "__main__":
    main()
