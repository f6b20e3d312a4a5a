"""The n-gram index behind decontamination: which training texts share word n-grams with eval items.

Texts are normalized as GPT-3 and lm-eval-harness do (lowercase, punctuation and symbols removed,
split on whitespace). A compiled kernel reads the texts' UTF-8 bytes straight from Arrow and hashes
each normalized word without building strings. A word window's hash is a polynomial in its word
hashes (mod 2^64), rolled along each text by a second kernel that looks every window up in a sorted
key array behind a bitmap; no per-window array is ever built. One tokenization serves three
lookups: n-gram overlap (`SpanIndex.ngram_hits`), containment of a whole eval item, an exact copy
inside a training text (`SpanIndex.contained`), and whole-text equality (`SpanIndex.equal`).
"""

from __future__ import annotations

import functools
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

import numba
import numpy as np
import polars as pl

from curate.text.parallel import chunks_for, each_chunk
from curate.text.shingles import utf8_buffers
from curate.text.utf8 import decode_utf8

_BASE = np.uint64(0x9E3779B97F4A7C15)  # odd, so it has an inverse mod 2^64
_BASE_INV = np.uint64(pow(int(_BASE), -1, 1 << 64))
_TABLE_SIZE = 0x30000  # planes 0-2; code points above are kept as they are (no case, no punctuation)
_KEEP, _DROP, _SPACE = 0, 1, 2


def _lower_char(c: str) -> str:
    low = c.lower()
    return low if len(low) == 1 else c  # the few one-to-many lowercasings (U+0130) keep the capital


@functools.lru_cache(maxsize=1)
def _translation() -> dict[int, int | None]:
    """str.translate table: punctuation and symbols removed, other characters lowercased one by one."""
    lower, kind = _tables()
    changed = np.flatnonzero((kind == _KEEP) & (lower != np.arange(_TABLE_SIZE))).tolist()
    table: dict[int, int | None] = dict.fromkeys(np.flatnonzero(kind == _DROP).tolist())
    table.update(zip(changed, lower[changed].tolist(), strict=True))
    return table


def normalize(text: str) -> str:
    """One text normalized in plain Python: the reference that `tokenize` must agree with.

    Each character is lowercased on its own, punctuation and symbols (Unicode P* and S*) are
    removed, and the rest is split on whitespace.
    """
    return " ".join(text.translate(_translation()).split())


def span(text: str, start: int, length: int) -> str:
    """The normalized words [start, start + length) of a text: the evidence for a match there."""
    return " ".join(normalize(text).split()[start : start + length])


@functools.lru_cache(maxsize=1)
def _tables() -> tuple[np.ndarray, np.ndarray]:
    """(lowercase code point, KEEP/DROP/SPACE) for every code point below _TABLE_SIZE."""
    lower = np.arange(_TABLE_SIZE, dtype=np.int64)
    kind = np.zeros(_TABLE_SIZE, np.uint8)
    for cp in range(_TABLE_SIZE):
        c = chr(cp)
        if c.isspace():
            kind[cp] = _SPACE
        elif unicodedata.category(c)[0] in "PS":
            kind[cp] = _DROP
        else:
            lower[cp] = ord(_lower_char(c))
    return lower, kind


@numba.njit(inline="always")
def _word_hash(h):
    """Finish a word's FNV-1a hash with half of MurmurHash3's mix (the word's key in every index)."""
    h ^= h >> np.uint64(33)
    h *= np.uint64(0xFF51AFD7ED558CCD)
    return h ^ (h >> np.uint64(33))


@numba.njit(cache=True)
def _scan(data, start, end, lower, kind, out, o):
    """Hash the normalized words of data[start:end] into out[o:]; return how many there were.

    A word's hash is FNV-1a over its lowercased code points, finished with a 64-bit mix. With an
    empty `out` it only counts.
    """
    count = 0
    h = np.uint64(0xCBF29CE484222325)
    in_word = False
    i = start
    while i < end:
        cp, step = decode_utf8(data, i)
        i += step
        k = kind[cp] if cp < kind.size else 0
        if k == 2:
            if in_word:
                if out.size:
                    out[o + count] = _word_hash(h)
                count += 1
                in_word = False
                h = np.uint64(0xCBF29CE484222325)
        elif k == 0:
            c = lower[cp] if cp < lower.size else cp
            h = (h ^ np.uint64(c)) * np.uint64(0x100000001B3)
            in_word = True
    if in_word:
        if out.size:
            out[o + count] = _word_hash(h)
        count += 1
    return count


@numba.njit(nogil=True, cache=True)
def _count_words(c, data, offsets, lower, kind, chunks, counts):
    none = np.zeros(0, np.uint64)
    n = offsets.size - 1
    for t in range(c, n, chunks):
        counts[t] = _scan(data, offsets[t], offsets[t + 1], lower, kind, none, 0)


@numba.njit(nogil=True, cache=True)
def _hash_words(c, data, offsets, lower, kind, chunks, starts, out):
    n = offsets.size - 1
    for t in range(c, n, chunks):
        _scan(data, offsets[t], offsets[t + 1], lower, kind, out, starts[t])


@dataclass
class Tokens:
    """Normalized texts as word hashes laid end to end, with each text's start offset."""

    hashes: np.ndarray  # uint64 hash of each word, all texts concatenated
    offsets: np.ndarray  # int64, len(texts) + 1

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def select(self, rows: np.ndarray) -> Tokens:
        """The tokens of some of the texts, in the order of `rows`."""
        rows = np.asarray(rows, np.int64)
        picked, counts = _expand(self.offsets[rows], self.offsets[rows + 1])
        return Tokens(self.hashes[picked], np.r_[0, np.cumsum(counts)].astype(np.int64))

    def join(self, owner: np.ndarray, n: int) -> Tokens:
        """Runs of consecutive texts as one text each: text i belongs to owner[i] (sorted, < n).

        Words never span two texts, so this equals tokenizing the texts joined by a newline.
        """
        counts = np.bincount(owner, weights=self.lengths(), minlength=n).astype(np.int64)
        return Tokens(self.hashes, np.r_[0, np.cumsum(counts)].astype(np.int64))

    def whole(self) -> np.ndarray:
        """Each text's hash of all its words (equal texts after normalizing have equal hashes)."""
        return hash_at(self.hashes, self.offsets[:-1], self.lengths())


def tokenize(texts: Sequence[str] | pl.Series) -> Tokens:
    """Normalize and hash the words of many texts at once, in parallel, without building strings."""
    series = texts if isinstance(texts, pl.Series) else pl.Series("text", list(texts), dtype=pl.String)
    data, offsets = utf8_buffers(series)
    lower, kind = _tables()
    n = len(series)
    counts = np.zeros(n, np.int64)
    chunks = chunks_for(n)
    if n:
        each_chunk(_count_words, chunks, data, offsets, lower, kind, chunks, counts)
    starts = np.zeros(n + 1, np.int64)
    np.cumsum(counts, out=starts[1:])
    hashes = np.empty(int(starts[-1]), np.uint64)
    if n:
        each_chunk(_hash_words, chunks, data, offsets, lower, kind, chunks, starts, hashes)
    return Tokens(hashes, starts)


@numba.njit(nogil=True, cache=True)
def _hash_at(c, chunks, hashes, starts, lengths, out):
    """out[k] = hash of the words hashes[starts[k] : starts[k] + lengths[k]]: sum of w_j * B^j."""
    for k in range(c, starts.size, chunks):
        h = np.uint64(0)
        power = np.uint64(1)
        for j in range(starts[k], starts[k] + lengths[k]):
            h += hashes[j] * power
            power *= _BASE
        out[k] = h


def hash_at(hashes: np.ndarray, starts: np.ndarray, lengths: np.ndarray | int) -> np.ndarray:
    """Hashes of word windows; a window's hash does not depend on where it occurs."""
    starts = np.asarray(starts, np.int64)
    lengths = np.broadcast_to(np.asarray(lengths, np.int64), starts.shape).copy()
    out = np.empty(starts.size, np.uint64)
    if starts.size:
        chunks = chunks_for(starts.size)
        each_chunk(_hash_at, chunks, chunks, hashes, starts, lengths, out)
    return out


@numba.njit(cache=True, inline="always")
def _member(h, bitmap, shift, keys):
    slot = h >> shift
    if not (bitmap[slot >> np.uint64(6)] >> (slot & np.uint64(63))) & np.uint64(1):
        return -1
    k = np.searchsorted(keys, h)
    if k < keys.size and keys[k] == h:
        return k
    return -1


@numba.njit(nogil=True, cache=True)
def _rolling_hits(c, hashes, offsets, n, bitmap, shift, keys, chunks, texts, first, out_pos, out_key):
    """Every n-word window of the chosen texts, hashed by rolling, looked up in `keys`.

    With an empty `out_pos` it only counts each text's hits into first[t + 1]; otherwise it writes
    the global word position and key index of each hit from first[t] on.
    """
    top = np.uint64(1)
    for _ in range(n - 1):
        top *= _BASE
    count_only = out_pos.size == 0
    for x in range(c, texts.size, chunks):
        t = texts[x]
        start, end = offsets[t], offsets[t + 1]
        if end - start < n:
            continue
        h = np.uint64(0)
        power = np.uint64(1)
        for j in range(start, start + n):
            h += hashes[j] * power
            power *= _BASE
        found = 0
        for i in range(start, end - n + 1):
            k = _member(h, bitmap, shift, keys)
            if k >= 0:
                if not count_only:
                    out_pos[first[x] + found] = i
                    out_key[first[x] + found] = k
                found += 1
            if i + n < end:
                h = (h - hashes[i]) * _BASE_INV + hashes[i + n] * top
        if count_only:
            first[x + 1] = found


def _window_starts(offsets: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Start positions of every window of `length` words that lies inside one text, and its text."""
    lengths = np.diff(offsets)
    counts = np.maximum(lengths - length + 1, 0)
    docs = np.repeat(np.arange(len(lengths), dtype=np.int64), counts)
    if not len(docs):
        return docs, docs
    first = np.repeat(offsets[:-1] - np.concatenate(([0], np.cumsum(counts)[:-1])), counts)
    return first + np.arange(len(docs), dtype=np.int64), docs


def _covered(starts: np.ndarray, length: int, size: int) -> np.ndarray:
    """Whether each of `size` word positions lies inside one of the windows at `starts`."""
    edges = np.zeros(size + 1, np.int64)
    np.add.at(edges, starts, 1)
    np.add.at(edges, starts + length, -1)
    return np.cumsum(edges[:-1]) > 0


def _expand(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All indices of the ranges [lo, hi) laid end to end, and each range's length."""
    reps = hi - lo
    return np.repeat(lo - np.concatenate(([0], np.cumsum(reps)[:-1])), reps) + np.arange(reps.sum()), reps


class _HashSet:
    """Sorted unique uint64 keys with a bitmap in front: most training windows miss the eval set."""

    def __init__(self, keys: np.ndarray, presorted: bool = False) -> None:
        if not presorted:
            keys = np.sort(keys)
        self.keys = keys[np.r_[True, keys[1:] != keys[:-1]]] if len(keys) else keys
        # about 16 bits per key (at most 8 MiB), so few misses reach the binary search
        bits = int(np.clip(np.ceil(np.log2(len(self.keys) * 16 + 1)), 6, 26))
        self.shift = np.uint64(64 - bits)
        slots = self.keys >> self.shift
        self.bitmap = np.zeros(1 << (bits - 6), np.uint64)
        np.bitwise_or.at(self.bitmap, slots >> np.uint64(6), np.uint64(1) << (slots & np.uint64(63)))

    def scan(self, tokens: Tokens, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(text, word position in it, key index) of every n-word window of the texts that is a key."""
        empty = np.zeros(0, np.int64)
        candidates = np.flatnonzero(tokens.lengths() >= n)
        if not len(candidates) or not len(self.keys):
            return empty, empty, empty
        args = (tokens.hashes, tokens.offsets, n, self.bitmap, self.shift, self.keys)
        counts = np.zeros(len(candidates) + 1, np.int64)
        chunks = chunks_for(len(candidates))
        each_chunk(_rolling_hits, chunks, *args, chunks, candidates, counts, empty, empty)
        texts = candidates[counts[1:] > 0]  # the second pass only revisits texts with hits
        first = np.r_[0, np.cumsum(counts[1:][counts[1:] > 0])]
        pos = np.empty(first[-1], np.int64)
        key = np.empty(first[-1], np.int64)
        chunks = chunks_for(len(texts))
        each_chunk(_rolling_hits, chunks, *args, chunks, texts, first, pos, key)
        docs = np.repeat(texts, np.diff(first))
        return docs, pos - tokens.offsets[docs], key


class SpanIndex:
    """Word n-grams and whole-text hashes of a fixed list of texts (the eval items' parts).

    `ngram_hits` reports every (training text, item text) pair sharing an n-gram, with the number
    of distinct shared n-grams; `contained` reports items whose whole text occurs in a training
    text; `equal` reports training texts equal to a short item as a whole.
    """

    def __init__(
        self, texts: Sequence[str] | pl.Series | Tokens, n: int = 13, max_items: int | None = None
    ) -> None:
        """`max_items`: words inside an n-gram that more items than this share are a template's (a
        prompt header, a shared instruction), and an n-gram made mostly of such words is left out of
        `ngram_hits`: it is not evidence. `ngram_counts` still counts every n-gram in an item's size."""
        self.n = n
        self.tokens = texts if isinstance(texts, Tokens) else tokenize(texts)
        lengths = self.lengths = self.tokens.lengths()
        starts, owners = _window_starts(self.tokens.offsets, n)
        grams = hash_at(self.tokens.hashes, starts, n)
        windows = pl.DataFrame({"h": grams, "item": owners})
        # item n-grams, deduplicated per item: (hash, item) pairs grouped by hash
        pairs = windows.unique().sort("h", "item")
        self.ngram_counts = np.bincount(pairs["item"].to_numpy(), minlength=len(lengths))
        if max_items and len(starts):
            shared = pairs.group_by("h").len()
            common = (
                windows.join(shared, on="h", how="left", maintain_order="left")["len"].to_numpy() > max_items
            )
            template = _covered(starts[common], n, len(self.tokens.hashes))
            words = np.r_[0, np.cumsum(template)]
            mostly_template = (words[starts + n] - words[starts]) > n // 2
            pairs = windows.filter(~mostly_template).unique().sort("h", "item")
        self._gram_set = _HashSet(pairs["h"].to_numpy(), presorted=True)
        self._gram_rows = np.r_[np.searchsorted(pairs["h"].to_numpy(), self._gram_set.keys), pairs.height]
        self._gram_items = pairs["item"].to_numpy()
        # whole texts: the hash of all their words, and their first min(len, n) words as an anchor
        nonempty = self._whole_items = np.flatnonzero(lengths > 0)
        first = self.tokens.offsets[:-1][nonempty]
        self._whole = hash_at(self.tokens.hashes, first, lengths[nonempty])
        self._anchor_len = np.minimum(lengths[nonempty], n)
        self._anchor = hash_at(self.tokens.hashes, first, self._anchor_len)

    def ngram_hits(self, tokens: Tokens) -> pl.DataFrame:
        """One row per (doc, item) sharing n-grams: `matches` distinct shared n-grams, `pos` of the first."""
        docs, pos, key = self._gram_set.scan(tokens, self.n)
        rows, reps = _expand(self._gram_rows[key], self._gram_rows[key + 1])
        hits = pl.DataFrame(
            {
                "doc": np.repeat(docs, reps),
                "item": self._gram_items[rows],
                "pos": np.repeat(pos, reps),
                "gram": np.repeat(key, reps),
            },
            schema={"doc": pl.Int64, "item": pl.Int64, "pos": pl.Int64, "gram": pl.Int64},
        )
        return (
            hits.group_by("doc", "item")
            .agg(pl.col("gram").n_unique().cast(pl.UInt32).alias("matches"), pl.col("pos").min())
            .sort("doc", "item")
        )

    def equal(self, tokens: Tokens, below: int) -> pl.DataFrame:
        """One row per (doc, item) whose whole normalized texts are equal, for items under `below` words."""
        short = self.lengths[self._whole_items] < below
        items = pl.DataFrame({"h": self._whole[short], "item": self._whole_items[short]})
        nonempty = np.flatnonzero(tokens.lengths() > 0)
        docs = pl.DataFrame({"h": tokens.whole()[nonempty], "doc": nonempty})
        return docs.join(items, on="h").select("doc", "item").sort("doc", "item")

    def contained(self, tokens: Tokens, min_words: int = 1) -> pl.DataFrame:
        """One row per (doc, item) where the item's whole text occurs in the doc: `pos`, `length` in words."""
        keep = self.lengths[self._whole_items] >= min_words
        whole, items = self._whole[keep], self._whole_items[keep]
        anchors, anchor_len = self._anchor[keep], self._anchor_len[keep]
        doc_len = tokens.lengths()
        parts = []
        for length in np.unique(anchor_len).tolist():
            group = np.flatnonzero(anchor_len == length)
            group = group[np.argsort(anchors[group], kind="stable")]
            found = _HashSet(anchors[group], presorted=True)
            docs, pos, key = found.scan(tokens, length)
            # every item sharing this anchor is a candidate; check its whole hash at that position
            sorted_anchor = anchors[group]
            cand, reps = _expand(
                np.searchsorted(sorted_anchor, found.keys[key], side="left"),
                np.searchsorted(sorted_anchor, found.keys[key], side="right"),
            )
            cand_items, cand_doc, cand_pos = group[cand], np.repeat(docs, reps), np.repeat(pos, reps)
            full_len = self.lengths[items[cand_items]]
            fits = cand_pos + full_len <= doc_len[cand_doc]
            cand_items, cand_doc, cand_pos, full_len = (
                cand_items[fits],
                cand_doc[fits],
                cand_pos[fits],
                full_len[fits],
            )
            same = hash_at(tokens.hashes, tokens.offsets[cand_doc] + cand_pos, full_len) == whole[cand_items]
            parts.append(
                pl.DataFrame(
                    {
                        "doc": cand_doc[same],
                        "item": items[cand_items[same]],
                        "pos": cand_pos[same],
                        "length": full_len[same],
                    },
                    schema={"doc": pl.Int64, "item": pl.Int64, "pos": pl.Int64, "length": pl.Int64},
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
