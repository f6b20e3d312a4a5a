"""MinHash signatures equal to datasketch's, computed for whole columns at once by a compiled kernel.

`signatures(texts)[i]` equals ``datasketch.MinHash(num_perm, seed, scheme=scheme)`` after
``update(s.encode("utf-8"))`` for every shingle s of texts[i] as `curate.text.shingles.shingles`
defines them, hashed with datasketch's default hash (SHA-1). So signatures can be loaded into
datasketch (``LeanMinHash(seed=seed, hashvalues=row, scheme=scheme)``) and its `MinHashLSH`
indexes keep working. Three permutation schemes, as in datasketch 2:

- "affine32" (datasketch's default since 2.0): fmix32(sha1_hash32) * a + b mod 2^32, uint32.
- "affine64": fmix64(sha1_hash64) * a + b mod 2^64, uint64.
- "legacy" (datasketch before 2.0): ((a * sha1_hash32 + b) mod 2^64 mod (2^61 - 1)) & (2^32 - 1),
  stored as uint64 as datasketch does.

The parameters a, b come from ``np.random.RandomState(seed)`` exactly as datasketch draws them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import numba
import numpy as np
import polars as pl

from curate.configs import option
from curate.errors import CurateError
from curate.text.lsh import optimal_params
from curate.text.parallel import each_chunk
from curate.text.shingles import (
    PAD,
    TextPass,
    Unit,
    check_shingling,
    record_hashes,
    run_with_fallback,
    scratch_for,
)
from curate.text.utf8 import fmix64

Scheme = Literal["affine32", "affine64", "legacy"]
SCHEMES = ("affine32", "affine64", "legacy")
MERSENNE_PRIME = (1 << 61) - 1
_SCHEME_CODE = {"affine32": 0, "affine64": 1, "legacy": 2}
_P61 = np.uint64(MERSENNE_PRIME)
_M32 = np.uint64(0xFFFFFFFF)


def dtype_of(scheme: Scheme) -> type:
    """The storage type datasketch uses for a scheme's hash values."""
    return np.uint32 if scheme == "affine32" else np.uint64


def empty_value(scheme: Scheme) -> int:
    """The hash value of an empty MinHash (no shingles) under a scheme."""
    return (1 << 64) - 1 if scheme == "affine64" else (1 << 32) - 1


@functools.lru_cache(maxsize=16)
def permutations(num_perm: int, seed: int, scheme: Scheme = "affine32") -> tuple[np.ndarray, np.ndarray]:
    """The (a, b) parameters datasketch's MinHash draws for (num_perm, seed, scheme), as uint64."""
    gen = np.random.RandomState(seed)
    if scheme == "legacy":
        pairs = [
            (gen.randint(1, MERSENNE_PRIME, dtype=np.uint64), gen.randint(0, MERSENNE_PRIME, dtype=np.uint64))
            for _ in range(num_perm)
        ]
        a, b = np.array(pairs, dtype=np.uint64).T
    else:
        width = 32 if scheme == "affine32" else 64
        dtype = dtype_of(scheme)
        a = gen.randint(0, 1 << (width - 1), num_perm, dtype=dtype) * dtype(2) + dtype(1)
        b = gen.randint(0, 1 << width, num_perm, dtype=dtype)
    a = np.ascontiguousarray(a, dtype=np.uint64)
    b = np.ascontiguousarray(b, dtype=np.uint64)
    a.flags.writeable = False
    b.flags.writeable = False
    return a, b


@numba.njit(inline="always")
def _fmix32(h):
    h ^= h >> np.uint64(16)
    h = (h * np.uint64(0x85EBCA6B)) & _M32
    h ^= h >> np.uint64(13)
    h = (h * np.uint64(0xC2B2AE35)) & _M32
    return h ^ (h >> np.uint64(16))


@numba.njit(cache=True)
def _permute_min(hv, count, a, b, scheme, sig):
    """Fold `count` shingle hashes into `sig` (uint64, preset to the empty value) under a scheme."""
    num_perm = a.size
    if scheme == 0:
        a32 = a.astype(np.uint32)
        b32 = b.astype(np.uint32)
        low = np.empty(num_perm, np.uint32)
        for k in range(num_perm):
            low[k] = np.uint32(sig[k])
        for j in range(count):
            h = np.uint32(_fmix32(hv[j] & _M32))
            for k in range(num_perm):
                v = np.uint32(a32[k] * h + b32[k])
                if v < low[k]:
                    low[k] = v
        for k in range(num_perm):
            sig[k] = low[k]
    elif scheme == 1:
        for j in range(count):
            h = fmix64(hv[j])
            for k in range(num_perm):
                v = a[k] * h + b[k]
                if v < sig[k]:
                    sig[k] = v
    else:
        for j in range(count):
            h = hv[j] & _M32
            for k in range(num_perm):
                x = a[k] * h + b[k]  # wraps mod 2^64, as datasketch's numpy uint64 arithmetic does
                x = (x & _P61) + (x >> np.uint64(61))
                if x >= _P61:
                    x -= _P61
                v = x & _M32
                if v < sig[k]:
                    sig[k] = v


@numba.njit(nogil=True, cache=True)
def _sign_kernel(
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
    a,
    b,
    scheme,
    empty,
    wide,
    out,
    status,
):
    n = rows.size
    num_perm = a.size
    scratch = scratch_for(max_bytes)
    hv = np.empty(2 * max_bytes + 2 * PAD, np.uint64)
    sig = np.empty(num_perm, np.uint64)
    for k in range(c, n, chunks):
        cnt = record_hashes(
            data, offsets[k], offsets[k + 1], prenormalized, word_unit, ngram, lower, flags, scratch, hv
        )
        if cnt < 0:
            status[k] = -1
            continue
        sig[:] = empty
        _permute_min(hv, cnt, a, b, scheme, sig)
        r = rows[k]
        if wide:  # 64-bit values as little-endian pairs of 32-bit words (viewed back as uint64)
            for q in range(num_perm):
                out[r, 2 * q] = sig[q] & _M32
                out[r, 2 * q + 1] = sig[q] >> np.uint64(32)
        else:
            for q in range(num_perm):
                out[r, q] = sig[q]
        status[k] = cnt


def signatures(
    texts: list[str] | pl.Series,
    num_perm: int = 128,
    ngram: int = 5,
    unit: Unit = "word",
    seed: int = 1,
    lowercase: bool = True,
    scheme: Scheme = "affine32",
) -> np.ndarray:
    """MinHash signatures, one row per text: (n, num_perm), uint32 for "affine32", else uint64.

    Row i equals datasketch's ``MinHash(num_perm, seed, scheme=scheme)`` updated with the UTF-8
    bytes of every shingle of texts[i] (see the module docstring). A text without shingles gets the
    empty signature (every value at its maximum), as an untouched datasketch MinHash has.
    """
    check_shingling(ngram, unit)
    if scheme not in SCHEMES:
        raise ValueError(f"unknown MinHash scheme {scheme!r}; use one of {', '.join(SCHEMES)}")
    if num_perm < 1:
        raise ValueError(f"num_perm must be positive, got {num_perm}")
    n = len(texts)
    a, b = permutations(num_perm, seed, scheme)
    if n == 0:
        return np.empty((0, num_perm), dtype=dtype_of(scheme))
    # one kernel specialization for every scheme: it writes uint32 words, two per 64-bit value
    wide = scheme != "affine32"
    out = np.empty((n, num_perm * (2 if wide else 1)), dtype=np.uint32)
    tail = (a, b, _SCHEME_CODE[scheme], np.uint64(empty_value(scheme)), wide, out)

    def sign(p: TextPass) -> np.ndarray:
        status = np.zeros(p.rows.size, np.int64)
        each_chunk(
            _sign_kernel,
            p.head[0],
            *p.head,
            unit == "word",
            ngram,
            p.lower,
            p.flags,
            p.max_bytes,
            *tail,
            status,
        )
        return status

    run_with_fallback(texts, unit, lowercase, sign)
    return out.view(np.uint64) if wide else out


def jaccard_estimate(a: np.ndarray, b: np.ndarray) -> float | np.ndarray:
    """Estimated Jaccard similarity: the share of equal signature values (rows pairwise for 2-D input)."""
    a = np.asarray(a)
    b = np.asarray(b)
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(f"signatures differ in num_perm: {a.shape[-1]} vs {b.shape[-1]}")
    same = np.count_nonzero(a == b, axis=-1) / a.shape[-1]
    return float(same) if np.ndim(same) == 0 else same


@dataclass(frozen=True)
class MinHashConfig:
    threshold: float = option(
        0.8,
        help="Jaccard similarity of shingle sets at or above which records are near-duplicates.",
        exclusiveMinimum=0,
        maximum=1.0,
    )
    num_perm: int = option(128, help="MinHash permutations (signature length).", minimum=2)
    ngram: int = option(5, help="Shingle length in units.", minimum=1)
    unit: Literal["word", "char"] = option(
        "word",
        help="Shingle unit: words (runs of \\w after lowercasing) or characters (whitespace collapsed).",
    )
    lowercase: bool = option(True, help="Lowercase the text before shingling.")
    seed: int = option(
        1, help="Permutation seed; with `scheme` it makes signatures equal datasketch's MinHash(seed=...)."
    )
    scheme: Literal["affine32", "affine64", "legacy"] = option(
        "affine32",
        help="datasketch permutation scheme: affine32 (datasketch 2's default), affine64, or legacy "
        "(datasketch 1).",
    )
    bands: int | None = option(
        None, help="LSH bands; default: derived from threshold and num_perm as datasketch does.", minimum=1
    )
    rows: int | None = option(None, help="Signature values per band; set together with `bands`.", minimum=1)
    weights: list[float] = option(
        [0.5, 0.5],
        help="Weights of false positives and false negatives when deriving bands and rows.",
        items={"type": "number", "minimum": 0},
        minItems=2,
        maxItems=2,
    )
    verify: Literal["none", "estimate", "exact"] = option(
        "estimate",
        help="Check LSH candidate pairs before merging: none (take every bucket match, as MinHashLSH does), "
        "estimate (estimated Jaccard >= threshold) or exact (exact Jaccard of the shingle sets >= "
        "threshold).",
    )

    def check(self) -> None:
        if (self.bands is None) != (self.rows is None):
            raise ValueError("set both bands and rows, or neither")
        if self.bands is not None and self.bands * self.rows > self.num_perm:
            raise ValueError(
                f"bands * rows must be at most num_perm ({self.num_perm}), got {self.bands} * {self.rows}"
            )
        if abs(sum(self.weights) - 1.0) > 1e-9:
            raise ValueError(f"weights must sum to 1, got {self.weights}")

    def band_shape(self) -> tuple[int, int]:
        if self.bands is not None:
            return self.bands, self.rows
        bands, rows = optimal_params(self.threshold, self.num_perm, *self.weights)
        if bands < 2:
            raise CurateError(
                f"dedup.minhash: threshold {self.threshold} with num_perm {self.num_perm} gives one LSH band",
                hint="raise num_perm or lower the threshold, or set bands and rows yourself",
            )
        return bands, rows
