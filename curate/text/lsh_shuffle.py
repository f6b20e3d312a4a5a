"""MinHash LSH clusters over many machines: band keys shuffled, buckets checked where they meet.

On one machine `lsh.lsh_clusters` sorts every band's keys of every record at once (16 bytes a band
a record: 14 GB for 100M records at 9 bands). Spread out, the same clusters come in three steps:

1. `emit_band_keys`, per part of the features: one row (key, band, row[, group]) per band of each
   record still in play;
2. the engine's shuffle brings the rows of a key together; `link_buckets` sorts its share into
   buckets, loads the signatures of the records that share one (from the features on shared
   storage), checks their pairs as `lsh_clusters` does, and returns the edges that join them
   (`lsh.bucket_links`);
3. `clusters` merges the edges with a union-find in the caller's process: at most one edge per
   record and band, and only for records that share a bucket, so far fewer than the keys.

The components, and so every cluster root, are those of `lsh_clusters` (tests/test_ray_engine.py).
"""

from __future__ import annotations

from functools import partial

import numpy as np
import polars as pl
import pyarrow as pa

from curate.dataset import FeatureTable, RecordFiles
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


def clusters(
    table: FeatureTable, rows: np.ndarray, groups: np.ndarray, mh: MinHashConfig, scope: int, text_key: str
) -> np.ndarray:
    """Each of `rows`' cluster root (the lowest position in its cluster), as `lsh.lsh_clusters`
    gives it, computed with the engine's shuffle (`table.shuffle`)."""
    live = np.zeros(table.num_rows, bool)
    live[rows] = True
    records = table.record_files
    edges = table.shuffle(
        table.features,
        ["bands"],
        partial(emit_band_keys, live=live, groups=None if scope == lsh.SCOPE_ALL else groups),
        partial(
            link_buckets, features=table.features, records=records, mh=mh, scope=scope, text_key=text_key
        ),
    )
    left = np.searchsorted(rows, edges["left"].to_numpy())
    right = np.searchsorted(rows, edges["right"].to_numpy())
    return lsh.clusters(rows.size, left, right)
