"""MinHash LSH for whole tables: bands from the threshold as datasketch picks them, buckets, clusters.

datasketch's `MinHashLSH` puts a record in one bucket per band (a run of `rows` signature values)
and calls two records candidates when any band is equal. Here all bands are hashed at once and
sorted, so each bucket is a run of equal keys. Unchecked, a bucket links its members to its first
row (the same clusters as every pair, in linear size); checked, every pair of a bucket is compared
unless union-find already joined it, which gives exactly the clusters of checking every candidate
pair a `MinHashLSH` query returns.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numba
import numpy as np
import polars as pl

from curate.text.parallel import each_chunk
from curate.text.utf8 import fmix64

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


@numba.njit(cache=True)
def _same_band(sigs, slot, i, j, lo, hi):
    for q in range(lo, hi):
        if sigs[slot[i], q] != sigs[slot[j], q]:
            return False
    return True


@numba.njit(nogil=True, cache=True)
def _band_hashes(k, sigs, bands, rows, keys):
    """keys[i, k]: a 64-bit hash of record i's band k."""
    n = sigs.shape[0]
    lo = k * rows
    for i in range(n):
        h = np.uint64(k + 1) * _GOLDEN
        for q in range(lo, lo + rows):
            h = fmix64(h ^ np.uint64(sigs[i, q]))
        keys[i, k] = h


@numba.njit(nogil=True, cache=True)
def _mix_groups(k, keys, groups, out):
    for i in range(keys.shape[1]):
        out[k, i] = fmix64(keys[k, i] ^ np.uint64(groups[i]))


def band_hashes(sigs: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(n, bands) uint64: one hash per LSH band of each signature. Computed batch by batch, so the
    LSH step needs only these (8 bytes a band) and the signatures of records that share a bucket."""
    if bands * rows > sigs.shape[1]:
        raise ValueError(f"{bands} bands of {rows} rows need {bands * rows} values, not {sigs.shape[1]}")
    keys = np.empty((sigs.shape[0], bands), dtype=np.uint64)
    if sigs.shape[0]:
        each_chunk(_band_hashes, bands, sigs, bands, rows, keys)
    return keys


@dataclass
class Buckets:
    """The LSH buckets of n records: band keys (bands, n), each band's rows in key order (so each
    bucket is a run), and the records' groups (for the scope rules)."""

    keys: np.ndarray
    orders: np.ndarray
    groups: np.ndarray

    @classmethod
    def of(cls, hashes: np.ndarray, groups: np.ndarray | None = None, scope: int = SCOPE_ALL) -> Buckets:
        """Buckets from `band_hashes` (n, bands); within groups, a group's records share buckets only."""
        n = hashes.shape[0]
        groups = (
            np.zeros(n, dtype=np.int64) if groups is None else np.ascontiguousarray(groups, dtype=np.int64)
        )
        keys = np.ascontiguousarray(hashes.T)
        if scope == SCOPE_WITHIN and n:
            mixed = np.empty_like(keys)
            each_chunk(_mix_groups, keys.shape[0], keys, groups, mixed)
            keys = mixed
        # polars sorts the bands on all cores, several times faster than numpy or numba here
        orders = np.empty(keys.shape, dtype=np.int64)
        for k in range(keys.shape[0]):
            orders[k] = pl.Series(keys[k]).arg_sort().to_numpy()
        return cls(keys, orders, groups)

    def shared(self) -> np.ndarray:
        """Which records share a bucket (an equal band key) with another: only their signatures
        are ever compared."""
        n = self.keys.shape[1]
        out = np.zeros(n, dtype=np.bool_)
        for k in range(self.keys.shape[0]):
            ordered = self.keys[k][self.orders[k]]
            same = ordered[1:] == ordered[:-1]
            out[self.orders[k][1:][same]] = True
            out[self.orders[k][:-1][same]] = True
        return out


@numba.njit(cache=True)
def _bucket(keys, order, start, sigs, slot, lo, hi):
    """The members of the bucket starting at `start` of a band's sort order, by row, and where it ends.

    Records whose band values differ from the first member's (a 64-bit hash collision) are left
    out, so a bucket holds exactly the records datasketch would put in it.
    """
    n = order.size
    end = start + 1
    while end < n and keys[order[end]] == keys[order[start]]:
        end += 1
    if end - start == 1:
        return order[start:end], end
    members = np.sort(order[start:end])
    same = np.ones(members.size, dtype=np.bool_)
    for j in range(1, members.size):
        same[j] = _same_band(sigs, slot, members[j], members[0], lo, hi)
    return members[same], end


@numba.njit(cache=True)
def _star_links(sigs, slot, bands, rows, groups, scope, keys, orders, left, right):
    e = 0
    for k in range(bands):
        lo = k * rows
        start = 0
        while start < orders.shape[1]:
            members, end = _bucket(keys[k], orders[k], start, sigs, slot, lo, lo + rows)
            start = end
            if members.size < 2:
                continue
            head = members[0]
            other = -1  # across groups: the first member from another group than the head's
            for m in members:
                if groups[m] != groups[head]:
                    other = m
                    break
            for m in members[1:]:
                partner = head
                if scope == SCOPE_ACROSS and groups[m] == groups[head]:
                    partner = other
                    if partner < 0:
                        continue
                left[e] = m
                right[e] = partner
                e += 1
    return e


class Signatures:
    """Signatures of the records that share a bucket, and where each record's row is (`slot`)."""

    def __init__(self, values: np.ndarray, slot: np.ndarray) -> None:
        self.values = values
        self.slot = slot

    @classmethod
    def whole(cls, sigs: np.ndarray) -> Signatures:
        return cls(sigs, np.arange(sigs.shape[0], dtype=np.int64))

    def rows(self, rows: np.ndarray) -> np.ndarray:
        return self.values[self.slot[rows]]


def _full(sigs: np.ndarray | Signatures) -> Signatures:
    return sigs if isinstance(sigs, Signatures) else Signatures.whole(sigs)


def candidate_pairs(
    sigs: np.ndarray | Signatures,
    bands: int,
    rows: int,
    groups: np.ndarray | None = None,
    scope: int = SCOPE_ALL,
    buckets: Buckets | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Candidate pairs (left, right), left > right, sorted: each bucket's members linked to its first row.

    Across groups, a member of the first row's group links to the bucket's first row of another
    group instead. The pairs span the same clusters as every in-bucket pair would, in linear size.
    Without `buckets`, `sigs` holds every record's signature and the buckets are made from it.
    """
    sigs = _full(sigs)
    if buckets is None:
        buckets = Buckets.of(band_hashes(sigs.values, bands, rows), groups, scope)
    n = buckets.keys.shape[1]
    left = np.empty(bands * n, dtype=np.int64)
    right = np.empty_like(left)
    e = 0
    if n:
        e = _star_links(
            sigs.values,
            sigs.slot,
            bands,
            rows,
            buckets.groups,
            scope,
            buckets.keys,
            buckets.orders,
            left,
            right,
        )
    size = np.int64(max(n, 1))
    pair = np.unique(np.maximum(left[:e], right[:e]) * size + np.minimum(left[:e], right[:e]))
    return pair // size, pair % size


@numba.njit(cache=True)
def _similar(sigs, slot, offsets, hashes, i, j, threshold):
    if offsets.size == 0:  # estimated Jaccard, computed as datasketch's MinHash.jaccard does
        num_perm = sigs.shape[1]
        same = 0
        for q in range(num_perm):
            same += sigs[slot[i], q] == sigs[slot[j], q]
        return same / num_perm >= threshold
    return _set_jaccard(offsets, hashes, i, j) >= threshold


@numba.njit(cache=True)
def _checked_clusters(sigs, slot, bands, rows, groups, scope, keys, orders, threshold, offsets, hashes):
    n = keys.shape[1]
    parent = np.arange(n)
    for k in range(bands):
        lo = k * rows
        start = 0
        while start < n:
            members, end = _bucket(keys[k], orders[k], start, sigs, slot, lo, lo + rows)
            start = end
            for a in range(members.size):
                for b in range(a + 1, members.size):
                    i, j = members[a], members[b]
                    if scope == SCOPE_ACROSS and groups[i] == groups[j]:
                        continue
                    ri, rj = _find(parent, i), _find(parent, j)
                    # a pair already joined needs no check: this keeps big buckets of near-copies cheap
                    if ri != rj and _similar(sigs, slot, offsets, hashes, i, j, threshold):
                        parent[max(ri, rj)] = min(ri, rj)
    for i in range(n):
        parent[i] = _find(parent, i)
    return parent


def lsh_clusters(
    sigs: np.ndarray | Signatures,
    bands: int,
    rows: int,
    threshold: float | None = None,
    groups: np.ndarray | None = None,
    scope: int = SCOPE_ALL,
    sets: tuple[np.ndarray, np.ndarray] | None = None,
    buckets: Buckets | None = None,
) -> np.ndarray:
    """Each record's cluster root (the lowest row of its cluster) under MinHash LSH.

    Two records of a band bucket are linked when `threshold` is None (every candidate, as a plain
    `MinHashLSH` query), or when their estimated Jaccard, or with `sets` (offsets, sorted hashes,
    as `shingle_hash_sets` gives) their exact Jaccard, reaches it. The clusters are the connected
    components: the same as linking every checked candidate pair of a `MinHashLSH` index.
    Without `buckets`, `sigs` holds every record's signature and the buckets are made from it;
    with them, `sigs` needs only the records that share a bucket (`Buckets.shared`).
    """
    sigs = _full(sigs)
    if buckets is None:
        buckets = Buckets.of(band_hashes(sigs.values, bands, rows), groups, scope)
    if threshold is None:
        left, right = candidate_pairs(sigs, bands, rows, buckets=buckets, scope=scope)
        return clusters(buckets.keys.shape[1], left, right)
    offsets, hashes = sets if sets is not None else (np.empty(0, np.int64), np.empty(0, np.uint64))
    return _checked_clusters(
        sigs.values,
        sigs.slot,
        bands,
        rows,
        buckets.groups,
        scope,
        buckets.keys,
        buckets.orders,
        float(threshold),
        offsets,
        hashes,
    )


@numba.njit(cache=True)
def _bucket_links(starts, members, band_of, sigs, rows, groups, scope, check, threshold, offsets, hashes):
    ident = np.arange(sigs.shape[0])
    left = np.empty(members.size, np.int64)
    right = np.empty(members.size, np.int64)
    e = 0
    for b in range(starts.size - 1):
        lo_m, hi_m = starts[b], starts[b + 1]
        lo = band_of[b] * rows
        kept = np.empty(hi_m - lo_m, np.int64)
        c = 0
        for j in range(lo_m, hi_m):  # a member whose band differs from the first's: a hash collision
            if j == lo_m or _same_band(sigs, ident, members[j], members[lo_m], lo, lo + rows):
                kept[c] = members[j]
                c += 1
        parent = np.arange(c)
        for a in range(c):
            for q in range(a + 1, c):
                i, j = kept[a], kept[q]
                if scope == SCOPE_ACROSS and groups[i] == groups[j]:
                    continue
                ra, rq = _find(parent, a), _find(parent, q)
                if ra != rq and (not check or _similar(sigs, ident, offsets, hashes, i, j, threshold)):
                    parent[max(ra, rq)] = min(ra, rq)
        for a in range(c):
            r = _find(parent, a)
            if r != a:
                left[e] = kept[a]
                right[e] = kept[r]
                e += 1
    return left[:e], right[:e]


def bucket_links(
    starts: np.ndarray,
    members: np.ndarray,
    band_of: np.ndarray,
    sigs: np.ndarray,
    rows: int,
    groups: np.ndarray,
    scope: int,
    threshold: float | None,
    sets: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Edges (member, the lowest member it is joined to) that join, per bucket, what checking every
    pair of the bucket joins, as `lsh_clusters` checks them: the same connected components, found
    bucket by bucket, so buckets can be checked on any machine and the edges merged after.

    Bucket b is members[starts[b]:starts[b + 1]] (rows of `sigs`, `groups` and `sets`, ascending),
    of LSH band band_of[b]; `threshold` None links every candidate."""
    offsets, hashes = sets if sets is not None else (np.empty(0, np.int64), np.empty(0, np.uint64))
    return _bucket_links(
        np.asarray(starts, np.int64),
        np.asarray(members, np.int64),
        np.asarray(band_of, np.int64),
        sigs,
        rows,
        np.asarray(groups, np.int64),
        scope,
        threshold is not None,
        0.0 if threshold is None else float(threshold),
        offsets,
        hashes,
    )


@numba.njit(cache=True)
def _pair_estimates(sigs, slot, left, right, out):
    num_perm = sigs.shape[1]
    for p in range(left.size):
        same = 0
        for q in range(num_perm):
            same += sigs[slot[left[p]], q] == sigs[slot[right[p]], q]
        out[p] = same / num_perm


def pair_jaccard_estimates(sigs: np.ndarray | Signatures, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Estimated Jaccard similarity of each pair (sigs[left[p]], sigs[right[p]])."""
    sigs = _full(sigs)
    out = np.empty(left.size, dtype=np.float64)
    if left.size:
        _pair_estimates(sigs.values, sigs.slot, left, right, out)
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


@numba.njit(cache=True)
def _set_jaccard(offsets, hashes, i, j):
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
    return common / union if union else 1.0


@numba.njit(cache=True)
def _pair_exact(offsets, hashes, left, right, out):
    for p in range(left.size):
        out[p] = _set_jaccard(offsets, hashes, left[p], right[p])


def pair_jaccard_exact(
    offsets: np.ndarray, hashes: np.ndarray, left: np.ndarray, right: np.ndarray
) -> np.ndarray:
    """Exact Jaccard of each pair of sets, sets given as sorted unique hashes (`shingle_hash_sets`)."""
    out = np.empty(left.size, dtype=np.float64)
    if left.size:
        _pair_exact(offsets, hashes, np.asarray(left, np.int64), np.asarray(right, np.int64), out)
    return out


@dataclass
class Duplicates:
    """The members of clusters that are not their cluster's kept record, by position (ascending)."""

    rows: np.ndarray  # positions of the records to drop
    kept: np.ndarray  # the position of each one's kept record
    cluster: np.ndarray  # its cluster's number (clusters are numbered by their first position)
    size: np.ndarray  # its cluster's size


def duplicates(
    keys: list[np.ndarray], rank: np.ndarray, groups: np.ndarray | None = None, across: bool = False
) -> Duplicates:
    """Clusters of records with equal `keys`: in each, the record of lowest `rank` stays and the others
    go (with `across`, only those of another group than the kept record's). One sort, no hash
    tables: a few arrays of the records' length, however many there are."""
    n = rank.size
    order = np.lexsort((rank, *reversed(keys)))
    starts_mask = np.zeros(n, dtype=np.bool_)
    starts_mask[:1] = True
    for key in keys:
        ordered = key[order]
        starts_mask[1:] |= ordered[1:] != ordered[:-1]
    starts = np.flatnonzero(starts_mask)
    sizes = np.diff(np.append(starts, n))
    group_of = np.cumsum(starts_mask) - 1
    kept = order[starts][group_of]
    size = sizes[group_of]
    multi = np.flatnonzero(sizes > 1)
    first = np.minimum.reduceat(order, starts)[multi] if n else np.zeros(0, np.int64)
    number = np.full(sizes.size, -1, dtype=np.int64)
    number[multi[np.argsort(first, kind="stable")]] = np.arange(multi.size)
    member = (size > 1) & (order != kept)
    if across and groups is not None:
        member &= groups[order] != groups[kept]
    pos = order[member]
    by_pos = np.argsort(pos, kind="stable")
    return Duplicates(
        pos[by_pos], kept[member][by_pos], number[group_of[member]][by_pos], size[member][by_pos]
    )


def best_per_record(left: np.ndarray, right: np.ndarray, score: np.ndarray) -> np.ndarray:
    """For each distinct `left` of a list of pairs, the pair with the highest score (the lowest
    `right` on ties): indices into the pairs, ordered by `left`."""
    order = np.lexsort((right, -score, left))
    first_of = np.ones(order.size, dtype=bool)
    first_of[1:] = left[order][1:] != left[order][:-1]
    return order[first_of]
