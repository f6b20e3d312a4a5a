"""MinHash LSH clusters over many machines: band keys shuffled, buckets checked where they meet,
components found by rounds of shuffles, one record kept per cluster where its members meet.

On one machine `lsh.lsh_clusters` sorts every band's keys of every record at once (16 bytes a band
a record: 14 GB for 100M records at 9 bands) and merges pairs with a union-find over every record.
Spread out, the same decisions come in four steps, each an engine shuffle (`curate.dataset.Shuffle`)
whose result stays with the engine:

1. `emit_band_keys`, per part of the features: one row (key, band, row[, group]) per band of each
   record still in play;
2. the shuffle brings the rows of a key together; `link_buckets` sorts its share into buckets,
   loads the signatures of the records that share one (from the features on shared storage),
   checks their pairs as `lsh_clusters` does, and returns the edges that join them
   (`lsh.bucket_links`);
3. `components` turns the edges into stars, every record of a component linked to its lowest row,
   with the large-star and small-star rounds of Kiveris et al. ("Connected Components in MapReduce
   and Beyond", SoCC 2014): O(log n) rounds where label propagation needs one per link of the
   longest path. Only a count per round (the records not yet in a star) comes back;
4. `pick_kept` sees each star whole and keeps its best-ranked record, as `lsh.duplicates` does.

Only the drops (and one row per cluster, to number the clusters) come back to the caller. Records
that link nothing never enter steps 3 and 4. The components, and so every drop, its kept record and
its cluster, are those of the local engine (tests/test_ray_engine.py).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from curate.dataset import FeatureTable, RecordFiles, Shuffle
from curate.text import lsh
from curate.text.conversation import conversation_text
from curate.text.minhash import MinHashConfig, dtype_of
from curate.text.shingles import shingle_sets_at


def emit_band_keys(part: pa.Table, first_row: int, live: np.ndarray, groups: np.ndarray | None) -> pa.Table:
    """The band keys of a part's records that are `live` (a mask over all records), with each
    record's group when the scope needs it."""
    rows = np.flatnonzero(live[first_row : first_row + part.num_rows])
    column = part["bands"].combine_chunks()
    bands = column.type.list_size
    keys = column.flatten().to_numpy().reshape(-1, bands)[rows]
    columns = {
        "key": keys.reshape(-1),
        "band": np.tile(np.arange(bands, dtype=np.int32), rows.size),
        "row": np.repeat(rows + first_row, bands),
    }
    if groups is not None:
        columns["group"] = np.repeat(groups[rows + first_row], bands)
    return pa.table(columns)


def link_buckets(
    keyed: pa.Table,
    features: RecordFiles,
    records: RecordFiles,
    mh: MinHashConfig,
    scope: int,
    text_key: str,
) -> pa.Table:
    """Edges (left, right rows) joining the records of the buckets in `keyed` whose pairs pass the
    check `mh.verify` asks for; a bucket is the records with one band key (and group, within
    sources)."""
    within = scope == lsh.SCOPE_WITHIN
    band = keyed["band"].to_numpy()
    key = keyed["key"].to_numpy()
    row = keyed["row"].to_numpy()
    group = keyed["group"].to_numpy() if "group" in keyed.column_names else np.zeros(row.size, np.int64)
    order = np.lexsort((row, group, key, band) if within else (row, key, band))
    band, key, row, group = band[order], key[order], row[order], group[order]
    new = np.ones(row.size, bool)
    new[1:] = (band[1:] != band[:-1]) | (key[1:] != key[:-1]) | (within & (group[1:] != group[:-1]))
    bounds = np.append(np.flatnonzero(new), row.size)
    sizes = np.diff(bounds)
    multi = sizes > 1  # only buckets of two or more records link anything
    band_of = band[bounds[:-1][multi]]
    starts = np.append(0, np.cumsum(sizes[multi]))
    shared = np.repeat(multi, sizes)
    row, group = row[shared], group[shared]
    involved, first = np.unique(row, return_index=True)
    if involved.size == 0:
        return pa.table({"left": pa.array([], pa.int64()), "right": pa.array([], pa.int64())})
    table = FeatureTable(features, records)
    sigs = table.gather_matrix("signature", involved, dtype_of(mh.scheme)).reshape(involved.size, mh.num_perm)
    sets = None
    if mh.verify == "exact":
        text = conversation_text(pl.from_arrow(table.records(involved, ["messages"])), text_key)
        sets = shingle_sets_at(text, np.arange(involved.size), involved.size, mh.ngram, mh.unit, mh.lowercase)
    threshold = None if mh.verify == "none" else mh.threshold
    _, rows_per_band = mh.band_shape()
    left, right = lsh.bucket_links(
        starts,
        np.searchsorted(involved, row),
        band_of,
        sigs,
        rows_per_band,
        group[first],
        scope,
        threshold,
        sets,
    )
    return pa.table({"left": involved[left], "right": involved[right]})


def duplicates(
    table: FeatureTable,
    rows: np.ndarray,
    groups: np.ndarray,
    mh: MinHashConfig,
    scope: int,
    text_key: str,
    ranked: bool,
) -> lsh.Duplicates:
    """What `lsh.duplicates` gives for `rows`' LSH clusters (positions in `rows`), computed with the
    engine's shuffle (`table.shuffle`): no array of every record's cluster is ever made here.
    `ranked`: the features' `rank` column orders a cluster (lower stays), else input order."""
    shuffle = table.shuffle
    live = np.zeros(table.num_rows, bool)
    live[rows] = True
    records = table.record_files
    edges = shuffle(
        table.features,
        ["bands"],
        partial(emit_band_keys, live=live, groups=None if scope == lsh.SCOPE_ALL else groups),
        partial(
            link_buckets, features=table.features, records=records, mh=mh, scope=scope, text_key=text_key
        ),
    )
    stars, _ = components(shuffle, edges)
    across = scope == lsh.SCOPE_ACROSS
    picked = shuffle.collect(
        shuffle(
            stars,
            [],
            _by_root,
            partial(pick_kept, features=table.features, records=records, ranked=ranked, across=across),
        )
    )
    row = picked["row"].to_numpy()
    roots = np.unique(picked["cluster"].to_numpy())  # every cluster once: numbered by its lowest row
    dropped = np.flatnonzero(row >= 0)
    order = dropped[np.argsort(row[dropped], kind="stable")]
    return lsh.Duplicates(
        np.searchsorted(rows, row[order]),
        np.searchsorted(rows, picked["kept"].to_numpy()[order]),
        np.searchsorted(roots, picked["cluster"].to_numpy()[order]),
        picked["size"].to_numpy()[order],
    )


def components(shuffle: Shuffle, edges: Any, columns: tuple[str, str] = ("left", "right")) -> tuple[Any, int]:
    """The connected components of an edge list (`edges`: features parts with the two `columns`, or
    an earlier shuffle's result) as stars: one edge (left: node, right: its component's lowest node)
    per node that is not the lowest, as the engine's result; and the rounds (shuffles) it took.

    Large-star and small-star alternate until a large-star round finds its input already stars
    (every node either has no lower neighbour, or has exactly one neighbour, a lower one): only
    that count per round comes back here."""
    edges = shuffle(edges, list(columns), partial(_both_ways, columns=columns), _large_star)
    rounds = 1
    while shuffle.total(edges, "unsettled"):
        edges = shuffle(edges, [], partial(_toward_lower, columns=("left", "right")), _small_star)
        edges = shuffle(edges, [], partial(_both_ways, columns=("left", "right")), _large_star)
        rounds += 2
    return edges, rounds


def _edge_ends(edges: pa.Table, columns: tuple[str, str]) -> tuple[np.ndarray, np.ndarray]:
    """Both ends of the real edges (a round's count rows and self-loops left out)."""
    a = edges[columns[0]].to_numpy().astype(np.int64, copy=False)
    b = edges[columns[1]].to_numpy().astype(np.int64, copy=False)
    real = (a >= 0) & (a != b)
    return a[real], b[real]


def _both_ways(edges: pa.Table, _first_row: int, columns: tuple[str, str]) -> pa.Table:
    a, b = _edge_ends(edges, columns)
    node, other = np.concatenate([a, b]), np.concatenate([b, a])
    return pa.table({"key": node.astype(np.uint64), "node": node, "other": other})


def _toward_lower(edges: pa.Table, _first_row: int, columns: tuple[str, str]) -> pa.Table:
    a, b = _edge_ends(edges, columns)
    node, other = np.maximum(a, b), np.minimum(a, b)
    return pa.table({"key": node.astype(np.uint64), "node": node, "other": other})


def _neighbourhoods(keyed: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Distinct (node, other) pairs sorted by node, where each node's run starts, and its lowest other."""
    node, other = keyed["node"].to_numpy(), keyed["other"].to_numpy()
    order = np.lexsort((other, node))
    node, other = node[order], other[order]
    new = np.ones(node.size, bool)
    new[1:] = (node[1:] != node[:-1]) | (other[1:] != other[:-1])
    node, other = node[new], other[new]
    starts = _run_starts(node)
    lowest = np.minimum.reduceat(other, starts) if node.size else np.zeros(0, np.int64)
    return node, other, starts, lowest


def _edges(left: np.ndarray, right: np.ndarray, unsettled: int) -> pa.Table:
    """A round's edges, and one row (-1, -1) carrying its count of nodes not yet in a star."""
    return pa.table(
        {
            "left": np.append(left, -1).astype(np.int64),
            "right": np.append(right, -1).astype(np.int64),
            "unsettled": np.append(np.zeros(left.size, np.int64), unsettled),
        }
    )


def _run_starts(values: np.ndarray) -> np.ndarray:
    """Where each run of equal values starts in a sorted array (none in an empty one)."""
    return np.flatnonzero(np.append(values[:1] == values[:1], values[1:] != values[:-1]))


def _large_star(keyed: pa.Table) -> pa.Table:
    """Each node's higher neighbours linked to the lowest of its neighbourhood (itself included)."""
    node, other, starts, lowest = _neighbourhoods(keyed)
    sizes = np.diff(np.append(starts, node.size))
    low = np.minimum(lowest, node[starts])
    unsettled = int(np.count_nonzero((lowest < node[starts]) & (sizes > 1)))
    higher = other > node
    return _edges(other[higher], np.repeat(low, sizes)[higher], unsettled)


def _small_star(keyed: pa.Table) -> pa.Table:
    """Each node and its lower neighbours linked to the lowest of them."""
    node, other, starts, lowest = _neighbourhoods(keyed)
    sizes = np.diff(np.append(starts, node.size))
    low = np.repeat(lowest, sizes)
    members = np.concatenate([other, node[starts]])
    target = np.concatenate([low, lowest])
    keep = members != target
    return _edges(members[keep], target[keep], 0)


def _by_root(stars: pa.Table, _first_row: int) -> pa.Table:
    node, root = _edge_ends(stars, ("left", "right"))
    return pa.table({"key": root.astype(np.uint64), "node": node, "root": root})


def pick_kept(
    keyed: pa.Table, features: RecordFiles, records: RecordFiles, ranked: bool, across: bool
) -> pa.Table:
    """Per star (a cluster, all of it here): its records to drop (row, kept, cluster: its lowest row,
    size), chosen as `lsh.duplicates` does (lowest rank stays, input order on ties; with `across`,
    only records of another group than the kept one's go), and one row with row -1 per cluster."""
    node, root = keyed["node"].to_numpy(), keyed["root"].to_numpy()
    roots = np.unique(root)
    member = np.concatenate([roots, node])  # a star names each of its other nodes once
    cluster = np.concatenate([roots, root])
    table = FeatureTable(features, records)
    by_row = np.argsort(member, kind="stable")
    primary = np.zeros(member.size)
    if ranked:
        primary[by_row] = table.gather("rank", member[by_row]).to_numpy()
    order = np.lexsort((member, primary, cluster))
    member, cluster = member[order], cluster[order]
    first = _run_starts(cluster)
    sizes = np.diff(np.append(first, member.size))
    kept = np.repeat(member[first], sizes)
    drop = member != kept
    if across:
        group = np.empty(member.size, object)
        by_row = np.argsort(member, kind="stable")
        group[by_row] = table.gather("group", member[by_row]).to_numpy(zero_copy_only=False)
        drop &= group != group[np.repeat(first, sizes)]
    size = np.repeat(sizes, sizes)
    return pa.table(
        {
            "row": np.concatenate([member[drop], np.full(first.size, -1)]).astype(np.int64),
            "kept": np.concatenate([kept[drop], member[first]]).astype(np.int64),
            "cluster": np.concatenate([cluster[drop], cluster[first]]).astype(np.int64),
            "size": np.concatenate([size[drop], sizes]).astype(np.int64),
        }
    )
