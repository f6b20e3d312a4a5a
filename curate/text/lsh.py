"""MinHash LSH for whole tables: bands from the threshold as datasketch picks them, candidate pairs, clusters.

datasketch's `MinHashLSH` puts a record in one bucket per band (a run of `rows` signature values)
and calls two records candidates when any band is equal. Here every band's buckets are found at
once by sorting the band hashes, and each bucket links its members to its first record (lowest
row), which gives the same clusters as linking every pair, in linear rather than quadratic pairs.
"""

from __future__ import annotations

import functools

import numba
import numpy as np

SCOPE_ALL = 0  # any two records may be duplicates
SCOPE_WITHIN = 1  # only records of the same group (source)
SCOPE_ACROSS = 2  # only records of different groups

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


@functools.lru_cache(maxsize=64)
def optimal_params(
    threshold: float, num_perm: int, fp_weight: float = 0.5, fn_weight: float = 0.5
) -> tuple[int, int]:
    """(bands, rows) minimising fp_weight * P(false positive) + fn_weight * P(false negative).

    The same grid search as datasketch's `MinHashLSH`: over every b and r with b * r <= num_perm,
    the first minimum in (b, r) order. The integrals of the S-curve 1 - (1 - s^r)^b are of
    polynomials of degree b * r <= num_perm, which Gauss-Legendre quadrature with more than
    num_perm / 2 nodes integrates exactly, so no adaptive integrator is needed.
    """
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    if num_perm < 2:
        raise ValueError(f"num_perm must be at least 2, got {num_perm}")
    pairs = [(b, r) for b in range(1, num_perm + 1) for r in range(1, num_perm // b + 1)]
    b = np.array([p[0] for p in pairs], dtype=np.float64)[:, None]
    r = np.array([p[1] for p in pairs], dtype=np.float64)[:, None]
    nodes, weights = np.polynomial.legendre.leggauss(num_perm // 2 + 8)
    # false positives: the candidate probability integrated below the threshold
    s_lo = threshold * (nodes + 1) / 2
    fp = (1 - (1 - s_lo**r) ** b) @ weights * (threshold / 2)
    # false negatives: the miss probability integrated above it
    s_hi = threshold + (1 - threshold) * (nodes + 1) / 2
    fn = ((1 - s_hi**r) ** b) @ weights * ((1 - threshold) / 2)
    best = int(np.argmin(fp * fp_weight + fn * fn_weight))
    return pairs[best]


@numba.njit(inline="always")
def _mix(h):
    h ^= h >> np.uint64(33)
    h *= np.uint64(0xFF51AFD7ED558CCD)
    h ^= h >> np.uint64(33)
    h *= np.uint64(0xC4CEB9FE1A85EC53)
    return h ^ (h >> np.uint64(33))


@numba.njit(cache=True)
def _same_band(sigs, i, j, lo, hi):
    for q in range(lo, hi):
        if sigs[i, q] != sigs[j, q]:
            return False
    return True


@numba.njit(parallel=True, cache=True)
def _band_links(sigs, bands, rows, groups, scope, left, right, counts):
    n = sigs.shape[0]
    for k in numba.prange(bands):
        lo = k * rows
        hi = lo + rows
        keys = np.empty(n, np.uint64)
        for i in range(n):
            h = np.uint64(k + 1) * _GOLDEN
            for q in range(lo, hi):
                h = _mix(h ^ np.uint64(sigs[i, q]))
            if scope == SCOPE_WITHIN:
                h = _mix(h ^ np.uint64(groups[i]))
            keys[i] = h
        order = np.argsort(keys)
        e = 0
        start = 0
        while start < n:
            end = start + 1
            while end < n and keys[order[end]] == keys[order[start]]:
                end += 1
            if end - start > 1:
                head = order[start]
                for j in range(start + 1, end):
                    head = min(head, order[j])
                # for SCOPE_ACROSS: the first member from another group than the head's
                other = -1
                for j in range(start, end):
                    m = order[j]
                    if groups[m] != groups[head] and (other < 0 or m < other):
                        if _same_band(sigs, m, head, lo, hi):
                            other = m
                for j in range(start, end):
                    m = order[j]
                    # a 64-bit hash collision can mix different bands in one run: check the values
                    if m == head or not _same_band(sigs, m, head, lo, hi):
                        continue
                    partner = head
                    if scope == SCOPE_WITHIN and groups[m] != groups[head]:
                        continue
                    if scope == SCOPE_ACROSS and groups[m] == groups[head]:
                        partner = other
                        if partner < 0:
                            continue
                    left[k, e] = m
                    right[k, e] = partner
                    e += 1
            start = end
        counts[k] = e


def candidate_pairs(
    sigs: np.ndarray, bands: int, rows: int, groups: np.ndarray | None = None, scope: int = SCOPE_ALL
) -> tuple[np.ndarray, np.ndarray]:
    """Candidate duplicate pairs (left, right) with left > right: records sharing a band bucket.

    Each bucket links every member to its lowest row (or, across groups, to the lowest row of
    another group), so the pairs span exactly the clusters that all in-bucket pairs would.
    Sorted and without repeats, so the result does not depend on thread timing.
    """
    n = sigs.shape[0]
    if bands * rows > sigs.shape[1]:
        raise ValueError(
            f"{bands} bands of {rows} rows need {bands * rows} values; signatures have {sigs.shape[1]}"
        )
    if groups is None:
        groups = np.zeros(n, dtype=np.int64)
    left = np.empty((bands, n), dtype=np.int64)
    right = np.empty((bands, n), dtype=np.int64)
    counts = np.zeros(bands, dtype=np.int64)
    if n > 1:
        _band_links(
            sigs, bands, rows, np.ascontiguousarray(groups, dtype=np.int64), scope, left, right, counts
        )
    hi = np.concatenate([np.maximum(left[k, : counts[k]], right[k, : counts[k]]) for k in range(bands)])
    lo = np.concatenate([np.minimum(left[k, : counts[k]], right[k, : counts[k]]) for k in range(bands)])
    del left, right
    pair = np.unique(hi * np.int64(n) + lo)
    return pair // n, pair % n


@numba.njit(parallel=True, cache=True)
def _pair_estimates(sigs, left, right, out):
    num_perm = sigs.shape[1]
    for p in numba.prange(left.size):
        same = 0
        for q in range(num_perm):
            same += sigs[left[p], q] == sigs[right[p], q]
        out[p] = same / num_perm


def pair_jaccard_estimates(sigs: np.ndarray, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Estimated Jaccard similarity of each pair (sigs[left[p]], sigs[right[p]])."""
    out = np.empty(left.size, dtype=np.float64)
    if left.size:
        _pair_estimates(sigs, left, right, out)
    return out


@numba.njit(cache=True)
def _find(parent, i):
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


@numba.njit(cache=True)
def _union_find(n, left, right):
    parent = np.arange(n)
    for p in range(left.size):
        a = _find(parent, left[p])
        b = _find(parent, right[p])
        if a < b:
            parent[b] = a
        elif b < a:
            parent[a] = b
    for i in range(n):
        parent[i] = _find(parent, i)
    return parent


def clusters(n: int, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Connected components of the pair graph: each record's cluster root, the lowest row in it."""
    return _union_find(n, np.asarray(left, dtype=np.int64), np.asarray(right, dtype=np.int64))


@numba.njit(parallel=True, cache=True)
def _pair_exact(offsets, hashes, left, right, out):
    for p in numba.prange(left.size):
        i, j = left[p], right[p]
        a, a_end = offsets[i], offsets[i + 1]
        b, b_end = offsets[j], offsets[j + 1]
        size = (a_end - a) + (b_end - b)
        common = 0
        while a < a_end and b < b_end:
            if hashes[a] == hashes[b]:
                common += 1
                a += 1
                b += 1
            elif hashes[a] < hashes[b]:
                a += 1
            else:
                b += 1
        union = size - common
        out[p] = common / union if union else 1.0


def pair_jaccard_exact(
    offsets: np.ndarray, hashes: np.ndarray, left: np.ndarray, right: np.ndarray
) -> np.ndarray:
    """Exact Jaccard of each pair of sets, sets given as sorted unique hashes (`shingle_hash_sets`)."""
    out = np.empty(left.size, dtype=np.float64)
    if left.size:
        _pair_exact(offsets, hashes, np.asarray(left, np.int64), np.asarray(right, np.int64), out)
    return out
