"""The same recipe with the local engine and with Ray at 1 and 2 workers on this machine: records/s,
peak memory per worker process, and the ratios.

The recipe is the one tests/test_ray_engine.py checks on raw/ (normalize, filter, dedup with
MinHash, decontaminate, diversity), over bench/memory.py's inputs: ../shared/data/raw and
perturbed copies of its files, read as real files (12 copies: 1,028,088 rows). Each run is a fresh
process (`curate.pipeline.run_recipe` with the engine named); Ray runs start their own local
cluster (`ray.init(num_cpus=N)`) and stop it. Every process of the run's tree is sampled every
100 ms (RSS, from /proc through psutil): the driver (the runner, which also decides the global
stages), the workers (Ray's `ray::` worker processes, or the local engine's spawned processes),
and Ray's own daemons (raylet, GCS, agents). A Ray worker's RSS includes the pages of the shared
object store it touched. Each run has a shared cache of its own (embeddings computed anew; the
static model, distilled once, is shared).

Every engine first runs once on one small file (kernels loaded, the static model distilled,
untimed); then the engines take turns, in reversed order every other round; the fastest round
counts, the largest peak.

    python bench/ray_scaling.py --copies 12               # 1M records
    python bench/ray_scaling.py --copies 1 --rounds 2     # raw/ only (85k)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
import memory  # noqa: E402 - bench/memory.py: the inputs and the recipe's first four stages

REPO = Path(__file__).resolve().parents[1]
ENGINES = {"local": ("local", None), "ray-1": ("ray", 1), "ray-2": ("ray", 2)}

_RUN = """
import json, sys, time
from pathlib import Path
from curate.pipeline import run_recipe
from curate.recipe import recipe_from_dict
raw, out, engine = json.loads(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
workers = int(sys.argv[4]) if sys.argv[4] != "-" else None
if __name__ == "__main__":
    started = time.perf_counter()
    result = run_recipe(recipe_from_dict(raw, base_dir=Path("/")), out, workers=workers, engine=engine)
    seconds = time.perf_counter() - started
    stages = {s["name"]: s["seconds"] for s in result.manifest["stages"]}
    print(json.dumps({"seconds": seconds, "counts": result.manifest["counts"],
                      "version": result.manifest["version"], "stages": stages}))
"""


def recipe(folders: list[Path]) -> dict:
    raw = memory.recipe(folders)
    raw["name"] = "ray-scaling"
    raw["stages"].append({"diversity": {"k": 5000}})
    return raw


def _kind(proc: psutil.Process, root: int) -> str:
    if proc.pid == root:
        return "driver"
    cmdline = proc.cmdline()
    if cmdline and cmdline[0].startswith("ray::") and "Agent" not in cmdline[0]:
        return "worker"
    if any("multiprocessing" in part or "spawn_main" in part for part in cmdline):
        return "worker"
    return "other"


def measure(raw: dict, engine: str, workers: int | None, workdir: Path) -> dict:
    """One run in a fresh process; peaks per process kind, sampled over its whole tree."""
    out = Path(tempfile.mkdtemp(dir=workdir))
    # a shared cache of its own (no embedding from an earlier run), with the static model made once
    shared = out / "shared-cache"
    shared.mkdir()
    (workdir / "models").mkdir(exist_ok=True)
    (shared / "models").symlink_to(workdir / "models")
    env = {**os.environ, "CURATE_CACHE_DIR": str(shared), "CURATE_WARM": "0"}
    args = [sys.executable, "-c", _RUN, json.dumps(raw), str(out), engine, str(workers or "-")]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, env=env, text=True, cwd=REPO)
    peaks: dict[int, tuple[str, int]] = {}
    tree_peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal tree_peak
        root = psutil.Process(proc.pid)
        while not done.is_set():
            total = 0
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            for p in procs:
                try:
                    rss = p.memory_info().rss
                    known = peaks.get(p.pid, ("other", 0))[0]
                    kind = known if known != "other" else _kind(p, proc.pid)  # Ray names a worker late
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
                total += rss
                peaks[p.pid] = (kind, max(rss, peaks.get(p.pid, (kind, 0))[1]))
            tree_peak = max(tree_peak, total)
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, _ = proc.communicate()
    done.set()
    sampler.join()
    subprocess.run(["rm", "-rf", str(out)], check=False)
    if proc.returncode:
        return {"failed": proc.returncode}
    result = json.loads(stdout.strip().splitlines()[-1])
    mib = 1 << 20
    by_kind = {k: [rss for kind, rss in peaks.values() if kind == k] for k in ("driver", "worker", "other")}
    result.update(
        tree_peak_mib=tree_peak / mib,
        driver_peak_mib=max(by_kind["driver"], default=0) / mib,
        worker_peak_mib=max(by_kind["worker"], default=0) / mib,
        workers_seen=len(by_kind["worker"]),
        other_peak_mib=sum(by_kind["other"]) / mib,
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=12, help="input size, in copies of raw/ (12: 1M)")
    parser.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "curate-bench-inputs")
    parser.add_argument("--rounds", type=int, default=1, help="alternating rounds")
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=list(ENGINES))
    args = parser.parse_args()
    folders = memory.make_inputs(args.data, args.copies)
    with tempfile.TemporaryDirectory(dir=args.data) as tmp:
        workdir = Path(tmp)
        warm = recipe(folders[:1])
        warm["inputs"] = [{"path": str(memory.RAW / "code_alpaca_2k.json.gz")}]
        for name in args.engines:
            measure(warm, *ENGINES[name], workdir)  # untimed: kernels, the static model, Ray's first start
        raw = recipe(folders)
        runs: dict[str, list[dict]] = {name: [] for name in args.engines}
        for r in range(args.rounds):
            for name in args.engines if r % 2 == 0 else list(reversed(args.engines)):
                result = measure(raw, *ENGINES[name], workdir)
                runs[name].append(result)
                print(f"round {r}: {name}: {json.dumps(result)}", flush=True)
    print()
    columns = ["engine", "records", "seconds", "records/s", "vs local", "driver peak", "worker peak (each)"]
    print("| " + " | ".join([*columns, "workers", "tree peak", "version"]) + " |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    base = None
    for name, results in runs.items():
        ok = [x for x in results if "failed" not in x]
        if not ok:
            print(f"| {name} | failed ({results[0]['failed']}) | | | | | | | | |")
            continue
        best = min(ok, key=lambda x: x["seconds"])
        n = best["counts"]["input"]
        rate = n / best["seconds"]
        base = base or (rate if name == "local" else None)
        ratio = f"{rate / base:.2f}x" if base else "-"
        driver, worker, tree = (
            max(x[k] for x in ok) for k in ("driver_peak_mib", "worker_peak_mib", "tree_peak_mib")
        )
        print(
            f"| {name} | {n:,} | {best['seconds']:.1f} | {rate:,.0f} | {ratio} | {driver:,.0f} MiB | "
            f"{worker:,.0f} MiB | {best['workers_seen']} | {tree:,.0f} MiB | {best['version']} |"
        )
    print()
    for name, results in runs.items():
        ok = [x for x in results if "failed" not in x]
        if ok:
            best = min(ok, key=lambda x: x["seconds"])
            print(f"{name} stage seconds: {best['stages']}")


if __name__ == "__main__":
    main()
