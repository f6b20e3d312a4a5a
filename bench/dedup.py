"""Benchmark: the dedup stage's MinHash near-dedup against datasketch (MinHash.bulk + MinHashLSH), end to end.

Both sides start from the same conversation texts of the canonical records of ../shared/data/raw
(85,669 records) and do the same work: word 5-gram shingles, 128 permutations, LSH at Jaccard 0.8,
candidate pairs checked by estimated Jaccard >= 0.8, clusters, first record of each cluster kept.
Each run is a fresh subprocess, so its peak memory (VmHWM, reset after the table is loaded) is its
own; each figure is the fastest of a few runs, as other work may share the cores. A second size
repeats the records 12 times (about 1M), each copy perturbed, to show how time grows; datasketch
is left out there (at its pace it would take minutes and most of the memory).

    python bench/dedup.py                      # both sizes, writes bench/results/dedup.md
    python bench/dedup.py --copies 0           # 85k only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
RAW_INPUTS = [("raw/*.gz", None), ("raw/t0_train_50k/*.jsonl.gz", "t0_train_50k")]
THRESHOLD, NUM_PERM, NGRAM = 0.8, 128, 5


def load_raw() -> pl.DataFrame:
    """The canonical records of raw/, read the way the runner reads a recipe's inputs."""
    from curate.formats import InputSpec, read_input
    from curate.records import to_table

    records: list[dict] = []
    for path, name in RAW_INPUTS:
        for batch in read_input(InputSpec(path=path, name=name), DATA):
            records.extend(batch.records)
    return pl.from_arrow(to_table(records))


def scaled(table: pl.DataFrame, copies: int) -> pl.DataFrame:
    """The table plus `copies` perturbed copies: per copy, a quarter of the records stay exact, a
    quarter get one extra word per turn (near-duplicates), and in half every "e" becomes another
    letter, which changes most words but not the length (new text of the same cost)."""
    parts = [table]
    row = pl.int_range(pl.len(), dtype=pl.UInt64)
    for k in range(1, copies + 1):
        mode = (row * 2654435761 + k) % 4
        content = pl.element().struct.field("content")
        light = content + f" v{k}"
        heavy = content.str.replace_all("e", "qxzjkvwybfg"[(k - 1) % 11], literal=True)  # same length
        copy = table.with_columns(
            pl.when(mode == 1)
            .then(pl.col("messages").list.eval(pl.element().struct.with_fields(light.alias("content"))))
            .when(mode >= 2)
            .then(pl.col("messages").list.eval(pl.element().struct.with_fields(heavy.alias("content"))))
            .otherwise(pl.col("messages"))
            .alias("messages"),
            (pl.col("id") + f"-{k}").alias("id"),
        )
        parts.append(copy)
    return pl.concat(parts)


# workers: each runs in its own process -------------------------------------------------------------


def _reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


_CPU: dict[str, float] = {}  # process CPU seconds of the timed part (both cores count)


def _pairs_of(roots: np.ndarray) -> np.ndarray:
    """(dropped row, kept row) for every record not first in its cluster."""
    rows = np.nonzero(roots != np.arange(roots.size))[0]
    return np.stack([rows, roots[rows]], axis=1)


def worker_stage(table: pl.DataFrame, exact: bool) -> tuple[float, np.ndarray]:
    from curate.stages.base import StageContext, build_config
    from curate.stages.dedup import DedupStage

    options = {"exact": exact, "minhash": {"threshold": THRESHOLD, "num_perm": NUM_PERM, "ngram": NGRAM}}
    config = build_config(DedupStage.Config, options, "dedup")
    context = StageContext(base_dir=REPO)
    arrow = table.to_arrow()
    DedupStage(config, context).apply(arrow.slice(0, 2000))  # load the compiled kernels from numba's cache
    _reset_peak()
    _CPU["start"] = time.process_time()
    start = time.perf_counter()
    verdicts = DedupStage(config, context).apply(arrow).verdicts()
    seconds = time.perf_counter() - start
    _CPU["seconds"] = time.process_time() - _CPU["start"]
    where = {
        f"{p}:{r}": i
        for i, (p, r) in enumerate(
            zip(table["source"].struct.field("path"), table["source"].struct.field("row"), strict=True)
        )
    }
    pairs = [(i, where[v.evidence["duplicate_of_source"]]) for i, v in enumerate(verdicts) if v is not None]
    return seconds, np.array(pairs, dtype=np.int64).reshape(-1, 2)


def worker_datasketch(table: pl.DataFrame) -> tuple[float, np.ndarray]:
    from datasketch import MinHash, MinHashLSH

    from curate.text.conversation import conversation_text
    from curate.text.shingles import shingles

    _reset_peak()
    _CPU["start"] = time.process_time()
    start = time.perf_counter()
    texts = conversation_text(table).to_list()
    sets = [[s.encode("utf-8") for s in shingles(t, NGRAM)] for t in texts]
    sketches = MinHash.bulk(sets, num_perm=NUM_PERM)
    lsh = MinHashLSH(threshold=THRESHOLD, num_perm=NUM_PERM)
    with lsh.insertion_session() as session:
        for i, m in enumerate(sketches):
            if sets[i]:
                session.insert(i, m, check_duplication=False)
    parent = list(range(len(texts)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, m in enumerate(sketches):
        if not sets[i]:
            continue
        for j in lsh.query(m):
            if j < i and m.jaccard(sketches[j]) >= THRESHOLD:
                a, b = find(i), find(j)
                parent[max(a, b)] = min(a, b)
    roots = np.array([find(i) for i in range(len(texts))])
    seconds = time.perf_counter() - start
    _CPU["seconds"] = time.process_time() - _CPU["start"]
    return seconds, _pairs_of(roots)


def run_worker(kind: str, parquet: Path, out: Path) -> None:
    table = pl.read_parquet(parquet)
    if kind == "datasketch":
        seconds, pairs = worker_datasketch(table)
    else:
        seconds, pairs = worker_stage(table, exact=kind == "stage+exact")
    np.save(out.with_suffix(".npy"), pairs)
    result = {
        "seconds": seconds,
        "cpu_seconds": _CPU["seconds"],
        "peak_mib": _peak_mib(),
        "records": table.height,
    }
    out.write_text(json.dumps(result))


# driver -------------------------------------------------------------------------------------------


def measure(kind: str, parquet: Path, scratch: Path, repeats: int) -> dict:
    """The fastest of `repeats` runs, each a fresh process; peak memory is the largest of them."""
    out = scratch / f"{kind}-{parquet.stem}.json"
    cmd = [sys.executable, __file__, "--worker", kind, "--table", str(parquet), "--result", str(out)]
    runs = []
    for _ in range(repeats):
        subprocess.run(cmd, check=True, cwd=REPO)
        result = json.loads(out.read_text())
        result["pairs"] = np.load(out.with_suffix(".npy"))
        runs.append(result)
    best = min(runs, key=lambda r: r["seconds"])
    best["peak_mib"] = max(r["peak_mib"] for r in runs)
    best["rate"] = best["records"] / best["seconds"]
    best["repeats"] = repeats
    return best


def agreement(a: np.ndarray, b: np.ndarray) -> tuple[float, int, int]:
    """Jaccard of two sets of (dropped, kept) pairs, and the pairs only in each."""
    sa, sb = set(map(tuple, a.tolist())), set(map(tuple, b.tolist()))
    union = sa | sb
    return (len(sa & sb) / len(union) if union else 1.0), len(sa - sb), len(sb - sa)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--copies", type=int, default=11, help="perturbed copies for the large run (0: none)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per 85k measurement; the fastest counts")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "dedup.md")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--table", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run_worker(args.worker, args.table, args.result)
        return

    command = "python bench/dedup.py" + "".join(
        f" --{name} {value}"
        for name, value, default in (("copies", args.copies, 11), ("repeats", args.repeats, 3))
        if value != default
    )
    with tempfile.TemporaryDirectory(prefix="curate-bench-dedup-") as tmp:
        scratch = Path(tmp)
        base = load_raw()
        assert base.height == 85_669, base.height
        small = scratch / "raw.parquet"
        base.write_parquet(small)
        runs = {
            "stage": measure("stage", small, scratch, args.repeats),
            "stage+exact": measure("stage+exact", small, scratch, args.repeats),
            "datasketch": measure("datasketch", small, scratch, max(1, args.repeats - 1)),
        }
        if args.copies:
            large = scratch / "large.parquet"
            scaled(base, args.copies).write_parquet(large)
            del base
            runs["stage 1M"] = measure("stage", large, scratch, max(1, args.repeats - 1))
        load = os.getloadavg()

    ds, st = runs["datasketch"], runs["stage"]
    agree, only_stage, only_ds = agreement(st["pairs"], ds["pairs"])
    lines = [
        "# Dedup benchmark: MinHash near-dedup, curate vs datasketch",
        "",
        f"Command: `{command}` (from the repository root). Data: ../shared/data/raw, "
        f"{ds['records']:,} records, word {NGRAM}-grams, {NUM_PERM} permutations, threshold {THRESHOLD}, "
        "candidates checked by estimated Jaccard, first record of each cluster kept. Timed: texts from the "
        "table, shingles, signatures, bands, clusters, verdicts. Not timed: reading the files, numba "
        "compilation (cached on disk).",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; load "
        f"average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (other work shares the cores).",
        "",
        "| run | fastest of | records | seconds | records/s | vs datasketch | CPU seconds | "
        "records per CPU second | peak memory (MiB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in runs.items():
        label = {
            "stage": "curate dedup (minhash)",
            "stage+exact": "curate dedup (exact + minhash)",
            "datasketch": "datasketch MinHash.bulk + MinHashLSH",
            "stage 1M": f"curate dedup (minhash), {args.copies + 1} perturbed copies",
        }[name]
        lines.append(
            f"| {label} | {r['repeats']} | {r['records']:,} | {r['seconds']:.2f} | {r['rate']:,.0f} | "
            f"{r['rate'] / ds['rate']:.1f}x | {r['cpu_seconds']:.2f} | "
            f"{r['records'] / r['cpu_seconds']:,.0f} | {r['peak_mib']:,.0f} |"
        )
    lines += [
        "",
        f"Agreement with datasketch on (dropped, kept) pairs: {agree:.2%} "
        f"({len(st['pairs']):,} pairs from curate, {len(ds['pairs']):,} from datasketch; "
        f"{only_stage} only in curate, {only_ds} only in datasketch).",
    ]
    if "stage 1M" in runs:
        big = runs["stage 1M"]
        lines.append(
            f"Scaling: {big['records'] / st['records']:.1f}x the records took "
            f"{big['seconds'] / st['seconds']:.1f}x the time "
            f"({big['rate']:,.0f} vs {st['rate']:,.0f} records/s)."
        )
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
