"""decontaminate: drop training records that overlap a declared eval set, with the overlap as evidence.

Four methods, combinable, each with its own threshold:

- exact: an eval question, normalized, occurs whole inside the record (or equals a user turn);
- ngram: the record shares word n-grams with an eval question (GPT-3 / lm-eval-harness style:
  lowercase, punctuation removed, 13-grams by default), optionally with eval answers too;
- minhash: the record's user turns are near-duplicates of an eval question (estimated Jaccard);
- embedding: the record's user turns paraphrase an eval question (cosine of sentence embeddings).

A dropped record's evidence names the best hit (eval set, eval item id, method, score, the matched
n-gram or span) and lists the best hit of every method that fired, so the report can count, per
eval set, which items were found and how.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import polars as pl

from curate.errors import RecipeError
from curate.evalsets import EvalSet, load_eval_sets
from curate.stages.base import Drop, TableStage, TableVerdicts, files_token, option, register
from curate.text.conversation import conversation_text
from curate.text.ngrams import SpanIndex, Tokens, span, tokenize

Method = Literal["exact", "ngram", "minhash", "embedding"]
METHODS = ("exact", "ngram", "minhash", "embedding")
_SNIPPET = 200  # characters of matched text kept as evidence


@dataclass
class DecontaminateConfig:
    methods: list[Method] = option(
        ["exact", "ngram", "minhash"],
        help="Methods to run, any of exact, ngram, minhash, embedding; a record is dropped when any fires.",
    )
    eval_sets: list[str] = option([], help="Names of the recipe's eval sets to check against; empty: all.")
    user_turns_only: bool = option(
        False, help="exact and ngram look at the user turns only (default: every non-system turn)."
    )
    exact_min_words: int = option(
        4,
        help="An eval question of at least this many words is found anywhere inside a record; a shorter "
        "one only when a whole user turn equals it.",
    )
    ngram: int = option(13, help="n of the word n-grams (13 as in GPT-3 and lm-eval-harness).")
    ngram_min_matches: int = option(1, help="Distinct shared n-grams with one eval item needed to drop.")
    match_answers: bool = option(False, help="Also match n-grams of the eval items' answers.")
    minhash_threshold: float = option(
        0.7, help="Estimated Jaccard of word 5-gram shingles (user turns vs eval question) to drop."
    )
    minhash_num_perm: int = option(128, help="MinHash permutations.")
    minhash_ngram: int = option(
        5, help="Words per MinHash shingle; questions shorter than this are left to the exact method."
    )
    embedding_threshold: float = option(
        0.7, help="Cosine similarity (user turns vs eval question) to drop as a paraphrase."
    )
    embedding_model: str = option(
        "", help="sentence-transformers model folder; empty: bundled all-MiniLM-L6-v2."
    )
    embedding_max_tokens: int = option(128, help="Tokens of each text the embedding model reads.")
    embedding_batch_size: int = option(64, help="Texts per embedding batch.")
    judge: bool = option(
        False,
        help="Ask an LLM whether each embedding candidate restates its eval question (as LMSYS's "
        "llm-decontaminator does); only confirmed candidates are dropped.",
    )
    judge_candidates: float = option(0.5, help="Cosine from which an embedding match goes to the judge.")
    judge_provider: Literal["openai", "anthropic"] = option(
        "openai", help="openai (or compatible) or anthropic."
    )
    judge_model: str = option("", help="The judge's model name, e.g. gpt-4o-mini.")
    judge_base_url: str = option(
        "", help="An OpenAI-compatible endpoint (vLLM, Ollama, ...); empty: the provider's."
    )
    judge_api_key_env: str = option(
        "", help="Environment variable holding the API key; empty: OPENAI_API_KEY or ANTHROPIC_API_KEY."
    )

    def check(self) -> None:
        if not self.methods:
            raise ValueError("methods: give at least one of exact, ngram, minhash, embedding")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods: each method once, got {self.methods}")
        for name in ("exact_min_words", "ngram", "ngram_min_matches", "minhash_num_perm", "minhash_ngram"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.judge and ("embedding" not in self.methods or not self.judge_model):
            raise ValueError("judge needs the embedding method and a judge_model")
        for name in ("minhash_threshold", "embedding_threshold", "judge_candidates"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in (0, 1]")


class EvalCatalog:
    """Every item of the chosen eval sets in one flat list, so kernels address items by row."""

    def __init__(self, sets: list[EvalSet]) -> None:
        self.set_names = [s.name for s in sets]
        self.set_of = np.concatenate([np.full(len(s), i, np.int64) for i, s in enumerate(sets)] or [[]])
        items = [item for s in sets for item in s.items]
        self.ids = [item.id for item in items]
        self.questions = [item.question for item in items]
        self.answers = [item.answer or "" for item in items]
        self._question_tokens: Tokens | None = None

    def question_tokens(self) -> Tokens:
        """The questions tokenized once, for every index built over them."""
        if self._question_tokens is None:
            self._question_tokens = tokenize(self.questions)
        return self._question_tokens

    def hit(self, item: int, method: str, score: float, match: str, **extra) -> dict:
        """The evidence of one match with eval item `item`."""
        return {
            "eval_set": self.set_names[self.set_of[item]],
            "eval_id": self.ids[item],
            "method": method,
            "score": round(float(score), 4),
            "match": match[:_SNIPPET],
            **extra,
        }


def _pick(hits: pl.DataFrame) -> pl.DataFrame:
    """The best hit per record: highest score, then the earliest eval item."""
    return hits.sort("doc", "score", "item", descending=[False, True, False]).unique("doc", keep="first")


def exact_hits(index: SpanIndex, tokens: Tokens, records: RecordTokens, min_words: int):
    """Records containing a whole eval question (>= min_words words) or with a user turn equal to one."""
    inside = index.contained(tokens, min_words).with_columns(
        pl.lit(1.0).alias("score"), pl.lit(None, pl.String).alias("turn")
    )
    turn_docs, turn_tokens = records.turn_docs, records.user_turns
    equal = index.equal(turn_tokens, min_words)
    if equal.height:
        turn = equal["doc"].to_numpy()
        equal = pl.DataFrame(
            {
                "doc": turn_docs[turn],
                "item": equal["item"],
                "pos": np.zeros(len(turn), np.int64),
                "length": turn_tokens.lengths()[turn],
                "score": np.ones(len(turn)),
                "turn": [span(records.turn_texts[t] or "", 0, _SNIPPET) for t in turn.tolist()],
            }
        )
        inside = pl.concat([inside, equal], how="vertical_relaxed")
    return _pick(inside)


class RecordTokens:
    """One tokenization of every non-system turn, seen three ways: the whole conversation of each
    record, its user turns joined, and each user turn on its own (for whole-turn equality)."""

    def __init__(self, table: pl.DataFrame) -> None:
        self.table = table
        turns = (
            table.select(pl.int_range(pl.len(), dtype=pl.Int64).alias("doc"), pl.col("messages"))
            .explode("messages")
            .select(
                "doc", pl.col("messages").struct.field("role"), pl.col("messages").struct.field("content")
            )
            .filter(pl.col("role") != "system")
        )
        docs = turns["doc"].to_numpy()
        every = tokenize(turns["content"])
        user = np.flatnonzero((turns["role"] == "user").to_numpy())
        self.conversation = every.join(docs, table.height)
        self.turn_docs = docs[user]
        self.turn_texts = turns["content"].gather(user)
        self.user_turns = every.select(user)
        self.user = self.user_turns.join(self.turn_docs, table.height)

    def texts(self, docs: np.ndarray | list[int], key: str) -> list[str]:
        """The conversation or user text of some records (only flagged ones need their text)."""
        return conversation_text(self.table[np.asarray(docs, np.int64)], key).to_list()


def _ngram_hits(index: SpanIndex, tokens: Tokens, min_matches: int) -> pl.DataFrame:
    hits = index.ngram_hits(tokens).filter(pl.col("matches") >= min_matches)
    counts = pl.Series(index.ngram_counts[hits["item"].to_numpy()])
    return _pick(hits.with_columns((pl.col("matches") / counts).alias("score")))


def _minhash_hits(catalog: EvalCatalog, records: RecordTokens, cfg: DecontaminateConfig) -> pl.DataFrame:
    """Near-duplicates of eval questions: estimated Jaccard of word-shingle MinHash signatures.

    Jaccard >= t needs at least t * |B| shingles shared with eval item B, so only pairs that share
    that many word n-grams in the n-gram index are candidates (half the bound, to leave room for the
    shingler's word split differing from this normalization); signatures are then computed for
    those records and items alone, with the dedup kernels, and compared pairwise.
    """
    from curate.text.minhash import jaccard_estimate, signatures

    index = SpanIndex(catalog.question_tokens(), cfg.minhash_ngram)
    shared = index.ngram_hits(records.user)
    need = 0.5 * cfg.minhash_threshold * index.ngram_counts[shared["item"].to_numpy()]
    cand = shared.filter(pl.Series(shared["matches"].to_numpy() >= need))
    docs, doc_row = np.unique(cand["doc"].to_numpy(), return_inverse=True)
    items, item_row = np.unique(cand["item"].to_numpy(), return_inverse=True)
    sig_kw = {"num_perm": cfg.minhash_num_perm, "ngram": cfg.minhash_ngram, "unit": "word", "seed": 1}
    texts = records.texts(docs, "user")
    rec_sigs = signatures(texts, **sig_kw)
    eval_sigs = signatures([catalog.questions[i] for i in items.tolist()], **sig_kw)
    score = jaccard_estimate(rec_sigs[doc_row], eval_sigs[item_row]) if cand.height else np.zeros(0)
    hits = cand.select("doc", "item").with_columns(
        pl.Series("score", np.asarray(score, np.float64)),
        pl.Series("match", [texts[r] for r in doc_row.tolist()], dtype=pl.String),
    )
    return _pick(hits.filter(pl.col("score") >= cfg.minhash_threshold))


def _views(question: str) -> list[str]:
    """What a paraphrase of an eval question may resemble: the question, and for a question after a
    passage (MMLU history, reading comprehension) its last paragraph on its own."""
    views = [question]
    last = question.strip().rsplit("\n", 1)[-1].strip()
    if last and last != question.strip():
        views.append(last)
    return views


def _embedding_hits(catalog: EvalCatalog, texts: pl.Series, cfg: DecontaminateConfig, ctx) -> pl.DataFrame:
    """Paraphrases of eval questions: best cosine of each record's user text over all question views."""
    from curate.embed import Embedder

    embedder = Embedder(
        cfg.embedding_model,
        ctx.cache_dir,
        batch_size=cfg.embedding_batch_size,
        max_seq_length=cfg.embedding_max_tokens,
    )
    view_item, view_text = [], []
    for item, question in enumerate(catalog.questions):
        for view in _views(question):
            view_item.append(item)
            view_text.append(view)
    eval_vecs = embedder.encode(view_text)
    before = embedder.encoded
    docs = np.flatnonzero(texts.str.strip_chars().str.len_chars().to_numpy() > 0)
    rec_vecs = embedder.encode(texts.gather(docs).to_list(), progress=ctx.advance)
    ctx.advance(len(texts) - (embedder.encoded - before))  # records read from the cache or without text
    best_score = np.full(len(docs), -1.0, np.float32)
    best_view = np.zeros(len(docs), np.int64)
    for start in range(0, len(docs), 4096):
        sims = rec_vecs[start : start + 4096] @ eval_vecs.T
        best_view[start : start + 4096] = sims.argmax(axis=1)
        best_score[start : start + 4096] = sims.max(axis=1)
    view_item = np.asarray(view_item, np.int64)
    hits = pl.DataFrame(
        {
            "doc": docs,
            "item": view_item[best_view],
            "score": best_score.astype(np.float64),
            "match": texts.gather(docs),
        }
    )
    if not cfg.judge:
        return hits.filter(pl.col("score") >= cfg.embedding_threshold)
    return _judged(hits.filter(pl.col("score") >= cfg.judge_candidates), catalog, cfg, ctx)


_JUDGE_SYSTEM = "You check training data for benchmark contamination. Answer with one word: yes or no."
_JUDGE_ASK = (
    "Benchmark question:\n{question}\n\nTraining example:\n{example}\n\n"
    "Does the training example pose the same question as the benchmark question, possibly reworded, "
    "translated or reformatted, so that a model trained on it would have seen the benchmark item? "
    "Answer yes or no."
)


def _judged(candidates: pl.DataFrame, catalog: EvalCatalog, cfg: DecontaminateConfig, ctx) -> pl.DataFrame:
    """The candidates an LLM confirms as restating their eval question (each request cached on disk)."""
    client = ctx.llm_client(
        cfg.judge_provider,
        cfg.judge_model,
        base_url=cfg.judge_base_url,
        api_key_env=cfg.judge_api_key_env,
        max_tokens=4,
    )
    verdicts = []
    for item, example in candidates.select("item", "match").rows():
        ask = _JUDGE_ASK.format(question=catalog.questions[item][:4000], example=(example or "")[:4000])
        reply = client.complete(
            [{"role": "system", "content": _JUDGE_SYSTEM}, {"role": "user", "content": ask}]
        )
        verdicts.append(reply.strip().lower().startswith("yes"))
    return candidates.filter(pl.Series(verdicts, dtype=pl.Boolean)).with_columns(
        pl.lit(cfg.judge_model).alias("judge")
    )


@register
class DecontaminateStage(TableStage):
    """Drop records that overlap a declared eval set (exact, n-gram, MinHash, embedding paraphrase)."""

    name = "decontaminate"
    Config = DecontaminateConfig

    def cache_token(self) -> str:
        """The eval sets' entries and file contents: a changed eval file must not reuse cached verdicts."""
        base = self.context.base_dir
        files = [base / e["path"] for e in self.context.eval_sets if not str(e["path"]).startswith("hf:")]
        return json.dumps(self.context.eval_sets, sort_keys=True) + files_token(
            [f for f in files if f.exists()]
        )

    def setup(self) -> None:
        entries = self.context.eval_sets
        known = [e.get("name") for e in entries]
        missing = [n for n in self.config.eval_sets if n not in known]
        if missing:
            raise RecipeError(
                f"decontaminate.eval_sets: '{missing[0]}' is not a declared eval set",
                hint=f"the recipe's eval_sets are: {', '.join(map(str, known)) or 'none'}",
            )
        if not entries:
            raise RecipeError(
                "decontaminate: the recipe declares no eval_sets",
                hint="add eval_sets: [{name, path}] to the recipe",
            )
        chosen = [e for e in entries if not self.config.eval_sets or e["name"] in self.config.eval_sets]
        self.catalog = EvalCatalog(load_eval_sets(chosen, self.context.base_dir))

    def apply(self, table: pl.DataFrame) -> TableVerdicts:
        cfg, catalog = self.config, self.catalog
        found: dict[str, pl.DataFrame] = {}
        records = RecordTokens(table)
        key = "user" if cfg.user_turns_only else "conversation"
        if "exact" in cfg.methods or "ngram" in cfg.methods:
            tokens = records.user if cfg.user_turns_only else records.conversation
            index = SpanIndex(catalog.question_tokens(), cfg.ngram)
            if "exact" in cfg.methods:
                hits = exact_hits(index, tokens, records, cfg.exact_min_words)
                texts = records.texts(hits["doc"], key)
                spans = [
                    turn if turn is not None else span(text, p, n)
                    for text, (p, n, turn) in zip(
                        texts, hits.select("pos", "length", "turn").rows(), strict=True
                    )
                ]
                found["exact"] = hits.with_columns(pl.Series("match", spans, dtype=pl.String))
            if "ngram" in cfg.methods:
                parts = [
                    _ngram_hits(index, tokens, cfg.ngram_min_matches).with_columns(
                        pl.lit("question").alias("part")
                    )
                ]
                if cfg.match_answers:
                    answers = SpanIndex(catalog.answers, cfg.ngram)
                    parts.append(
                        _ngram_hits(answers, tokens, cfg.ngram_min_matches).with_columns(
                            pl.lit("answer").alias("part")
                        )
                    )
                hits = _pick(pl.concat(parts, how="vertical_relaxed"))
                texts = records.texts(hits["doc"], key)
                spans = [span(text, p, cfg.ngram) for text, p in zip(texts, hits["pos"], strict=True)]
                found["ngram"] = hits.with_columns(pl.Series("match", spans, dtype=pl.String))
        if "minhash" in cfg.methods:
            found["minhash"] = _minhash_hits(catalog, records, cfg)
        if "embedding" in cfg.methods:
            prompts = conversation_text(table, "user")
            found["embedding"] = _embedding_hits(catalog, prompts, cfg, self.context)
        verdicts = _verdicts(table.height, found, catalog)
        if "embedding" not in cfg.methods:
            self.context.advance(table.height)
        return TableVerdicts(verdicts)


def _verdicts(n: int, found: dict[str, pl.DataFrame], catalog: EvalCatalog) -> list:
    """One Drop per flagged record: the first method in METHODS order that fired leads the evidence."""
    per_doc: dict[int, list[dict]] = {}
    for method in METHODS:
        hits = found.get(method)
        if hits is None or not hits.height:
            continue
        for row in hits.iter_rows(named=True):
            doc, item = row["doc"], row["item"]
            extra = {}
            if method == "ngram":
                extra = {"matches": int(row["matches"]), "part": row["part"]}
            hit = catalog.hit(item, method, row["score"], row["match"] or "", **extra)
            if method in ("minhash", "embedding"):
                hit["eval_text"] = catalog.questions[item][:_SNIPPET]
            if row.get("judge"):
                hit["judge"] = row["judge"]
            per_doc.setdefault(doc, []).append(hit)
    verdicts: list = [None] * n
    for doc, hits in per_doc.items():
        lead = dict(hits[0])
        lead["hits"] = [{k: h[k] for k in ("eval_set", "eval_id", "method", "score")} for h in hits]
        verdicts[doc] = Drop("eval_overlap", lead)
    return verdicts


def exact_eval_copies(
    table: pl.DataFrame, eval_sets: list[dict], base_dir: Path, min_words: int = 4
) -> list[dict]:
    """Kept records that still hold an exact copy of an eval question: {id, eval_set, eval_id} each.

    The runner calls this before writing a version; hash lookups only, so it is cheap.
    """
    if not eval_sets or not table.height:
        return []
    catalog = EvalCatalog(load_eval_sets(eval_sets, Path(base_dir)))
    index = SpanIndex(catalog.questions, 13)
    records = RecordTokens(table)
    hits = exact_hits(index, records.conversation, records, min_words)
    ids = table["id"]
    return [
        {"id": ids[doc], "eval_set": catalog.set_names[catalog.set_of[item]], "eval_id": catalog.ids[item]}
        for doc, item in hits.sort("doc").select("doc", "item").rows()
    ]
