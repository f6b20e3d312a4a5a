"""Choosing a diverse subset of embedded records: the algorithms behind the diversity stage.

Every function takes unit vectors (rows of `X`, float32; a zero row stands for an empty text) and
returns row numbers, the same for the same input and seed. Distances are reported as cosine
distance, 1 - cos, which is half the squared Euclidean distance of unit vectors, so nearest is
nearest either way.

- `kcenter`: greedy farthest point (Gonzalez): each new pick is the record farthest from every
  pick so far, which at most doubles the best possible coverage radius. Exact, with each record's
  nearest pick tracked as picks are added; distances to likely next picks are computed many at a
  time as one matrix product (see `kcenter`), so k = 5,000 of 85k records takes seconds.
- `cluster_quota`: k-means, then a share of the budget per cluster (equal or proportional to its
  size), each cluster's share chosen by k-center inside it.
- `semdedup`: k-means, then inside each cluster the records within a cosine threshold of a kept
  one are dropped (SemDeDup, Abbas et al. 2023), keeping the least typical of each group.
- `score_greedy`: highest score first, skipping a record within a cosine distance of one kept
  already (as Deita selects), until the budget is spent.
"""

from __future__ import annotations

import numpy as np

# k-center -------------------------------------------------------------------------------------------


def kcenter(
    X: np.ndarray, k: int, first: int, speculate: int = 64
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pick min(k, n) rows by greedy farthest point from row `first`: (picks in order, each row's
    nearest pick as an index into picks, its cosine distance to it).

    Each pick needs every row's distance to it. Computing them one pick at a time reads all of X
    per pick (memory-bound); instead the `speculate` rows farthest from the picks so far get their
    distances to every row in one matrix product, and picks are made from them while the farthest
    row is among them (about two in three are). The result is exactly the one-at-a-time greedy's.
    """
    n = X.shape[0]
    k = min(k, n)
    X = np.ascontiguousarray(X, np.float32)
    squares = np.einsum("ij,ij->i", X, X)
    picks = np.zeros(k, np.int64)
    owner = np.zeros(n, np.int64)
    if k == 0:
        return picks, owner, np.zeros(n)
    d2 = _squared_distances(X, squares, np.array([first]))[0]
    picks[0] = first
    made = 1
    while made < k:
        candidates = np.argpartition(-d2, speculate)[:speculate] if speculate < n else np.arange(n)
        rows = _squared_distances(X, squares, candidates)
        column = {int(c): j for j, c in enumerate(candidates)}
        while made < k:
            best = int(np.argmax(d2))
            if d2[best] <= 0.0:  # every row sits on a pick
                return picks[:made], owner, d2 / 2.0
            j = column.get(best)
            if j is None:
                break
            closer = rows[j] < d2
            d2[closer] = rows[j][closer]
            owner[closer] = made
            d2[best] = 0.0
            owner[best] = made
            picks[made] = best
            made += 1
    return picks, owner, np.maximum(d2, 0.0).astype(np.float64) / 2.0


def _squared_distances(X: np.ndarray, squares: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """(len(rows), n) squared Euclidean distances (a zero row, from an empty text, is at 0 from
    another zero row and at 1 from any unit row)."""
    out = X[rows] @ X.T
    out *= -2.0
    out += squares[None, :]
    out += squares[rows][:, None]
    return np.maximum(out, 0.0, out=out)


# nearest kept record ------------------------------------------------------------------------------


def nearest(X: np.ndarray, kept: np.ndarray, block: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """For every row: the index (into `kept`) of its nearest kept row, and the cosine distance."""
    n = X.shape[0]
    index = np.zeros(n, np.int64)
    distance = np.zeros(n)
    if not kept.size:
        return index, np.full(n, np.nan)
    X = np.ascontiguousarray(X, np.float32)
    squares = np.einsum("ij,ij->i", X, X)
    for s in range(0, n, block):
        sims = X[s : s + block] @ X[kept].T
        d2 = squares[s : s + block, None] + squares[kept][None, :] - 2.0 * sims
        index[s : s + block] = d2.argmin(axis=1)
        distance[s : s + block] = np.maximum(d2.min(axis=1), 0.0) / 2.0
    distance[kept] = 0.0
    index[kept] = np.arange(kept.size)
    return index, distance


# k-means based -------------------------------------------------------------------------------------


def kmeans(X: np.ndarray, clusters: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(label per row, unit centroids): scikit-learn's k-means, mini-batch past 20k rows (on all of
    raw/, 100 clusters: 2.4-6.7 s instead of 16 s, within 1-2% of the full algorithm's inertia)."""
    from sklearn.cluster import KMeans, MiniBatchKMeans

    clusters = max(1, min(clusters, X.shape[0]))
    if X.shape[0] > 20_000:
        model = MiniBatchKMeans(clusters, random_state=seed, n_init=1, batch_size=4096)
    else:
        model = KMeans(clusters, random_state=seed, n_init=1)
    labels = model.fit_predict(X).astype(np.int64)
    centroids = model.cluster_centers_.astype(np.float32)
    norms = np.linalg.norm(centroids, axis=1, keepdims=True)
    return labels, centroids / np.where(norms > 0, norms, 1.0)


def quotas(sizes: np.ndarray, k: int, share: str) -> np.ndarray:
    """How many records each cluster gives: `equal` (water-filling: a small cluster gives all it
    has and the rest is shared among the others) or `proportional` (largest remainders)."""
    sizes = np.asarray(sizes, np.int64)
    k = min(k, int(sizes.sum()))
    if share == "proportional":
        exact = sizes * k / max(sizes.sum(), 1)
        out = np.floor(exact).astype(np.int64)
        order = np.lexsort((np.arange(sizes.size), -(exact - out)))
        out[order[: k - out.sum()]] += 1
        return out
    out = np.zeros_like(sizes)
    left = k
    open_ = sizes > 0
    while left > 0 and open_.any():
        each = max(1, left // int(open_.sum()))
        for c in np.flatnonzero(open_):
            give = min(each, sizes[c] - out[c], left)
            out[c] += give
            left -= give
            if out[c] == sizes[c]:
                open_[c] = False
            if left == 0:
                break
    return out


def cluster_quota(X: np.ndarray, labels: np.ndarray, centroids: np.ndarray, k: int, share: str) -> np.ndarray:
    """Each cluster's quota of rows, chosen by k-center inside it from its most central row."""
    sizes = np.bincount(labels, minlength=centroids.shape[0])
    picks = []
    for c, quota in enumerate(quotas(sizes, k, share)):
        if quota == 0:
            continue
        rows = np.flatnonzero(labels == c)
        first = int(np.argmax(X[rows] @ centroids[c]))
        chosen, _, _ = kcenter(X[rows], int(quota), first)
        picks.append(rows[chosen])
    return np.sort(np.concatenate(picks)) if picks else np.zeros(0, np.int64)


def semdedup(X: np.ndarray, labels: np.ndarray, centroids: np.ndarray, threshold: float) -> np.ndarray:
    """Rows kept when, inside each cluster, a row at cosine similarity >= threshold to a kept row
    goes; rows far from their centroid are kept first (SemDeDup keeps the least typical)."""
    keep = np.zeros(X.shape[0], bool)
    for c in range(centroids.shape[0]):
        rows = np.flatnonzero(labels == c)
        if not rows.size:
            continue
        rows = rows[np.argsort(X[rows] @ centroids[c], kind="stable")]  # least typical first
        keep[rows[_greedy_apart(X[rows], 1.0 - threshold, rows.size)]] = True
    return np.flatnonzero(keep)


def score_greedy(X: np.ndarray, scores: np.ndarray, k: int, min_distance: float) -> np.ndarray:
    """Rows by descending score (ties: first row first), skipping any within `min_distance` (cosine)
    of a row kept already, until k are kept."""
    order = np.lexsort((np.arange(len(scores)), -np.asarray(scores, np.float64)))
    return np.sort(order[_greedy_apart(X[order], min_distance, k)])


def _greedy_apart(X: np.ndarray, min_distance: float, k: int, block: int = 512) -> np.ndarray:
    """Positions, in order, of the rows kept by: keep a row unless it is within `min_distance`
    (cosine) of a kept one; stop at k. Rows are compared a block at a time with BLAS."""
    limit = 1.0 - min_distance  # similarity from which a row is too close
    kept: list[int] = []
    kept_vectors = np.zeros((min(k, X.shape[0]), X.shape[1]), np.float32)
    for s in range(0, X.shape[0], block):
        if len(kept) >= k:
            break
        chunk = X[s : s + block]
        close = np.zeros(len(chunk), bool)
        if kept:
            close = (chunk @ kept_vectors[: len(kept)].T).max(axis=1) >= limit
        inner = chunk @ chunk.T
        taken: list[int] = []
        for i in range(len(chunk)):
            if close[i] or (taken and inner[i, taken].max() >= limit):
                continue
            taken.append(i)
            kept_vectors[len(kept)] = chunk[i]
            kept.append(s + i)
            if len(kept) >= k:
                break
    return np.asarray(kept, np.int64)
