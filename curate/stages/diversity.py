"""diversity: keep the records that cover the most ground, to a budget, and say for each record left
out which kept record stands for it.

A global stage. `features` embeds each batch (curate.embed; the cheap `static` model by default, see
docs/diversity.md for the measurements behind that choice) and keeps only the vector, so deciding
holds n x 256 numbers, never the texts. `process` selects (curate.selection), then drops the rest
with the nearest kept record as evidence, and reports the coverage: the mean and largest cosine
distance from any record to its nearest kept one, and how many of `report_clusters` k-means clusters
of all records keep at least one record. A 2-D map of kept and dropped records goes beside the
version as diversity-map.png.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import polars as pl
import pyarrow as pa

from curate import selection
from curate.dataset import FeatureTable, fixed_size_column
from curate.records import meta_numbers
from curate.stages.base import Decisions, GlobalStage, option, register
from curate.text.conversation import conversation_text

_EMBEDDINGS = {}  # one embedder per model and settings per process (a model loads once)


@dataclass
class DiversityConfig:
    method: Literal["kcenter", "cluster", "semdedup", "score"] = option(
        "kcenter",
        help="kcenter: greedy farthest point (smallest coverage radius); cluster: k-means, then a share of "
        "the budget per cluster; semdedup: drop records within `threshold` of a kept one inside each "
        "k-means cluster (no budget); score: highest `score_column` first, skipping records within "
        "`min_distance` of a kept one.",
    )
    k: int | None = option(None, help="Records to keep (or give `fraction`).", minimum=1)
    fraction: float | None = option(
        None, help="Share of the records to keep, e.g. 0.1 (or give `k`).", exclusiveMinimum=0, maximum=1.0
    )
    text: Literal["first_user", "user", "conversation"] = option(
        "first_user", help="What is embedded: the first user turn, all user turns, or the whole conversation."
    )
    model: str = option(
        "static",
        help="`static`: all-MiniLM-L6-v2 distilled into a static model (thousands of records/s on a CPU); "
        "empty: all-MiniLM-L6-v2 itself (GPU when there is one, cached); or a local sentence-transformers "
        "or model2vec folder.",
    )
    max_tokens: int = option(128, help="Tokens of each text the model reads.", minimum=1)
    batch_size: int | None = option(
        None, help="Texts per embedding batch (default: 64 on a CPU, 1024 on a GPU).", minimum=1
    )
    seed: int | None = option(None, help="Seed of the first pick and of k-means; empty: the recipe's seed.")
    clusters: int | None = option(
        None,
        help="k-means clusters for `cluster` (default: the square root of the budget) and `semdedup` "
        "(default: one per 1,000 records).",
        minimum=1,
    )
    share: Literal["equal", "proportional"] = option(
        "equal",
        help="cluster: each cluster gives an equal share (small ones all they have), or one in proportion "
        "to its size.",
    )
    threshold: float = option(
        0.9,
        help="semdedup: cosine similarity from which a record is a semantic duplicate of a kept one.",
        exclusiveMinimum=0,
        maximum=1.0,
    )
    score_column: str = option("", help="score: the meta key ranked by (higher first).")
    min_distance: float = option(
        0.1, help="score: cosine distance under which a record is too close to a kept one.", minimum=0
    )
    report_clusters: int = option(
        100, help="k-means clusters of all records whose coverage the manifest reports.", minimum=1
    )
    map: bool = option(True, help="Write diversity-map.png (2-D map of kept and dropped) beside the version.")

    def check(self) -> None:
        budget = (self.k is not None) + (self.fraction is not None)
        if self.method == "semdedup" and budget:
            raise ValueError("semdedup keeps what `threshold` leaves; give no k or fraction")
        if self.method != "semdedup" and budget != 1:
            raise ValueError(f"{self.method} needs a budget: give k or fraction (one of them)")
        if self.method == "score" and not self.score_column:
            raise ValueError("score needs score_column (the meta key to rank by)")


@register
class DiversityStage(GlobalStage):
    """Keep a diverse subset to a budget (k-center, SemDeDup, ...)."""

    name = "diversity"
    Config = DiversityConfig
    compiles = False  # numpy and BLAS only: nothing for curate.warm to compile

    def reads(self) -> list:
        from curate.embed import model_folder

        return [model_folder(self.config.model, self.context.base_dir)]

    def uses_model(self) -> bool:
        return True

    def _embedder(self):
        from curate.embed import Embedder

        cfg = self.config
        key = (cfg.model, str(self.context.base_dir), str(self.context.shared_cache), cfg.max_tokens)
        if key not in _EMBEDDINGS:
            _EMBEDDINGS[key] = Embedder(
                cfg.model,
                self.context.shared_cache,
                batch_size=cfg.batch_size,
                max_seq_length=cfg.max_tokens,
                base_dir=self.context.base_dir,
            )
        return _EMBEDDINGS[key]

    # features: one batch at a time ----------------------------------------------------------------

    def features(self, batch: pa.Table) -> pa.Table:
        table = pl.from_arrow(batch)
        vectors = self._embedder().encode(conversation_text(table, self.config.text).to_list())
        source = pl.col("source")
        ref = table.select(
            pl.format(
                "{}:{}", source.struct.field("path").fill_null(""), source.struct.field("row").fill_null(-1)
            )
        ).to_series()
        columns = {"id": batch["id"], "ref": ref.to_arrow(), "vector": fixed_size_column(vectors)}
        if self.config.method == "score":
            columns["score"] = pa.array(meta_numbers(table["meta"].to_list(), self.config.score_column))
        return pa.table(columns)

    # deciding: every record at once ---------------------------------------------------------------

    def process(self, table: FeatureTable) -> Decisions:
        cfg: DiversityConfig = self.config
        n = table.num_rows
        decisions = Decisions(n)
        if n == 0:
            return decisions
        X = table.gather_matrix("vector", np.arange(n), np.float32)
        seed = self.context.seed if cfg.seed is None else cfg.seed
        budget = cfg.k if cfg.k is not None else math.ceil(cfg.fraction * n) if cfg.fraction else n
        scores = table.column("score").to_numpy() if cfg.method == "score" else None
        kept, owner, distance = self._select(X, min(budget, n), seed, scores)
        dropped = np.setdiff1d(np.arange(n), kept)
        nearest = kept[owner[dropped]]
        ids, refs = table.column("id").combine_chunks(), table.column("ref").combine_chunks()
        rows = pa.array(nearest, pa.int64())
        decisions.drop_many(
            dropped,
            "not_selected",
            {
                "nearest_kept": ids.take(rows),
                "nearest_kept_source": refs.take(rows),
                "distance": np.round(distance[dropped], 4),
                "method": np.full(dropped.size, cfg.method, dtype=object),
            },
        )
        decisions.report = self._report(X, kept, distance, seed)
        if cfg.map:
            decisions.artifacts = _map(X, kept, cfg.method)
        return decisions

    def _select(
        self, X: np.ndarray, budget: int, seed: int, scores: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(kept rows ascending, each row's nearest kept as an index into kept, its cosine distance)."""
        cfg: DiversityConfig = self.config
        n = X.shape[0]
        if cfg.method == "kcenter":
            first = int(np.random.default_rng(seed).integers(n))
            picks, owner, distance = selection.kcenter(X, budget, first)
            order = np.argsort(picks)
            rank = np.empty_like(order)
            rank[order] = np.arange(order.size)
            return picks[order], rank[owner], distance
        if cfg.method == "score":  # records without a score come last
            kept = selection.score_greedy(X, np.nan_to_num(scores, nan=-np.inf), budget, cfg.min_distance)
        else:
            default = round(math.sqrt(budget)) if cfg.method == "cluster" else math.ceil(n / 1000)
            labels, centroids = selection.kmeans(X, cfg.clusters or max(1, default), seed)
            if cfg.method == "cluster":
                kept = selection.cluster_quota(X, labels, centroids, budget, cfg.share)
            else:
                kept = selection.semdedup(X, labels, centroids, cfg.threshold)
        owner, distance = selection.nearest(X, kept)
        return kept, owner, distance

    def _report(self, X: np.ndarray, kept: np.ndarray, distance: np.ndarray, seed: int) -> dict:
        cfg: DiversityConfig = self.config
        labels, _ = selection.kmeans(X, cfg.report_clusters, seed)
        clusters = int(np.unique(labels).size)
        return {
            "method": cfg.method,
            "model": self._embedder().name,
            "text": cfg.text,
            "kept": int(kept.size),
            "coverage_radius_mean": round(float(distance.mean()), 4),
            "coverage_radius_max": round(float(distance.max()), 4),
            "clusters": clusters,
            "clusters_covered": int(np.unique(labels[kept]).size),
        }


def _map(X: np.ndarray, kept: np.ndarray, method: str) -> dict[str, bytes]:
    """diversity-map.png: every record projected on the two main axes of the embeddings (PCA),
    dropped in grey, kept in colour; nothing when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {}
    sample = X[np.linspace(0, X.shape[0] - 1, min(X.shape[0], 20_000)).astype(np.int64)]
    mean = sample.mean(axis=0)
    _, _, axes = np.linalg.svd(sample - mean, full_matrices=False)
    points = (X - mean) @ axes[:2].T
    is_kept = np.zeros(X.shape[0], bool)
    is_kept[kept] = True
    figure, ax = plt.subplots(figsize=(7, 6), dpi=110)
    ax.scatter(*points[~is_kept].T, s=2, c="#c8c8c8", linewidths=0, label=f"dropped ({(~is_kept).sum():,})")
    ax.scatter(*points[is_kept].T, s=4, c="#d62728", linewidths=0, label=f"kept ({is_kept.sum():,})")
    ax.set_title(f"diversity ({method}): records on the embeddings' two main axes")
    ax.legend(loc="upper right", markerscale=4)
    ax.set_xticks([])
    ax.set_yticks([])
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight")
    plt.close(figure)
    return {"map.png": buffer.getvalue()}
