"""How text becomes shingles (and exact-dedup keys): defined in plain Python, computed by matching kernels.

The definition (what `shingles(text)` returns; `lowercase=False` skips `.lower()`):

- unit "word": ``words = re.findall(r"\\w+", text.lower())`` with Python's Unicode ``\\w`` (a
  character for which ``str.isalnum()`` is true, or ``_``). The shingles are
  ``" ".join(words[i:i + n])`` for every start i; a text of 1 to n-1 words gives one shingle of
  all its words; a text without words gives none.
- unit "char": ``t = " ".join(text.lower().split())`` (whitespace runs become one space, ends are
  trimmed); the shingles are ``t[i:i + n]`` for every start i (code points, not bytes); a shorter
  non-empty t gives t itself; an empty t gives none.

Shingles form a set: repeats do not count twice. To build the same MinHash with datasketch:
``m = MinHash(num_perm, seed); m.update_batch([s.encode("utf-8") for s in shingles(text)])``.

The kernels below read UTF-8 bytes straight from Arrow buffers and apply the same rules through
lookup tables made from Python's own `str.lower`, `str.isalnum` and `str.isspace`, so both agree
on the running Python's Unicode version. The few characters whose lowercase is not one code point
or depends on context (U+0130, and capital sigma, which Python lowers to a final or medial form),
and code points past the tables, send their record down the plain Python path instead.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numba
import numpy as np
import polars as pl
import pyarrow as pa

from curate.text.parallel import chunks_for, each_chunk
from curate.text.sha1 import LANES, SHORT, big_endian_words, sha1_prefix64, sha1_short_lanes
from curate.text.utf8 import decode_utf8, fmix64, string_buffers

Unit = Literal["word", "char"]

WORD = np.uint8(1)
SPACE = np.uint8(2)
SPECIAL = np.uint8(4)
TABLE_SIZE = 0x30000  # planes 0-2: every script in use; anything above goes the Python way
PAD = 72  # zero bytes after a normalized record in scratch: SHA-1 lanes read a block past a start
_WORD_RE = re.compile(r"\w+")


def shingles(text: str, ngram: int = 5, unit: Unit = "word", lowercase: bool = True) -> list[str]:
    """The shingle set of one text, in first-seen order: the reference the kernels are tested against."""
    if lowercase:
        text = text.lower()
    if unit == "word":
        parts = _WORD_RE.findall(text)
        if not parts:
            return []
        grams = [" ".join(parts[i : i + ngram]) for i in range(max(1, len(parts) - ngram + 1))]
    elif unit == "char":
        t = " ".join(text.split())
        if not t:
            return []
        grams = [t[i : i + ngram] for i in range(max(1, len(t) - ngram + 1))]
    else:
        raise ValueError(f"unknown shingle unit {unit!r}; use 'word' or 'char'")
    return list(dict.fromkeys(grams))


def normalized(text: str, unit: Unit, lowercase: bool) -> bytes:
    """A text as the kernels see it after normalizing: words (or the collapsed text) as UTF-8."""
    if lowercase:
        text = text.lower()
    return (" ".join(_WORD_RE.findall(text)) if unit == "word" else " ".join(text.split())).encode("utf-8")


@functools.lru_cache(maxsize=2)
def tables(lowercase: bool) -> tuple[np.ndarray, np.ndarray]:
    """(lower, flags) per code point below TABLE_SIZE, from Python's own string methods."""
    codes = np.arange(TABLE_SIZE, dtype=np.uint32)
    chars = codes.view("<U1")
    mapped = np.char.lower(chars) if lowercase else chars
    lower = mapped.view(np.uint32).copy()
    flags = np.where(np.char.isalnum(mapped) | (mapped == "_"), WORD, 0).astype(np.uint8)
    flags |= np.where(np.char.isspace(mapped), SPACE, 0).astype(np.uint8)
    if lowercase:
        changed = np.nonzero(lower != codes)[0]
        special = [c for c in changed.tolist() if len(chr(c).lower()) != 1] + [0x3A3]
        flags[special] |= SPECIAL
    return lower, flags


def utf8_buffers(texts: list[str] | pl.Series) -> tuple[np.ndarray, np.ndarray]:
    """(data, offsets) of the texts as UTF-8, zero-copy from Arrow; nulls are empty texts."""
    if isinstance(texts, pl.Series):
        return string_buffers(texts.cast(pl.String).to_arrow())
    return string_buffers(pa.array(texts, type=pa.large_string()))


@numba.njit(inline="always")
def _encode(cp, out, o):
    if cp < 0x80:
        out[o] = cp
        return o + 1
    if cp < 0x800:
        out[o] = 0xC0 | (cp >> 6)
        out[o + 1] = 0x80 | (cp & 0x3F)
        return o + 2
    if cp < 0x10000:
        out[o] = 0xE0 | (cp >> 12)
        out[o + 1] = 0x80 | ((cp >> 6) & 0x3F)
        out[o + 2] = 0x80 | (cp & 0x3F)
        return o + 3
    out[o] = 0xF0 | (cp >> 18)
    out[o + 1] = 0x80 | ((cp >> 12) & 0x3F)
    out[o + 2] = 0x80 | ((cp >> 6) & 0x3F)
    out[o + 3] = 0x80 | (cp & 0x3F)
    return o + 4


@numba.njit(cache=True)
def _normalize(data, start, end, prenormalized, word_unit, lower, flags, out, marks):
    """Normalize data[start:end] into `out`; return (bytes written, marks) or (-1, 0) for the Python path.

    Word unit: marks[2k], marks[2k+1] are the byte start and end of word k. Char unit: marks[k] is
    the byte start of code point k, with one more mark at the end. Prenormalized input (from
    `normalized`) is copied and only split.
    """
    o = 0
    m = 0
    i = start
    if prenormalized:
        for j in range(start, end):
            out[o] = data[j]
            o += 1
        if word_unit:
            p = 0
            for j in range(o + 1):
                if j == o or out[j] == 32:
                    if j > p:
                        marks[m] = p
                        marks[m + 1] = j
                        m += 2
                    p = j + 1
            return o, m // 2
        for j in range(o):
            if (out[j] & 0xC0) != 0x80:
                marks[m] = j
                m += 1
        marks[m] = o
        return o, m
    if word_unit:
        in_word = False
        while i < end:
            cp, n = decode_utf8(data, i)
            i += n
            if cp >= TABLE_SIZE or flags[cp] & SPECIAL:
                return -1, 0
            if flags[cp] & WORD:
                if not in_word:
                    if o > 0:
                        out[o] = 32
                        o += 1
                    marks[2 * m] = o
                    in_word = True
                o = _encode(lower[cp], out, o)
            elif in_word:
                marks[2 * m + 1] = o
                m += 1
                in_word = False
        if in_word:
            marks[2 * m + 1] = o
            m += 1
        return o, m
    pending = False
    while i < end:
        cp, n = decode_utf8(data, i)
        i += n
        if cp >= TABLE_SIZE or flags[cp] & SPECIAL:
            return -1, 0
        if flags[cp] & SPACE:
            pending = o > 0
            continue
        if pending:
            marks[m] = o
            m += 1
            out[o] = 32
            o += 1
            pending = False
        marks[m] = o
        m += 1
        o = _encode(lower[cp], out, o)
    marks[m] = o
    return o, m


@numba.njit(cache=True)
def record_hashes(data, start, end, prenormalized, word_unit, ngram, lower, flags, scratch, hv):
    """`sha1_prefix64` of every shingle of one record into `hv`; return the count, or -1 for the Python path.

    `scratch` comes from `scratch_for`. A repeated shingle is hashed again (sets ignore repeats).
    """
    buf, be32, marks, starts, ends, w, state, sw, tail, lane_start, lane_end, lane_idx, lane_out = scratch
    length, units = _normalize(data, start, end, prenormalized, word_unit, lower, flags, buf, marks)
    if length < 0:
        return -1
    for j in range(PAD):
        buf[length + j] = 0
    if units == 0:
        return 0
    big_endian_words(buf, length + 64, be32)
    count = max(1, units - ngram + 1)
    for j in range(count):
        last = min(j + ngram, units)
        if word_unit:
            starts[j] = marks[2 * j]
            ends[j] = marks[2 * last - 1]
        else:
            starts[j] = marks[j]
            ends[j] = marks[last]
    # Short shingles go through the SIMD lanes; the rare long one is hashed on its own.
    filled = 0
    for j in range(count):
        if ends[j] - starts[j] > SHORT:
            hv[j] = sha1_prefix64(buf, starts[j], ends[j], state, sw, tail)
            continue
        lane_start[filled] = starts[j]
        lane_end[filled] = ends[j]
        lane_idx[filled] = j
        filled += 1
        if filled == LANES or j == count - 1:
            sha1_short_lanes(be32, lane_start[:filled], lane_end[:filled], w, lane_out)
            for q in range(filled):
                hv[lane_idx[q]] = lane_out[q]
            filled = 0
    if filled > 0:
        sha1_short_lanes(be32, lane_start[:filled], lane_end[:filled], w, lane_out)
        for q in range(filled):
            hv[lane_idx[q]] = lane_out[q]
    return count


@numba.njit(cache=True)
def scratch_for(max_bytes):
    """Per-thread buffers for `record_hashes` on records of at most `max_bytes` UTF-8 bytes."""
    # Lowercasing can grow a code point from 2 to 3 UTF-8 bytes, never by more than half.
    room = 2 * max_bytes + 2 * PAD
    return (
        np.empty(room, np.uint8),
        np.empty(room, np.uint32),
        np.empty(room + 1, np.int64),
        np.empty(room, np.int64),
        np.empty(room, np.int64),
        np.zeros((85, LANES), np.uint32),
        np.zeros(5, np.uint64),
        np.zeros(80, np.uint64),
        np.zeros(128, np.uint8),
        np.zeros(LANES, np.int64),
        np.zeros(LANES, np.int64),
        np.zeros(LANES, np.int64),
        np.zeros(LANES, np.uint64),
    )


def python_fallback(
    texts: list[str] | pl.Series, rows: np.ndarray, unit: Unit, lowercase: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Buffers of the `normalized` texts of the rows the kernels handed back to Python."""
    if isinstance(texts, pl.Series):
        picked = [t or "" for t in texts.gather(rows).to_list()]
    else:
        picked = [texts[int(r)] or "" for r in rows]
    return utf8_buffers([normalized(t, unit, lowercase).decode("utf-8") for t in picked])


@numba.njit(nogil=True, cache=True)
def _count_kernel(
    c, chunks, data, offsets, rows, prenormalized, word_unit, ngram, lower, flags, max_bytes, counts
):
    n = rows.size
    buf = np.empty(2 * max_bytes + 2 * PAD, np.uint8)
    marks = np.empty(2 * max_bytes + 2 * PAD + 1, np.int64)
    for k in range(c, n, chunks):
        length, units = _normalize(
            data, offsets[k], offsets[k + 1], prenormalized, word_unit, lower, flags, buf, marks
        )
        if length < 0:
            counts[rows[k]] = -1
        else:
            counts[rows[k]] = 0 if units == 0 else max(1, units - ngram + 1)


@numba.njit(nogil=True, cache=True)
def _set_kernel(
    c,
    chunks,
    data,
    offsets,
    rows,
    prenormalized,
    word_unit,
    ngram,
    lower,
    flags,
    max_bytes,
    starts,
    out,
    sizes,
):
    n = rows.size
    scratch = scratch_for(max_bytes)
    hv = np.empty(2 * max_bytes + 2 * PAD, np.uint64)
    for k in range(c, n, chunks):
        r = rows[k]
        cnt = record_hashes(
            data, offsets[k], offsets[k + 1], prenormalized, word_unit, ngram, lower, flags, scratch, hv
        )
        if cnt <= 0:
            continue
        seg = np.sort(hv[:cnt])
        size = 1
        out[starts[r]] = seg[0]
        for j in range(1, cnt):
            if seg[j] != seg[j - 1]:
                out[starts[r] + size] = seg[j]
                size += 1
        sizes[r] = size


@dataclass(frozen=True)
class TextPass:
    """One kernel pass over some texts: their UTF-8 buffers, which rows they are, and the tables used."""

    data: np.ndarray
    offsets: np.ndarray
    rows: np.ndarray
    fallback: bool  # texts already normalized in Python (plain tables, no lowercasing in the kernel)
    lower: np.ndarray
    flags: np.ndarray
    max_bytes: int

    @property
    def head(self) -> tuple:
        """The arguments every text kernel starts with."""
        return (chunks_for(self.rows.size), self.data, self.offsets, self.rows, self.fallback)


def run_with_fallback(
    texts: list[str] | pl.Series, unit: Unit, lowercase: bool, run: Callable[[TextPass], np.ndarray]
) -> list[TextPass]:
    """`run` a kernel over all texts, then again over the rows it handed back (status < 0: characters
    the tables cannot lowercase alone), normalized in Python first. Returns the passes made."""
    data, offsets = utf8_buffers(texts)
    lower, flags = tables(lowercase)
    first = TextPass(
        data, offsets, np.arange(len(texts), dtype=np.int64), False, lower, flags, max_len(offsets)
    )
    back = np.nonzero(run(first) < 0)[0]
    if not back.size:
        return [first]
    fdata, foffsets = python_fallback(texts, back, unit, lowercase)
    plain_lower, plain_flags = tables(False)
    second = TextPass(fdata, foffsets, back, True, plain_lower, plain_flags, max_len(foffsets))
    run(second)
    return [first, second]


def shingle_hash_sets(
    texts: list[str] | pl.Series, ngram: int = 5, unit: Unit = "word", lowercase: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Each text's shingle set as sorted unique 64-bit hashes (datasketch's `sha1_hash64` of each shingle).

    Returns (offsets, hashes): text i's set is hashes[offsets[i]:offsets[i + 1]]. Used for exact
    Jaccard checks and n-gram overlap indexes.
    """
    check_shingling(ngram, unit)
    n = len(texts)
    word_unit = unit == "word"
    counts = np.zeros(n, np.int64)  # indexed by row; the first pass marks hand-backs with -1

    def count(p: TextPass) -> np.ndarray:
        each_chunk(_count_kernel, p.head[0], *p.head, word_unit, ngram, p.lower, p.flags, p.max_bytes, counts)
        return counts

    passes = run_with_fallback(texts, unit, lowercase, count)
    starts = np.zeros(n + 1, np.int64)
    np.cumsum(counts, out=starts[1:])
    out = np.empty(int(starts[-1]), np.uint64)
    sizes = np.zeros(n, np.int64)
    for p in passes:
        each_chunk(
            _set_kernel,
            p.head[0],
            *p.head,
            word_unit,
            ngram,
            p.lower,
            p.flags,
            p.max_bytes,
            starts,
            out,
            sizes,
        )
    keep = np.arange(out.size) - np.repeat(starts[:-1], counts) < np.repeat(sizes, counts)
    set_offsets = np.zeros(n + 1, np.int64)
    np.cumsum(sizes, out=set_offsets[1:])
    return set_offsets, out[keep]


def max_len(offsets: np.ndarray) -> int:
    """The longest record in bytes (sizes the per-thread scratch buffers)."""
    return int(np.max(np.diff(offsets))) if offsets.size > 1 else 0


def check_shingling(ngram: int, unit: str) -> None:
    """Reject shingle settings the kernels cannot honour, with a message that says what is allowed."""
    if unit not in ("word", "char"):
        raise ValueError(f"unknown shingle unit {unit!r}; use 'word' or 'char'")
    if not isinstance(ngram, int) or ngram < 1:
        raise ValueError(f"ngram must be a positive integer, got {ngram!r}")


@numba.njit(nogil=True, cache=True)
def _content_kernel(c, chunks, data, offsets, rows, prenormalized, lower, flags, max_bytes, out, status):
    n = rows.size
    room = 2 * max_bytes + 2 * PAD
    buf = np.zeros(room + 8 - room % 8, np.uint8)
    words = buf.view(np.uint64)
    marks = np.empty(room + 1, np.int64)
    for k in range(c, n, chunks):
        length, _ = _normalize(
            data, offsets[k], offsets[k + 1], prenormalized, False, lower, flags, buf, marks
        )
        if length < 0:
            status[k] = -1
            continue
        for j in range(length, min(buf.size, length + 8)):
            buf[j] = 0
        # two independent multiply-rotate lanes over 8-byte words: a 128-bit key
        h1 = np.uint64(0x243F6A8885A308D3) ^ np.uint64(length)
        h2 = np.uint64(0x13198A2E03707344) ^ (np.uint64(length) * np.uint64(0x9E3779B97F4A7C15))
        for j in range((length + 7) // 8):
            w = words[j]
            h1 = (h1 ^ w) * np.uint64(0x9FB21C651E98DF25)
            h1 = (h1 << np.uint64(29)) | (h1 >> np.uint64(35))
            h2 = (h2 + w) * np.uint64(0xC2B2AE3D27D4EB4F)
            h2 = (h2 << np.uint64(31)) | (h2 >> np.uint64(33))
        out[rows[k], 0] = fmix64(h1)
        out[rows[k], 1] = fmix64(h2 ^ h1)
        status[k] = 0


def content_keys(texts: list[str] | pl.Series, lowercase: bool = True) -> np.ndarray:
    """A 128-bit key per text, (n, 2) uint64, equal exactly when the normalized texts are equal.

    Normalized as for char shingles: ``" ".join(text.lower().split())``, so case and whitespace
    do not matter. (Different texts share a key with probability about n^2 / 2^128.)
    """
    n = len(texts)
    out = np.zeros((n, 2), np.uint64)
    if n == 0:
        return out

    def key(p: TextPass) -> np.ndarray:
        status = np.zeros(p.rows.size, np.int64)
        each_chunk(_content_kernel, p.head[0], *p.head, p.lower, p.flags, p.max_bytes, out, status)
        return status

    run_with_fallback(texts, "char", lowercase, key)
    return out


def shingle_sets_at(texts, rows: np.ndarray, n: int, ngram: int, unit: Unit, lowercase: bool):
    """Shingle hash sets laid out over n rows: `texts[i]`'s set at row `rows[i]` (rows ascending),
    empty sets elsewhere; as (offsets, sorted hashes) for `lsh.pair_jaccard_exact`."""
    offsets, hashes = shingle_hash_sets(texts, ngram, unit, lowercase)
    sizes = np.zeros(n, dtype=np.int64)
    sizes[rows] = np.diff(offsets)
    full = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(sizes, out=full[1:])
    return full, hashes
