"""The n-gram index behind decontamination: which training texts share word n-grams with eval items.

Texts are normalized as GPT-3 and lm-eval-harness do (lowercase, punctuation and symbols removed,
split on whitespace), words are hashed once in polars, and every word window is hashed from prefix
sums (a polynomial hash mod 2^64), so a window of any length costs two array operations. That gives
two lookups over one tokenization: n-gram overlap (`SpanIndex.ngram_hits`) and whole-item
containment, an exact copy of an eval item inside a training text (`SpanIndex.contained`).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl

_PUNCT = r"[\p{P}\p{S}]"
_BASE = np.uint64(0x9E3779B97F4A7C15)  # odd, so it has an inverse mod 2^64
_BASE_INV = np.uint64(pow(int(_BASE), -1, 1 << 64))
_SEED = 0x5EED


def normalize(text: str) -> str:
    """One text normalized in plain Python: the reference that `tokenize` must agree with."""
    kept = "".join(c for c in text.lower() if unicodedata.category(c)[0] not in "PS")
    return " ".join(kept.split())


def normalized(texts: pl.Series) -> pl.Series:
    """Each text normalized (words joined by one space), column-wise; equal to `normalize` per text."""
    return _normalized_words(texts).list.join(" ")


def _normalized_words(texts: pl.Series) -> pl.Series:
    return (
        texts.cast(pl.String)
        .fill_null("")
        .str.to_lowercase()
        .str.replace_all(_PUNCT, "")
        .str.extract_all(r"\S+")
    )


@dataclass
class Tokens:
    """Normalized texts as word hashes laid end to end, with each text's start offset."""

    words: pl.Series  # list[str] per text, kept to show the matched span as evidence
    hashes: np.ndarray  # uint64 hash of each word, all texts concatenated
    offsets: np.ndarray  # int64, len(texts) + 1

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def span(self, doc: int, start: int, length: int) -> str:
        """The normalized words [start, start + length) of one text, for evidence."""
        return " ".join(self.words[doc][start : start + length].to_list())


def tokenize(texts: Sequence[str] | pl.Series) -> Tokens:
    """Normalize and hash the words of many texts at once (polars does the string work in Rust)."""
    words = _normalized_words(pl.Series("text", texts, dtype=pl.String))
    lengths = words.list.len().fill_null(0).to_numpy().astype(np.int64)
    flat = words.explode().drop_nulls()
    hashes = flat.hash(seed=_SEED).to_numpy() if len(flat) else np.zeros(0, np.uint64)
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return Tokens(words, hashes.astype(np.uint64, copy=False), offsets)


class _Windows:
    """Prefix hashes of a token run, so any window's hash is (P[i+L] - P[i]) * B^-i."""

    def __init__(self, hashes: np.ndarray) -> None:
        n = len(hashes)
        powers = np.empty(n, np.uint64)
        inv_powers = np.empty(n, np.uint64)
        if n:
            powers[0] = inv_powers[0] = 1
            powers[1:] = _BASE
            inv_powers[1:] = _BASE_INV
            np.cumprod(powers, out=powers)
            np.cumprod(inv_powers, out=inv_powers)
        self.prefix = np.zeros(n + 1, np.uint64)
        np.cumsum(hashes * powers, out=self.prefix[1:])
        self.inv_powers = inv_powers

    def at(self, starts: np.ndarray, length: int | np.ndarray) -> np.ndarray:
        return (self.prefix[starts + length] - self.prefix[starts]) * self.inv_powers[starts]


def _window_starts(offsets: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Start positions of every window of `length` words that lies inside one text, and its text."""
    lengths = np.diff(offsets)
    counts = np.maximum(lengths - length + 1, 0)
    docs = np.repeat(np.arange(len(lengths), dtype=np.int64), counts)
    if not len(docs):
        return docs, docs
    first = np.repeat(offsets[:-1] - np.concatenate(([0], np.cumsum(counts)[:-1])), counts)
    return first + np.arange(len(docs), dtype=np.int64), docs


def _expand(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All indices of the ranges [lo, hi) laid end to end, and each range's length."""
    reps = hi - lo
    return np.repeat(lo - np.concatenate(([0], np.cumsum(reps)[:-1])), reps) + np.arange(reps.sum()), reps


class _HashSet:
    """Sorted unique uint64 keys with a bitmap in front: most training windows miss the eval set."""

    def __init__(self, keys: np.ndarray) -> None:
        self.keys = np.unique(keys)
        # about 16 slots per key (at most 64 MiB), so few misses reach the binary search
        self.shift = np.uint64(64 - int(np.clip(np.ceil(np.log2(len(self.keys) * 16 + 1)), 8, 26)))
        self.bitmap = np.zeros(1 << (64 - int(self.shift)), np.bool_)
        self.bitmap[self.keys >> self.shift] = True

    def find(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Indices of the queries that are keys, and each one's position in `keys`."""
        maybe = np.flatnonzero(self.bitmap[queries >> self.shift])
        pos = np.searchsorted(self.keys, queries[maybe])
        pos = np.minimum(pos, len(self.keys) - 1)
        hit = self.keys[pos] == queries[maybe] if len(self.keys) else np.zeros(len(maybe), np.bool_)
        return maybe[hit], pos[hit]


class SpanIndex:
    """Word n-grams and whole-text hashes of a fixed list of texts (the eval items' parts).

    `ngram_hits` reports every (training text, item text) pair sharing an n-gram, with the number
    of distinct shared n-grams; `contained` reports items whose whole text occurs in a training text.
    """

    def __init__(self, texts: Sequence[str], n: int = 13, chunk_words: int = 4_000_000) -> None:
        self.n = n
        self.chunk_words = chunk_words
        self.tokens = tokenize(texts)
        lengths = self.tokens.lengths()
        self.lengths = lengths
        windows = _Windows(self.tokens.hashes)
        starts, owners = _window_starts(self.tokens.offsets, n)
        grams = windows.at(starts, n)
        # item n-grams, deduplicated per item: (hash, item) pairs grouped by hash
        pairs = pl.DataFrame({"h": grams, "item": owners}).unique().sort("h", "item")
        self._gram_set = _HashSet(pairs["h"].to_numpy())
        self._gram_rows = np.searchsorted(pairs["h"].to_numpy(), self._gram_set.keys)
        self._gram_rows = np.r_[self._gram_rows, pairs.height]
        self._gram_items = pairs["item"].to_numpy()
        self.ngram_counts = np.bincount(self._gram_items, minlength=len(lengths))
        # whole texts: the hash of all their words, and their first min(len, n) words as an anchor
        nonempty = np.flatnonzero(lengths > 0)
        first = self.tokens.offsets[:-1][nonempty]
        self._whole = windows.at(first, lengths[nonempty])
        self._whole_items = nonempty
        anchor_len = np.minimum(lengths[nonempty], n)
        self._anchor_len = anchor_len
        self._anchor = windows.at(first, anchor_len)

    def _chunks(self, tokens: Tokens):
        """Runs of whole texts of about chunk_words words, so memory stays bounded on big tables."""
        offsets = tokens.offsets
        start = 0
        while start < len(tokens):
            stop = int(np.searchsorted(offsets, offsets[start] + self.chunk_words, side="right")) - 1
            stop = max(stop, start + 1)
            stop = min(stop, len(tokens))
            base = offsets[start]
            yield start, offsets[start : stop + 1] - base, tokens.hashes[base : offsets[stop]]
            start = stop

    def ngram_hits(self, tokens: Tokens) -> pl.DataFrame:
        """One row per (doc, item) sharing n-grams: `matches` distinct shared n-grams, `pos` of the first."""
        parts = []
        for doc0, offsets, hashes in self._chunks(tokens):
            starts, docs = _window_starts(offsets, self.n)
            if not len(starts):
                continue
            grams = _Windows(hashes).at(starts, self.n)
            hit, key = self._gram_set.find(grams)
            if not len(hit):
                continue
            rows, reps = _expand(self._gram_rows[key], self._gram_rows[key + 1])
            parts.append(
                pl.DataFrame(
                    {
                        "doc": np.repeat(docs[hit], reps) + doc0,
                        "item": self._gram_items[rows],
                        "pos": np.repeat(starts[hit] - offsets[docs[hit]], reps),
                        "gram": np.repeat(grams[hit], reps),
                    }
                )
            )
        if not parts:
            return pl.DataFrame(
                schema={"doc": pl.Int64, "item": pl.Int64, "matches": pl.UInt32, "pos": pl.Int64}
            )
        return (
            pl.concat(parts)
            .group_by("doc", "item")
            .agg(pl.col("gram").n_unique().alias("matches"), pl.col("pos").min())
            .sort("doc", "item")
        )

    def contained(self, tokens: Tokens, min_words: int = 1) -> pl.DataFrame:
        """One row per (doc, item) where the item's whole text occurs in the doc: `pos`, `length` in words."""
        keep = self.lengths[self._whole_items] >= min_words
        whole, items = self._whole[keep], self._whole_items[keep]
        anchors, anchor_len = self._anchor[keep], self._anchor_len[keep]
        parts = []
        for doc0, offsets, hashes in self._chunks(tokens):
            windows = _Windows(hashes)
            doc_len = np.diff(offsets)
            for length in np.unique(anchor_len):
                group = np.flatnonzero(anchor_len == length)
                order = np.argsort(anchors[group], kind="stable")
                group = group[order]
                starts, docs = _window_starts(offsets, int(length))
                if not len(starts):
                    continue
                keys = windows.at(starts, int(length))
                found = _HashSet(anchors[group])
                hit, key = found.find(keys)
                if not len(hit):
                    continue
                # every item sharing this anchor is a candidate; check its whole hash at that start
                sorted_anchor = anchors[group]
                cand, reps = _expand(
                    np.searchsorted(sorted_anchor, found.keys[key], side="left"),
                    np.searchsorted(sorted_anchor, found.keys[key], side="right"),
                )
                cand_items = group[cand]
                cand_start = np.repeat(starts[hit], reps)
                cand_doc = np.repeat(docs[hit], reps)
                full_len = self.lengths[items[cand_items]]
                fits = cand_start + full_len <= offsets[cand_doc] + doc_len[cand_doc]
                cand_items, cand_start, cand_doc, full_len = (
                    cand_items[fits],
                    cand_start[fits],
                    cand_doc[fits],
                    full_len[fits],
                )
                same = windows.at(cand_start, full_len) == whole[cand_items]
                parts.append(
                    pl.DataFrame(
                        {
                            "doc": cand_doc[same] + doc0,
                            "item": items[cand_items[same]],
                            "pos": cand_start[same] - offsets[cand_doc[same]],
                            "length": full_len[same],
                        }
                    )
                )
        if not parts:
            return pl.DataFrame(
                schema={"doc": pl.Int64, "item": pl.Int64, "pos": pl.Int64, "length": pl.Int64}
            )
        return (
            pl.concat(parts)
            .group_by("doc", "item")
            .agg(pl.col("pos").min(), pl.col("length").first())
            .sort("doc", "item")
        )
