"""Benchmark: decontaminate all of ../shared/data/raw against every eval set in ../shared/data/eval.

Prints, for the same records in the same run: the stage's n-gram + MinHash methods (and with exact
matching too), timed from the eval set files and the records table to the verdicts, after a
warm-up on 100 records; a plain Python set-of-13-grams reference timed the same way (the
lm-eval-harness way: normalize, build a set of the eval items' 13-gram tuples, look up every
training 13-gram), the fastest of --repeat runs each, since the CPUs may be shared; and the
embedding method's throughput on a sample, which on a CPU is the slow method by far.

With --paraphrase it measures the embedding method's two numbers instead: recall on the 485
LLM-written paraphrases of MMLU test questions in ../shared/data/contamination, and the share of
clean instruction records from raw/ it drops, both against the broad eval sets (AlpacaEval,
MT-Bench, Arena-Hard, Vicuna) plus the three MMLU sets, at each threshold, with and without the
numbers check; then the clean records it drops at the default settings, highest score first.

    python bench/decontam.py [--embed-sample 256]
    python bench/decontam.py --paraphrase
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import tempfile
import time
from pathlib import Path

import polars as pl

from curate.evalsets import load_eval_sets
from curate.formats import InputSpec, read_input
from curate.records import make_record, message, to_table
from curate.stages.base import StageContext, build_config
from curate.stages.decontaminate import DecontaminateStage
from curate.text.conversation import conversation_text

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MMLU = ["abstract_algebra", "sociology", "high_school_us_history"]
BROAD = [
    ("alpaca_eval", "eval/alpaca_eval_gpt4_1106_preview_outputs.json.gz"),
    ("mt_bench", "eval/mt_bench_question.jsonl.gz"),
    ("arena_hard", "eval/arena_hard_v0.1_question.jsonl.gz"),
    ("vicuna", "eval/vicuna_bench_question.jsonl.gz"),
]
# raw/ files of instructions written apart from any of those eval sets (self-instruct, Vicuna, OASST
# and HH prompts are in AlpacaEval; the WizardLM test set is an eval set itself)
CLEAN_SOURCES = (
    "llamafactory_alpaca_en_demo",
    "code_alpaca_2k",
    "new_codealpaca",
    "gpteacher_",
    "alpaca_seed_tasks",
    "llamafactory_glaive_toolcall",
    "llamafactory_dpo_en",
    "llamafactory_kto_en",
    "t0_train",
)
CLEAN_PER_SOURCE = 400
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


def paraphrase_records() -> tuple[pl.DataFrame, list[tuple[str, str]]]:
    """The non-empty MMLU paraphrases as one-turn records, and (eval set, item id) of each."""
    rows, truth = [], []
    for subject in MMLU:
        path = DATA / f"contamination/llmdecon_{subject}_test_rephrase_english_filtered_question.jsonl.gz"
        with gzip.open(path, "rt") as fh:
            for row, line in enumerate(fh):
                text = json.loads(line)["text"]
                if text.strip():  # the filtered set blanks the rephrasings it rejected
                    source = {"name": "rephrase", "path": path.name, "row": row, "format": "messages"}
                    rows.append(make_record([message("user", text), message("assistant", "-")], source))
                    truth.append((f"mmlu_{subject}", str(row)))
    return pl.from_arrow(to_table(rows)), truth


def clean_records(table: pl.DataFrame) -> pl.DataFrame:
    """Up to CLEAN_PER_SOURCE records (seeded) of each clean source, with a user turn."""
    path = table["source"].struct.field("path")
    user = conversation_text(table, "user").str.strip_chars().str.len_chars()
    parts = []
    for name in CLEAN_SOURCES:
        pool = table.filter(path.str.contains(name, literal=True) & (user > 0))
        parts.append(pool.sample(min(pool.height, CLEAN_PER_SOURCE), seed=0))
    return pl.concat(parts)


def embedding_scores(table: pl.DataFrame, entries: list[dict], cache: Path, **options) -> list:
    """Each record's embedding hit from 0.6 up (evidence), or None."""
    config = build_config(
        DecontaminateStage.Config, {"methods": ["embedding"], "embedding_threshold": 0.6, **options}, "bench"
    )
    stage = DecontaminateStage(config, StageContext(base_dir=DATA, shared_cache=cache, eval_sets=entries))
    stage.setup()
    return [v.evidence if v else None for v in stage.apply(table.to_arrow()).verdicts()]


def paraphrase_study() -> None:
    default = DecontaminateStage.Config()
    entries = [{"name": n, "path": p} for n, p in BROAD]
    entries += [{"name": f"mmlu_{s}", "path": f"eval/mmlu_{s}_test.csv.gz"} for s in MMLU]
    positives, truth = paraphrase_records()
    clean = clean_records(read_raw())
    cache = Path(tempfile.gettempdir()) / "curate-bench-embeddings"  # vectors kept between runs
    print(
        f"eval sets: {', '.join(e['name'] for e in entries)}; {positives.height} MMLU paraphrases, "
        f"{clean.height:,} clean records ({', '.join(CLEAN_SOURCES)}; at most {CLEAN_PER_SOURCE} each)"
    )
    found = {}
    for agree in (False, True):
        found[agree] = (
            embedding_scores(positives, entries, cache, embedding_numbers_agree=agree),
            embedding_scores(clean, entries, cache, embedding_numbers_agree=agree),
        )
    print(f"\n{'threshold':>9} | {'numbers check off':^31} | {'numbers check on':^31}")
    columns = f"{'recall':>8}{'right':>8}{'clean dropped':>15}"
    print(f"{'':>9} | {columns} | {columns}")
    for t in (0.60, 0.65, 0.68, 0.70, 0.72, 0.75, 0.78, 0.80, 0.85):
        cells = []
        for agree in (False, True):
            pos, neg = found[agree]
            hit = [i for i, e in enumerate(pos) if e and e["score"] >= t]
            right = [i for i in hit if (pos[i]["eval_set"], pos[i]["eval_id"]) == truth[i]]
            dropped = sum(1 for e in neg if e and e["score"] >= t)
            cells.append(
                f"{len(hit) / len(pos):>8.3f}{len(right) / len(pos):>8.3f}"
                f"{dropped:>8} {100 * dropped / len(neg):>5.2f}%"
            )
        mark = "  <- default" if abs(t - default.embedding_threshold) < 1e-9 else ""
        print(f"{t:>9.2f} | {cells[0]} | {cells[1]}{mark}")
    neg = found[default.embedding_numbers_agree][1]
    drops = sorted(
        ((e["score"], i) for i, e in enumerate(neg) if e and e["score"] >= default.embedding_threshold),
        reverse=True,
    )
    print(f"\nclean records dropped at the defaults ({len(drops)}), highest score first:")
    user = conversation_text(clean, "user").to_list()
    for score, i in drops:
        e = neg[i]
        print(f"{score:.3f} {e['eval_set']}:{e['eval_id']}  eval: {e['eval_text'][:90]!r}")
        print(f"       record: {user[i][:100]!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--embed-sample", type=int, default=256, help="records encoded for the embedding figure"
    )
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs of each; the fastest counts (shared CPUs)"
    )
    parser.add_argument(
        "--paraphrase", action="store_true", help="measure the embedding method's recall and clean drops"
    )
    args = parser.parse_args()
    if args.paraphrase:
        paraphrase_study()
        return

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
