"""dedup: drop exact and MinHash near-duplicates; each drop names the kept record it repeats and how alike.

Order of work: records that repeat the `reference` version are dropped first (they already exist
there), then exact duplicates, then near-duplicates among what is left. Within a cluster of
duplicates the kept record is chosen by `keep` (input order breaks ties), so the same input gives
the same verdicts. Records whose compared text is empty are never judged here (filter does that).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import polars as pl

from curate.errors import CurateError
from curate.stages.base import Drop, TableStage, TableVerdicts, files_token, option, register
from curate.text import lsh
from curate.text.conversation import conversation_text
from curate.text.minhash import dtype_of, empty_value, jaccard_estimate, signatures
from curate.text.shingles import content_keys, shingle_hash_sets

_SCOPES = {"all": lsh.SCOPE_ALL, "within_source": lsh.SCOPE_WITHIN, "across_sources": lsh.SCOPE_ACROSS}
_BATCH = 65_536  # records signed per kernel call: bounds the UTF-8 copy and paces the progress bar


@dataclass(frozen=True)
class MinHashConfig:
    threshold: float = option(
        0.8, help="Jaccard similarity of shingle sets at or above which records are near-duplicates."
    )
    num_perm: int = option(128, help="MinHash permutations (signature length).")
    ngram: int = option(5, help="Shingle length in units.")
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
        None, help="LSH bands; default: derived from threshold and num_perm as datasketch does."
    )
    rows: int | None = option(None, help="Signature values per band; set together with `bands`.")
    weights: list[float] = option(
        [0.5, 0.5], help="Weights of false positives and false negatives when deriving bands and rows."
    )
    verify: Literal["none", "estimate", "exact"] = option(
        "estimate",
        help="Check LSH candidate pairs before merging: none (take every bucket match, as MinHashLSH does), "
        "estimate (estimated Jaccard >= threshold) or exact (exact Jaccard of the shingle sets >= "
        "threshold).",
    )

    def check(self) -> None:
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold}")
        if self.num_perm < 2:
            raise ValueError(f"num_perm must be at least 2, got {self.num_perm}")
        if self.ngram < 1:
            raise ValueError(f"ngram must be at least 1, got {self.ngram}")
        if (self.bands is None) != (self.rows is None):
            raise ValueError("set both bands and rows, or neither")
        if self.bands is not None and (
            self.bands < 1 or self.rows < 1 or self.bands * self.rows > self.num_perm
        ):
            raise ValueError(
                f"bands * rows must be at most num_perm ({self.num_perm}), got {self.bands} * {self.rows}"
            )
        if len(self.weights) != 2 or min(self.weights) < 0 or abs(sum(self.weights) - 1.0) > 1e-9:
            raise ValueError(f"weights must be two non-negative numbers summing to 1, got {self.weights}")

    def band_shape(self) -> tuple[int, int]:
        if self.bands is not None:
            return self.bands, self.rows
        bands, rows = lsh.optimal_params(self.threshold, self.num_perm, *self.weights)
        if bands < 2:
            raise CurateError(
                f"dedup.minhash: threshold {self.threshold} with num_perm {self.num_perm} gives one LSH band",
                hint="raise num_perm or lower the threshold, or set bands and rows yourself",
            )
        return bands, rows


@dataclass
class DedupConfig:
    key: Literal["conversation", "user", "first_user"] = option(
        "conversation", help="Text compared: the whole conversation, the user turns, or the first user turn."
    )
    exact: bool = option(
        True, help="Drop exact duplicates (same text after lowercasing and collapsing whitespace)."
    )
    minhash: MinHashConfig | bool | None = option(
        None,
        help="Drop near-duplicates by MinHash LSH: a mapping of options, true for the defaults; false or "
        "absent: off.",
    )
    keep: Literal["first", "longest", "score"] = option(
        "first",
        help="Which record of a duplicate cluster stays: first in input order, longest answer, or highest "
        "score.",
    )
    score_column: str | None = option(
        None, help="The meta key whose value `keep: score` ranks by (higher stays)."
    )
    scope: Literal["all", "within_source", "across_sources"] = option(
        "all",
        help="all: duplicates anywhere; within_source: only inside one source; across_sources: only between "
        "sources (a source's own repeats stay; copies in other sources than the kept record's go).",
    )
    reference: str | None = option(
        None,
        help="A dataset version folder (its data.parquet), an output dir (its latest) or a parquet file: "
        "records repeating it (exactly or near) are dropped, as already kept there.",
    )

    def __post_init__(self) -> None:
        if self.minhash is True:
            self.minhash = MinHashConfig()
        elif self.minhash is False:
            self.minhash = None
        elif isinstance(self.minhash, dict):
            self.minhash = MinHashConfig(**self.minhash)

    def check(self) -> None:
        if self.keep == "score" and not self.score_column:
            raise ValueError("keep: score needs score_column (the meta key to rank by)")
        if not self.exact and self.minhash is None:
            raise ValueError("nothing to do: enable exact or minhash")
        if self.minhash is not None:
            self.minhash.check()


@register
class DedupStage(TableStage):
    """Drop exact and near-duplicate records (MinHash LSH, datasketch-compatible), keeping one per cluster."""

    name = "dedup"
    Config = DedupConfig

    def apply(self, table: pl.DataFrame) -> TableVerdicts:
        cfg: DedupConfig = self.config
        n = table.height
        self.verdicts: list[Drop | None] = [None] * n
        if n == 0:
            return TableVerdicts([])
        self.text = conversation_text(table, cfg.key)
        self.ids = table["id"].to_numpy()
        self.rank = _keep_rank(table, cfg.keep, cfg.score_column)
        self.groups = _source_groups(table)
        self.where = _source_refs(table)
        self.alive = self.text.str.contains(r"\S").fill_null(False).to_numpy().copy()
        self.progressed = 0
        if cfg.reference is not None:
            self._against_reference()
        if cfg.exact:
            self._exact()
        self._progress(0.1)
        if cfg.minhash is not None:
            self._near(cfg.minhash)
        self._progress(1.0)
        return TableVerdicts(self.verdicts)

    def _progress(self, share: float) -> None:
        """Move the runner's progress bar to `share` of the records (signing is most of the time)."""
        target = int(len(self.verdicts) * min(share, 1.0))
        if target > self.progressed:
            self.context.advance(target - self.progressed)
            self.progressed = target

    # exact duplicates ---------------------------------------------------------------------------

    def _exact(self) -> None:
        rows = np.nonzero(self.alive)[0]
        keys = content_keys(self.text.gather(rows))
        df = pl.DataFrame(
            {
                "row": rows,
                "k0": keys[:, 0],
                "k1": keys[:, 1],
                "rank": self.rank[rows],
                "group": self.groups[rows],
            }
        )
        part = ["k0", "k1"] + (["group"] if self.config.scope == "within_source" else [])
        drops = self._cluster_drops(df, part)
        self._drop(drops["row"].to_numpy(), "exact_duplicate", drops, {})

    def _cluster_drops(self, df: pl.DataFrame, part: list[str]) -> pl.DataFrame:
        """Rows to drop from clusters (rows sharing `part`), with the kept row, cluster number and size.

        The kept row is the best-ranked of its cluster; clusters are numbered by their first row.
        """
        df = df.with_columns(size=pl.len().over(part)).filter(pl.col("size") > 1)
        df = df.with_columns(
            kept=pl.col("row").sort_by("rank").first().over(part),
            kept_group=pl.col("group").sort_by("rank").first().over(part),
            cluster=pl.col("row").min().over(part).rank("dense") - 1,
        )
        drops = df.filter(pl.col("row") != pl.col("kept"))
        if self.config.scope == "across_sources":
            drops = drops.filter(pl.col("group") != pl.col("kept_group"))
        return drops.sort("row")

    def _drop(
        self, rows: np.ndarray, reason: str, drops: pl.DataFrame | None, columns: dict[str, np.ndarray]
    ) -> None:
        """Record Drop verdicts for rows; evidence from the cluster table and per-row columns."""
        if drops is not None:
            kept = drops["kept"].to_numpy()
            columns = {
                "duplicate_of": self.ids[kept],
                "duplicate_of_source": self.where[kept],
                "cluster": drops["cluster"].to_numpy(),
                "cluster_size": drops["size"].to_numpy(),
                **columns,
            }
        names = list(columns)
        values = zip(*(_plain(col) for col in columns.values()), strict=True)
        for row, evidence in zip(rows.tolist(), values, strict=True):
            self.verdicts[row] = Drop(reason, dict(zip(names, evidence, strict=True)))
        self.alive[rows] = False

    # near duplicates ----------------------------------------------------------------------------

    def _signatures(
        self, text: pl.Series, mh: MinHashConfig, report: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """Signatures of the texts and which of them have shingles (an empty signature matches nothing)."""
        sigs = np.empty((text.len(), mh.num_perm), dtype=dtype_of(mh.scheme))
        for start in range(0, text.len(), _BATCH):
            sigs[start : start + _BATCH] = signatures(
                text.slice(start, _BATCH), mh.num_perm, mh.ngram, mh.unit, mh.seed, mh.lowercase, mh.scheme
            )
            if report:
                self._progress(0.1 + 0.8 * min(start + _BATCH, text.len()) / text.len())
        has = ~np.all(sigs == sigs.dtype.type(empty_value(mh.scheme)), axis=1)
        return sigs, has

    def _shingle_sets(self, text: pl.Series, involved: np.ndarray, mh: MinHashConfig):
        """Shingle sets (offsets, sorted hashes) of every text, computed only for the `involved` rows."""
        offsets, hashes = shingle_hash_sets(text.gather(involved), mh.ngram, mh.unit, mh.lowercase)
        sizes = np.zeros(text.len(), dtype=np.int64)
        sizes[involved] = np.diff(offsets)  # involved rows ascend, so their hashes stay in row order
        full = np.zeros(text.len() + 1, dtype=np.int64)
        np.cumsum(sizes, out=full[1:])
        return full, hashes

    def _candidates(self, sigs, text, groups, scope: int, mh: MinHashConfig):
        """LSH candidate pairs (each bucket's members with its first row) that pass `verify`."""
        bands, band_rows = mh.band_shape()
        left, right = lsh.candidate_pairs(sigs, bands, band_rows, groups, scope)
        est = lsh.pair_jaccard_estimates(sigs, left, right)
        exact = None
        if mh.verify == "estimate":
            ok = est >= mh.threshold
        elif mh.verify == "exact":
            offsets, hashes = self._shingle_sets(text, np.union1d(left, right), mh)
            exact = lsh.pair_jaccard_exact(offsets, hashes, left, right)
            ok = exact >= mh.threshold
        else:
            ok = np.ones(left.size, dtype=bool)
        return left[ok], right[ok], est[ok], None if exact is None else exact[ok]

    def _near(self, mh: MinHashConfig) -> None:
        rows = np.nonzero(self.alive)[0]
        text = self.text if rows.size == self.text.len() else self.text.gather(rows)
        sigs, has = self._signatures(text, mh, report=True)
        if not has.all():
            rows, sigs = rows[has], sigs[has]
            text = text.filter(pl.Series(has))
        groups = self.groups[rows]
        bands, band_rows = mh.band_shape()
        scope = _SCOPES[self.config.scope]
        sets = None
        if mh.verify == "exact":
            involved = np.union1d(*lsh.candidate_pairs(sigs, bands, band_rows, groups, scope))
            sets = self._shingle_sets(text, involved, mh)
        threshold = None if mh.verify == "none" else mh.threshold
        roots = lsh.lsh_clusters(sigs, bands, band_rows, threshold, groups, scope, sets)
        df = pl.DataFrame(
            {"row": np.arange(rows.size), "root": roots, "rank": self.rank[rows], "group": groups}
        )
        drops = self._cluster_drops(df, ["root"])
        a, b = drops["row"].to_numpy(), drops["kept"].to_numpy()
        columns: dict[str, np.ndarray] = {"jaccard": jaccard_estimate(sigs[a], sigs[b])}
        if sets is not None:
            columns["jaccard_exact"] = lsh.pair_jaccard_exact(*sets, a, b)
        columns["threshold"] = np.full(a.size, mh.threshold)
        self._drop(rows[a], "near_duplicate", drops.with_columns(kept=pl.Series(rows[b])), columns)

    # reference version --------------------------------------------------------------------------

    def cache_token(self) -> str:
        return files_token([self._reference_file()]) if self.config.reference is not None else ""

    def _reference_texts(self) -> tuple[pl.Series, np.ndarray, np.ndarray]:
        """Texts, ids and `path:row` of the reference version's records (empty texts left out)."""
        ref = pl.read_parquet(self._reference_file(), columns=["id", "messages", "source"])
        text = conversation_text(ref, self.config.key)
        present = text.str.contains(r"\S").fill_null(False).to_numpy()
        return text.filter(present), ref["id"].to_numpy()[present], _source_refs(ref)[present]

    def _reference_file(self) -> Path:
        path = Path(self.config.reference)
        if not path.is_absolute():
            path = self.context.base_dir / path
        candidates = (
            [path] if path.suffix == ".parquet" else [path / "data.parquet", path / "latest" / "data.parquet"]
        )
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise CurateError(
                f"dedup.reference: no dataset version at {path}",
                hint="give a version folder (with data.parquet), an output dir (with latest/) or a .parquet",
            )
        return found

    def _against_reference(self) -> None:
        """Drop records that repeat a reference record; each names its closest reference match."""
        cfg = self.config
        ref_text, ref_ids, ref_where = self._reference_texts()
        if cfg.exact:
            rows = np.nonzero(self.alive)[0]
            keys = content_keys(self.text.gather(rows))
            ref_keys = content_keys(ref_text)
            ours = pl.DataFrame({"row": rows, "k0": keys[:, 0], "k1": keys[:, 1]})
            theirs = pl.DataFrame(
                {"ref": np.arange(ref_keys.shape[0]), "k0": ref_keys[:, 0], "k1": ref_keys[:, 1]}
            )
            hits = ours.join(theirs.unique(["k0", "k1"], keep="first", maintain_order=True), on=["k0", "k1"])
            hits = hits.sort("row")
            ref = hits["ref"].to_numpy()
            columns = {
                "duplicate_of": ref_ids[ref],
                "duplicate_of_source": ref_where[ref],
                "reference": np.full(ref.size, str(cfg.reference), dtype=object),
            }
            self._drop(hits["row"].to_numpy(), "exact_duplicate", None, columns)
        if cfg.minhash is None:
            return
        mh = cfg.minhash
        rows = np.nonzero(self.alive)[0]
        n_ref = ref_text.len()
        text = pl.concat([ref_text, self.text.gather(rows)])
        sigs, has = self._signatures(text, mh)
        keep = np.nonzero(has)[0]
        text, sigs = text.gather(keep), sigs[keep]
        groups = (keep >= n_ref).astype(np.int64)
        left, right, est, exact = self._candidates(sigs, text, groups, lsh.SCOPE_ACROSS, mh)
        # reference texts come first, so in each pair (left > right) right is the reference record;
        # each record names its most similar reference match (lowest reference row on ties)
        score = exact if exact is not None else est
        order = np.lexsort((right, -score, left))
        first_of = np.ones(order.size, dtype=bool)
        first_of[1:] = left[order][1:] != left[order][:-1]
        best = order[first_of]
        columns: dict[str, np.ndarray] = {
            "duplicate_of": np.array([str(ref_ids[keep[r]]) for r in right[best]], dtype=object),
            "duplicate_of_source": np.array([ref_where[keep[r]] for r in right[best]], dtype=object),
            "reference": np.full(best.size, str(cfg.reference), dtype=object),
            "jaccard": est[best],
        }
        if exact is not None:
            columns["jaccard_exact"] = exact[best]
        columns["threshold"] = np.full(best.size, mh.threshold)
        self._drop(rows[keep[left[best]] - n_ref], "near_duplicate", None, columns)


def _plain(values: np.ndarray) -> list:
    """Evidence values as plain Python (JSON-ready); similarities rounded to 4 places."""
    values = np.asarray(values)
    if values.dtype.kind == "f":
        return np.round(values, 4).tolist()
    return [str(v) for v in values] if values.dtype.kind in "OU" else values.tolist()


def _keep_rank(table: pl.DataFrame, keep: str, score_column: str | None) -> np.ndarray:
    """Each row's place in the keep order (0 stays first); input order breaks ties."""
    n = table.height
    order_row = np.arange(n)
    if keep == "first":
        return order_row
    if keep == "longest":
        primary = -conversation_text(table, "assistant").str.len_chars().to_numpy().astype(np.float64)
    else:
        scores = []
        for raw in table["meta"].to_list():
            value = json.loads(raw).get(score_column) if raw else None
            scores.append(
                float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else np.nan
            )
        primary = -np.array(scores, dtype=np.float64)
        primary[np.isnan(primary)] = np.inf  # records without a score lose to any scored one
    order = np.lexsort((order_row, primary))
    rank = np.empty(n, dtype=np.int64)
    rank[order] = order_row
    return rank


def _source_refs(table: pl.DataFrame) -> np.ndarray:
    """Each record's `path:row`, to point at the kept copy even when both share a content id."""
    if "source" not in table.columns:
        return np.full(table.height, "", dtype=object)
    src = pl.col("source")
    ref = pl.format("{}:{}", src.struct.field("path").fill_null(""), src.struct.field("row").fill_null(-1))
    return table.select(ref).to_series().to_numpy()


def _source_groups(table: pl.DataFrame) -> np.ndarray:
    """A small integer per source name (its path when unnamed), for the scope rules."""
    if "source" not in table.columns:
        return np.zeros(table.height, dtype=np.int64)
    name = (
        pl.col("source").struct.field("name").fill_null(pl.col("source").struct.field("path")).fill_null("")
    )
    return table.select(name.rank("dense")).to_series().to_numpy().astype(np.int64)
