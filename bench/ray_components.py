"""Connected components of a MinHash edge list: Ray's large-star/small-star shuffles against the
one-process union-find the Ray engine used to run on the driver (`lsh.clusters`), on a synthetic
edge list shaped like near-duplicate clusters: mostly pairs and small clumps, a few long chains.

    python bench/ray_components.py --records 1000000 --cpus 2
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray

from curate.dataset import RecordFiles, write_part
from curate.engines.ray import RayEngine
from curate.text import lsh, lsh_shuffle


def edge_list(records: int, seed: int = 0) -> np.ndarray:
    """About one edge per 10 records: pairs, clumps of 3-20 records, and ten chains of 1,000."""
    rng = np.random.default_rng(seed)
    nodes = iter(rng.permutation(records))
    edges = []
    while len(edges) < records // 10 - 10_000:
        size = 2 if rng.random() < 0.7 else int(rng.integers(3, 21))
        clump = [next(nodes) for _ in range(size)]
        edges.extend((clump[0], c) for c in clump[1:])
    for _ in range(10):
        chain = [next(nodes) for _ in range(1_000)]
        edges.extend(zip(chain[:-1], chain[1:], strict=True))
    return np.array(edges, np.int64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--cpus", type=int, default=2)
    args = parser.parse_args()
    edges = edge_list(args.records)
    lsh.clusters(2, np.zeros(1, np.int64), np.ones(1, np.int64))  # compiled before it is timed
    started = time.perf_counter()
    roots = lsh.clusters(args.records, edges[:, 0], edges[:, 1])
    union_find = time.perf_counter() - started
    ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    shuffle = RayEngine().shuffler()
    with tempfile.TemporaryDirectory() as folder:
        parts = [
            write_part(
                Path(folder) / f"edges-{i}.arrow", pa.table({"left": chunk[:, 0], "right": chunk[:, 1]})
            )
            for i, chunk in enumerate(np.array_split(edges, 4 * args.cpus))
        ]
        started = time.perf_counter()
        stars, rounds = lsh_shuffle.components(shuffle, RecordFiles(parts))
        stars = shuffle.collect(stars)
        on_ray = time.perf_counter() - started
    node, root = stars["left"].to_numpy(), stars["right"].to_numpy()
    assert np.array_equal(roots[node[node >= 0]], root[node >= 0])  # the union-find's components
    print(f"{args.records:,} records, {len(edges):,} edges, {args.cpus} CPUs")
    print(f"driver union-find (lsh.clusters):  {union_find:8.2f} s")
    print(f"Ray large-star/small-star:          {on_ray:8.2f} s  ({rounds} shuffles)")
    print(f"ratio Ray / union-find:             {on_ray / union_find:8.0f}x")
    ray.shutdown()


if __name__ == "__main__":
    main()
