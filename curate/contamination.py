"""Matching training records against eval items: the methods decontamination and its checks share.

Four methods, each with its own score:

- exact: an eval question, normalized, occurs whole inside the record (or equals a user turn);
- ngram: the record shares word n-grams with an eval question (GPT-3 / lm-eval-harness style:
  lowercase, punctuation removed, 13-grams by default), optionally with eval answers too;
- minhash: the record's user turns are near-duplicates of an eval question (estimated Jaccard);
- embedding: the record's user turns paraphrase an eval question (cosine of sentence embeddings);
  where both state numbers they must share one, and an LLM judge may confirm each candidate.

The decontaminate stage runs them on each batch of records; the runner uses the exact method to
refuse a version that still holds an eval item (`EvalCopies`); the report counts what was found.
Each finder returns a table of hits (doc = record in the batch, item = eval item, score, match).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

from curate.errors import CurateError
from curate.evalsets import EvalSet, load_eval_sets
from curate.text.conversation import conversation_text
from curate.text.minhash import jaccard_estimate, signatures
from curate.text.ngrams import SpanIndex, Tokens, span, tokenize

METHODS = ("exact", "ngram", "minhash", "embedding")
_SNIPPET = 200  # characters of matched text kept as evidence
_NUMBER = re.compile(r"(\d+(?:[.,]\d+)*)(s\b)?")  # a trailing s: a decade, "1980s"


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


class Matcher:
    """The chosen methods, with every index over the eval items built once: `find(batch)` gives the
    hits of each method in a batch of records."""

    def __init__(self, catalog: EvalCatalog, options, embedder=None, judge=None) -> None:
        self.catalog, self.cfg = catalog, options
        methods = set(options.methods)
        questions = catalog.question_tokens()
        common = options.ngram_max_items
        self.index = SpanIndex(questions, options.ngram, common) if {"exact", "ngram"} & methods else None
        self.answers = None
        if "ngram" in methods and options.match_answers:
            self.answers = SpanIndex(catalog.answers, options.ngram, common)
        self.shingles = SpanIndex(questions, options.minhash_ngram) if "minhash" in methods else None
        self.embedder, self.judge = embedder, judge  # judge: a curate.llm RequestEngine
        if "embedding" in methods:
            views = [
                (item, view) for item, question in enumerate(catalog.questions) for view in _views(question)
            ]
            self.view_item = np.array([item for item, _ in views], np.int64)
            self.view_numbers = [numbers_in(view) for _, view in views]
            self.eval_vectors = embedder.encode([view for _, view in views])

    def __getstate__(self) -> dict:
        """Shipped to other processes without the model and the judge, which each loads its own."""
        return {**self.__dict__, "embedder": None, "judge": None}

    def attached(self, embedder=None, judge=None) -> Matcher:
        """This matcher, shipped from another process, with this process's model and judge."""
        self.embedder, self.judge = embedder, judge
        return self

    def find(self, batch: pa.Table) -> dict[str, pl.DataFrame]:
        cfg, catalog = self.cfg, self.catalog
        table = pl.from_arrow(batch)
        found: dict[str, pl.DataFrame] = {}
        records = RecordTokens(table)
        key = "user" if cfg.user_turns_only else "conversation"
        tokens = records.user if cfg.user_turns_only else records.conversation
        if "exact" in cfg.methods:
            hits = exact_hits(self.index, tokens, records, cfg.exact_min_words)
            texts = records.texts(hits["doc"], key)
            spans = [
                turn if turn is not None else span(text, p, n)
                for text, (p, n, turn) in zip(texts, hits.select("pos", "length", "turn").rows(), strict=True)
            ]
            found["exact"] = hits.with_columns(pl.Series("match", spans, dtype=pl.String))
        if "ngram" in cfg.methods:
            parts = [
                _ngram_hits(self.index, tokens, cfg.ngram_min_matches).with_columns(
                    pl.lit("question").alias("part")
                )
            ]
            if self.answers is not None:
                parts.append(
                    _ngram_hits(self.answers, tokens, cfg.ngram_min_matches).with_columns(
                        pl.lit("answer").alias("part")
                    )
                )
            hits = _pick(pl.concat(parts, how="vertical_relaxed"))
            texts = records.texts(hits["doc"], key)
            spans = [span(text, p, cfg.ngram) for text, p in zip(texts, hits["pos"], strict=True)]
            found["ngram"] = hits.with_columns(pl.Series("match", spans, dtype=pl.String))
        if "minhash" in cfg.methods:
            found["minhash"] = _minhash_hits(
                catalog,
                records,
                self.shingles,
                cfg.minhash_threshold,
                cfg.minhash_num_perm,
                cfg.minhash_ngram,
            )
        if "embedding" in cfg.methods:
            found["embedding"] = self._embedding_hits(conversation_text(table, "user"))
        return found

    def _embedding_hits(self, texts: pl.Series) -> pl.DataFrame:
        """Paraphrases of eval questions: best cosine of each record's user text over all question
        views, from the threshold (or the judge's candidate score) up, numbers agreeing."""
        cfg = self.cfg
        docs = np.flatnonzero(texts.str.strip_chars().str.len_chars().to_numpy() > 0)
        vectors = self.embedder.encode(texts.gather(docs).to_list())
        best_score = np.full(len(docs), -1.0, np.float32)
        best_view = np.zeros(len(docs), np.int64)
        for start in range(0, len(docs), 4096):
            sims = vectors[start : start + 4096] @ self.eval_vectors.T
            best_view[start : start + 4096] = sims.argmax(axis=1)
            best_score[start : start + 4096] = sims.max(axis=1)
        lowest = cfg.judge_candidates if cfg.judge else cfg.embedding_threshold
        found = np.flatnonzero(best_score >= lowest)
        matches = texts.gather(docs[found])
        if cfg.embedding_numbers_agree:
            agree = [
                _share_numbers(numbers_in(text), self.view_numbers[view])
                for text, view in zip(matches, best_view[found], strict=True)
            ]
            found, matches = found[agree], matches.filter(pl.Series(agree, dtype=pl.Boolean))
        hits = pl.DataFrame(
            {
                "doc": docs[found],
                "item": self.view_item[best_view[found]],
                "score": best_score[found].astype(np.float64),
                "match": matches,
            }
        )
        return self._judged(hits) if cfg.judge else hits

    def _judged(self, candidates: pl.DataFrame) -> pl.DataFrame:
        """The candidates an LLM confirms as restating their eval question (asked all at once, each
        answer cached). A candidate the judge could not answer is an error, never a silent keep."""
        from curate.llm import Failure, Request

        requests = [
            Request(
                [
                    {"role": "system", "content": _JUDGE_SYSTEM},
                    {
                        "role": "user",
                        "content": _JUDGE_ASK.format(
                            question=self.catalog.questions[item][:4000], example=(example or "")[:4000]
                        ),
                    },
                ]
            )
            for item, example in candidates.select("item", "match").rows()
        ]
        replies = self.judge.run(requests)
        failed = next((r for r in replies if isinstance(r, Failure)), None)
        if failed is not None:
            raise CurateError(f"the contamination judge could not answer: {failed.message}")
        verdicts = [r.text.strip().lower().startswith("yes") for r in replies]
        return candidates.filter(pl.Series(verdicts, dtype=pl.Boolean)).with_columns(
            pl.lit(self.cfg.judge_model).alias("judge")
        )


class EvalCopies:
    """Exact copies of eval questions in records: what the runner checks before writing a version."""

    def __init__(self, eval_sets: list[dict], base_dir: Path, min_words: int = 4) -> None:
        self.catalog = EvalCatalog(load_eval_sets(eval_sets, Path(base_dir)))
        self.index = SpanIndex(self.catalog.questions, 13)
        self.min_words = min_words

    def find(self, batch: pa.Table) -> list[dict]:
        """{id, eval_set, eval_id} of each record of the batch holding an eval question."""
        if not batch.num_rows:
            return []
        records = RecordTokens(pl.from_arrow(batch.select(["messages"])))
        hits = exact_hits(self.index, records.conversation, records, self.min_words)
        ids = batch["id"].to_pylist()
        catalog = self.catalog
        return [
            {
                "id": ids[doc],
                "eval_set": catalog.set_names[catalog.set_of[item]],
                "eval_id": catalog.ids[item],
            }
            for doc, item in hits.sort("doc").select("doc", "item").rows()
        ]


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


def _minhash_hits(
    catalog: EvalCatalog, records: RecordTokens, index: SpanIndex, threshold: float, num_perm: int, ngram: int
) -> pl.DataFrame:
    """Near-duplicates of eval questions: estimated Jaccard of word-shingle MinHash signatures.

    Jaccard >= t needs at least t * |B| shingles shared with eval item B, so only pairs that share
    that many word n-grams in the n-gram index are candidates (half the bound, to leave room for the
    shingler's word split differing from this normalization); signatures are then computed for
    those records and items alone, with the dedup kernels, and compared pairwise.
    """
    shared = index.ngram_hits(records.user)
    need = 0.5 * threshold * index.ngram_counts[shared["item"].to_numpy()]
    cand = shared.filter(pl.Series(shared["matches"].to_numpy() >= need))
    docs, doc_row = np.unique(cand["doc"].to_numpy(), return_inverse=True)
    items, item_row = np.unique(cand["item"].to_numpy(), return_inverse=True)
    sig_kw = {"num_perm": num_perm, "ngram": ngram, "unit": "word", "seed": 1}
    texts = records.texts(docs, "user")
    rec_sigs = signatures(texts, **sig_kw)
    eval_sigs = signatures([catalog.questions[i] for i in items.tolist()], **sig_kw)
    score = jaccard_estimate(rec_sigs[doc_row], eval_sigs[item_row]) if cand.height else np.zeros(0)
    hits = cand.select("doc", "item").with_columns(
        pl.Series("score", np.asarray(score, np.float64)),
        pl.Series("match", [texts[r] for r in doc_row.tolist()], dtype=pl.String),
    )
    return _pick(hits.filter(pl.col("score") >= threshold))


def _views(question: str) -> list[str]:
    """What a paraphrase of an eval question may resemble: the question, and for a question after a
    passage (MMLU history, reading comprehension) its last paragraph on its own."""
    views = [question]
    last = question.strip().rsplit("\n", 1)[-1].strip()
    if last and last != question.strip():
        views.append(last)
    return views


def numbers_in(text: str) -> frozenset[str]:
    """The numbers a text states, each written one way ("1,000", "1000" and "1000.0" alike); a
    decade also as its short form, since paraphrases write "the 1980s" as "the 80s"."""
    out = set()
    for number, decade in _NUMBER.findall(text):
        number = number.replace(",", "")
        if "." in number:
            number = number.rstrip("0").rstrip(".")
        out.add(number.lstrip("0") or "0")
        if decade and len(number) == 4:
            out.add(number[2:])
    return frozenset(out)


def _share_numbers(record: frozenset[str], question: frozenset[str]) -> bool:
    """False only when both state numbers and none is shared: a paraphrase keeps its quantities (a
    tip on $50 at 15% is not the eval's tip on $47.50 at 14%), while a restatement may drop them
    all (a HumanEval task without its doctest examples)."""
    return not (record and question) or bool(record & question)


_JUDGE_SYSTEM = "You check training data for benchmark contamination. Answer with one word: yes or no."
_JUDGE_ASK = (
    "Benchmark question:\n{question}\n\nTraining example:\n{example}\n\n"
    "Does the training example pose the same question as the benchmark question, possibly reworded, "
    "translated or reformatted, so that a model trained on it would have seen the benchmark item? "
    "Answer yes or no."
)


def evidence(found: dict[str, pl.DataFrame], catalog: EvalCatalog) -> dict[int, dict]:
    """{record: evidence} of every flagged record: the first method in METHODS order that fired leads
    the evidence, and `hits` lists the best hit of each method that fired."""
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
    out = {}
    for doc, hits in per_doc.items():
        lead = dict(hits[0])
        lead["hits"] = [{k: h[k] for k in ("eval_set", "eval_id", "method", "score")} for h in hits]
        out[doc] = lead
    return out
