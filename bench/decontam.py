"""Benchmark: decontaminate all of ../shared/data/raw against every eval set in ../shared/data/eval.

Prints, for the same records in the same run: the stage's n-gram + MinHash methods (and with exact
matching too), timed from the eval set files and the records table to the verdicts, after a
warm-up on 100 records; a plain Python set-of-13-grams reference timed the same way (the
lm-eval-harness way: normalize, build a set of the eval items' 13-gram tuples, look up every
training 13-gram), the fastest of --repeat runs each, since the CPUs may be shared; and the
embedding method's throughput on a sample, which on a CPU is the slow method by far.

    python bench/decontam.py [--embed-sample 256]
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
import time
from pathlib import Path

import polars as pl

from curate.evalsets import load_eval_sets
from curate.formats import InputSpec, read_input
from curate.records import to_table
from curate.stages.base import StageContext, build_config
from curate.stages.decontaminate import DecontaminateStage
from curate.text.conversation import conversation_text

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
_NOT_WORD = re.compile(r"[^\w\s]|_")


def read_raw() -> pl.DataFrame:
    records = [
        r for b in read_input(InputSpec.from_recipe({"path": "raw"}, "bench"), DATA) for r in b.records
    ]
    return pl.from_arrow(to_table(records))


def eval_entries() -> list[dict]:
    return [{"name": f.split(".")[0], "path": f"eval/{f}"} for f in sorted(os.listdir(DATA / "eval"))]


def run_stage(table: pl.DataFrame, entries: list[dict], cache: Path, **options) -> tuple[float, int]:
    config = build_config(DecontaminateStage.Config, options, "bench")
    stage = DecontaminateStage(config, StageContext(base_dir=DATA, shared_cache=cache, eval_sets=entries))
    started = time.perf_counter()
    stage.setup()
    verdicts = stage.apply(table.to_arrow()).verdicts()
    return time.perf_counter() - started, sum(v is not None for v in verdicts)


def reference_ngrams(table: pl.DataFrame, entries: list[dict], n: int = 13) -> tuple[float, int]:
    """Plain Python: lowercase, strip punctuation, split; a set of eval n-gram tuples; look each one up.

    Timed like the stage: from the eval set files and the records table to the flagged count.
    """
    started = time.perf_counter()
    questions = [item.question for s in load_eval_sets(entries, DATA) for item in s.items]
    texts = conversation_text(table, "conversation").to_list()

    def words(text: str) -> list[str]:
        return _NOT_WORD.sub("", text.lower()).split()

    grams = set()
    for q in questions:
        w = words(q)
        grams.update(tuple(w[i : i + n]) for i in range(len(w) - n + 1))
    flagged = 0
    for text in texts:
        w = words(text)
        if any(tuple(w[i : i + n]) in grams for i in range(len(w) - n + 1)):
            flagged += 1
    return time.perf_counter() - started, flagged


def embedding_throughput(texts: list[str], cache: Path) -> tuple[float, float]:
    from curate.embed import Embedder

    started = time.perf_counter()
    embedder = Embedder(cache_dir=cache, max_seq_length=128)
    embedder.dimension()  # loads the model
    load = time.perf_counter() - started
    started = time.perf_counter()
    embedder.encode(texts)
    return load, len(texts) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--embed-sample", type=int, default=256, help="records encoded for the embedding figure"
    )
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs of each; the fastest counts (shared CPUs)"
    )
    args = parser.parse_args()

    started = time.perf_counter()
    table = read_raw()
    print(f"read raw/: {table.height:,} records in {time.perf_counter() - started:.1f} s (not counted below)")
    entries = eval_entries()
    sets = load_eval_sets(entries, DATA)
    print(f"eval sets: {len(sets)} sets, {sum(len(s) for s in sets):,} items")

    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp)
        # warm-up on 100 records: loads the compiled kernels from numba's cache and builds the tables
        run_stage(table.head(100), entries, cache, methods=["exact", "ngram", "minhash"])
        ref_s, ref_flagged = min(reference_ngrams(table, entries) for _ in range(args.repeat))
        rows = [("plain Python set of 13-grams (reference)", ref_s, ref_flagged)]
        for label, methods in (
            ("curate ngram", ["ngram"]),
            ("curate ngram + minhash", ["ngram", "minhash"]),
            ("curate exact + ngram + minhash", ["exact", "ngram", "minhash"]),
        ):
            seconds, flagged = min(
                run_stage(table, entries, cache, methods=methods) for _ in range(args.repeat)
            )
            rows.append((label, seconds, flagged))
        print(f"\n{'method':<42}{'seconds':>9}{'records/s':>12}{'flagged':>9}{'x reference':>13}")
        for label, seconds, flagged in rows:
            rate = table.height / seconds
            print(f"{label:<42}{seconds:>9.2f}{rate:>12,.0f}{flagged:>9,}{ref_s / seconds:>13.1f}")

        sample = conversation_text(table.gather_every(max(1, table.height // args.embed_sample)), "user")
        sample = sample.head(args.embed_sample).to_list()
        load, per_s = embedding_throughput(sample, cache)
        print(
            f"\nembedding (all-MiniLM-L6-v2, 128 tokens, CPU): model load {load:.1f} s, "
            f"{per_s:,.1f} records/s on {len(sample)} sampled records; all of raw/ would take "
            f"{table.height / per_s / 60:,.0f} min (the embedding cache makes reruns lookups)"
        )


if __name__ == "__main__":
    main()
