"""dedup: drop exact and MinHash near-duplicates; each drop names the kept record it repeats and how alike.

Order of work: records that repeat the `reference` version are dropped first (they already exist
there), then exact duplicates, then near-duplicates among what is left. Within a cluster of
duplicates the kept record is chosen by `keep` (input order breaks ties), so the same input gives
the same verdicts. Records whose compared text is empty are never judged here (filter does that).

A global stage: `features` reduces each batch to what deciding needs (content keys, LSH band
hashes, signatures, ranks), so no record's text is held while deciding; the signatures of the few
records that share an LSH bucket are the only ones ever loaded. On an engine that spans machines
(Ray) the buckets meet in a shuffle of band keys, and clusters and their kept records are found
in further shuffles (curate/text/lsh_shuffle.py): the same drops, without one process sorting every
band of every record or holding every record's cluster.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import polars as pl
import pyarrow as pa

from curate.dataset import FeatureTable, fixed_size_column
from curate.errors import CurateError
from curate.records import meta_numbers
from curate.stages.base import Decisions, GlobalStage, option, register
from curate.text import lsh, lsh_shuffle
from curate.text.conversation import conversation_text
from curate.text.minhash import MinHashConfig, dtype_of, empty_value, signatures
from curate.text.shingles import content_keys, shingle_sets_at

_SCOPES = {"all": lsh.SCOPE_ALL, "within_source": lsh.SCOPE_WITHIN, "across_sources": lsh.SCOPE_ACROSS}


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
class DedupStage(GlobalStage):
    """Drop exact and near-duplicate records (MinHash LSH)."""

    name = "dedup"
    Config = DedupConfig

    @classmethod
    def recipe_issues(cls, config: DedupConfig, recipe) -> list[str]:
        if config.reference is None:
            return []
        try:
            _reference_file(Path(recipe.base_dir), config.reference)
        except CurateError as exc:
            return [f"{exc.message} ({exc.hint})"]
        return []

    def reads(self) -> list[Path]:
        return [] if self.config.reference is None else [self._reference_file()]

    @classmethod
    def warmup_config(cls, config: DedupConfig) -> DedupConfig:
        return dataclasses.replace(config, reference=None)

    def _reference_file(self) -> Path:
        return _reference_file(self.context.base_dir, self.config.reference)

    # features: one batch at a time ----------------------------------------------------------------

    def features(self, batch: pa.Table) -> pa.Table:
        cfg = self.config
        table = pl.from_arrow(batch)
        text = conversation_text(table, cfg.key)
        source = pl.col("source")
        facts = table.select(
            pl.format(
                "{}:{}", source.struct.field("path").fill_null(""), source.struct.field("row").fill_null(-1)
            ).alias("ref"),
            source.struct.field("name").fill_null(source.struct.field("path")).fill_null("").alias("group"),
        )
        columns = {
            "id": batch["id"],
            "ref": facts["ref"].to_arrow(),
            "group": facts["group"].to_arrow(),
            "live": pa.array(text.str.contains(r"\S").fill_null(False).to_numpy()),
        }
        if cfg.keep != "first":
            columns["rank"] = pa.array(_keep_value(table, cfg.keep, cfg.score_column))
        if cfg.exact:
            keys = content_keys(text)
            columns["k0"], columns["k1"] = pa.array(keys[:, 0]), pa.array(keys[:, 1])
        if cfg.minhash is not None:
            mh = cfg.minhash
            sigs = _sign(text, mh)
            bands, rows = mh.band_shape()
            columns["signed"] = pa.array(~np.all(sigs == sigs.dtype.type(empty_value(mh.scheme)), axis=1))
            columns["signature"] = fixed_size_column(sigs)
            columns["bands"] = fixed_size_column(lsh.band_hashes(sigs, bands, rows))
        return pa.table(columns)

    # deciding: every record at once ---------------------------------------------------------------

    def process(self, table: FeatureTable) -> Decisions:
        cfg: DedupConfig = self.config
        n = table.num_rows
        self.decisions = Decisions(n)
        if n == 0:
            return self.decisions
        self.table = table
        self.ids = table.column("id").combine_chunks()
        self.alive = table.column("live").to_numpy().copy()
        self.rank = _keep_rank(table.column("rank").to_numpy() if cfg.keep != "first" else None, n)
        self.groups = pl.Series(table.column("group")).rank("dense").to_numpy().astype(np.int64)
        if cfg.reference is not None:
            self._against_reference()
        if cfg.exact:
            self._exact()
        if cfg.minhash is not None:
            self._near(cfg.minhash)
        return self.decisions

    def _keys(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return (
            self.table.column("k0").to_numpy()[rows],
            self.table.column("k1").to_numpy()[rows],
        )

    def _exact(self) -> None:
        rows = np.nonzero(self.alive)[0]
        k0, k1 = self._keys(rows)
        keys = [k0, k1] + ([self.groups[rows]] if self.config.scope == "within_source" else [])
        found = self._duplicates(keys, rows)
        self._drop(rows[found.rows], "exact_duplicate", {}, found, rows[found.kept])

    def _duplicates(self, keys: list[np.ndarray], rows: np.ndarray) -> lsh.Duplicates:
        """Clusters of the records at `rows` sharing `keys`: the best-ranked of each stays."""
        across = self.config.scope == "across_sources"
        return lsh.duplicates(keys, self.rank[rows], self.groups[rows], across)

    def _drop(self, rows: np.ndarray, reason: str, columns: dict, found=None, kept=None) -> None:
        """Drop rows, with evidence: the kept record and its cluster (`found`), and per-row columns."""
        if found is not None:
            columns = {
                "duplicate_of": self._ids_of(kept),
                "duplicate_of_source": self._refs_of(kept),
                "cluster": found.cluster,
                "cluster_size": found.size,
                **columns,
            }
        self.decisions.drop_many(rows, reason, {k: _plain(v) for k, v in columns.items()})
        self.alive[rows] = False

    def _ids_of(self, rows: np.ndarray) -> pa.Array:
        return self.ids.take(pa.array(rows, pa.int64()))

    def _refs_of(self, rows: np.ndarray) -> pa.Array:
        """`path:row` of records, read for those rows only."""
        unique, inverse = np.unique(rows, return_inverse=True)
        return self.table.gather("ref", unique).take(pa.array(inverse, pa.int64()))

    # near duplicates ----------------------------------------------------------------------------

    def _near(self, mh: MinHashConfig) -> None:
        rows = np.nonzero(self.alive)[0]
        rows = rows[self.table.column("signed").to_numpy()[rows]]  # an empty signature matches nothing
        scope = _SCOPES[self.config.scope]
        if self.table.shuffle is not None:  # an engine over many machines: clusters found in shuffles
            ranked = self.config.keep != "first"
            found = lsh_shuffle.duplicates(self.table, rows, self.groups, mh, scope, self.config.key, ranked)
            sigs = sets = None
        else:
            roots, sigs, sets = self._clusters_here(rows, mh, scope)
            found = self._duplicates([roots], rows)
        a, b = found.rows, found.kept
        if sigs is None:  # only the pairs' signatures (and texts) are needed for their evidence
            involved = np.union1d(a, b)
            sigs = self._signatures(rows, involved, mh)
            sets = self._shingle_sets(rows, involved, mh) if mh.verify == "exact" else None
        columns: dict[str, np.ndarray] = {"jaccard": lsh.pair_jaccard_estimates(sigs, a, b)}
        if sets is not None:
            columns["jaccard_exact"] = lsh.pair_jaccard_exact(*sets, a, b)
        columns["threshold"] = np.full(a.size, mh.threshold)
        self._drop(rows[a], "near_duplicate", columns, found, rows[b])

    def _clusters_here(self, rows: np.ndarray, mh: MinHashConfig, scope: int):
        """Cluster roots of `rows` by LSH in this process, with the signatures (and shingle sets)
        of the records that share a bucket."""
        bands, band_rows = mh.band_shape()
        hashes = self.table.gather_matrix("bands", rows, np.uint64)
        buckets = lsh.Buckets.of(hashes, self.groups[rows], scope)
        del hashes
        shared = np.flatnonzero(buckets.shared())
        sigs = self._signatures(rows, shared, mh)
        sets = self._shingle_sets(rows, shared, mh) if mh.verify == "exact" else None
        threshold = None if mh.verify == "none" else mh.threshold
        roots = lsh.lsh_clusters(sigs, bands, band_rows, threshold, scope=scope, sets=sets, buckets=buckets)
        return roots, sigs, sets

    def _signatures(self, rows: np.ndarray, shared: np.ndarray, mh: MinHashConfig) -> lsh.Signatures:
        """The signatures of the records (by position in `rows`) that share a bucket."""
        slot = np.full(rows.size, -1, np.int64)
        slot[shared] = np.arange(shared.size)
        values = self.table.gather_matrix("signature", rows[shared], dtype_of(mh.scheme))
        return lsh.Signatures(values.reshape(shared.size, mh.num_perm), slot)

    def _shingle_sets(self, rows: np.ndarray, involved: np.ndarray, mh: MinHashConfig):
        """Shingle sets (offsets, sorted hashes) of the texts at positions `involved` of `rows`."""
        text = conversation_text(
            pl.from_arrow(self.table.records(rows[involved], ["messages"])), self.config.key
        )
        return shingle_sets_at(text, involved, rows.size, mh.ngram, mh.unit, mh.lowercase)

    # reference version --------------------------------------------------------------------------

    def _reference_texts(self) -> tuple[pl.Series, np.ndarray, np.ndarray]:
        """Texts, ids and `path:row` of the reference version's records (empty texts left out)."""
        ref = pl.read_parquet(self._reference_file(), columns=["id", "messages", "source"])
        text = conversation_text(ref, self.config.key)
        present = text.str.contains(r"\S").fill_null(False).to_numpy()
        source = pl.col("source")
        where = ref.select(
            pl.format(
                "{}:{}", source.struct.field("path").fill_null(""), source.struct.field("row").fill_null(-1)
            )
        ).to_series()
        return text.filter(present), ref["id"].to_numpy()[present], where.to_numpy()[present]

    def _against_reference(self) -> None:
        """Drop records that repeat a reference record; each names its closest reference match."""
        cfg = self.config
        ref_text, ref_ids, ref_where = self._reference_texts()
        if cfg.exact:
            rows = np.nonzero(self.alive)[0]
            k0, k1 = self._keys(rows)
            ref_keys = content_keys(ref_text)
            ours = pl.DataFrame({"row": rows, "k0": k0, "k1": k1})
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
            self._drop(hits["row"].to_numpy(), "exact_duplicate", columns)
        if cfg.minhash is None:
            return
        mh = cfg.minhash
        rows = np.nonzero(self.alive)[0]
        rows = rows[self.table.column("signed").to_numpy()[rows]]
        ref_sigs = _sign(ref_text, mh)
        signed = ~np.all(ref_sigs == ref_sigs.dtype.type(empty_value(mh.scheme)), axis=1)
        keep = np.flatnonzero(signed)  # reference rows with a signature
        ours = self.table.gather_matrix("signature", rows, dtype_of(mh.scheme))
        sigs = np.concatenate([ref_sigs[keep], ours])
        n_ref = keep.size
        groups = (np.arange(sigs.shape[0]) >= n_ref).astype(np.int64)
        bands, band_rows = mh.band_shape()
        left, right = lsh.candidate_pairs(sigs, bands, band_rows, groups, lsh.SCOPE_ACROSS)
        est = lsh.pair_jaccard_estimates(sigs, left, right)
        exact = None
        if mh.verify == "estimate":
            ok = est >= mh.threshold
        elif mh.verify == "exact":
            involved = np.union1d(left, right)
            texts = pl.concat(
                [
                    ref_text.gather(keep[involved[involved < n_ref]]),
                    conversation_text(
                        pl.from_arrow(
                            self.table.records(rows[involved[involved >= n_ref] - n_ref], ["messages"])
                        ),
                        cfg.key,
                    ),
                ]
            )
            exact = lsh.pair_jaccard_exact(
                *shingle_sets_at(texts, involved, sigs.shape[0], mh.ngram, mh.unit, mh.lowercase), left, right
            )
            ok = exact >= mh.threshold
        else:
            ok = np.ones(left.size, dtype=bool)
        left, right, est = left[ok], right[ok], est[ok]
        exact = None if exact is None else exact[ok]
        # reference texts come first, so in each pair (left > right) right is the reference record;
        # each record names its most similar reference match (lowest reference row on ties)
        best = lsh.best_per_record(left, right, exact if exact is not None else est)
        columns: dict[str, np.ndarray] = {
            "duplicate_of": np.array([str(ref_ids[keep[r]]) for r in right[best]], dtype=object),
            "duplicate_of_source": np.array([ref_where[keep[r]] for r in right[best]], dtype=object),
            "reference": np.full(best.size, str(cfg.reference), dtype=object),
            "jaccard": est[best],
        }
        if exact is not None:
            columns["jaccard_exact"] = exact[best]
        columns["threshold"] = np.full(best.size, mh.threshold)
        self._drop(rows[left[best] - n_ref], "near_duplicate", columns)


def _sign(text: pl.Series, mh: MinHashConfig) -> np.ndarray:
    return signatures(text, mh.num_perm, mh.ngram, mh.unit, mh.seed, mh.lowercase, mh.scheme)


def _reference_file(base_dir: Path, reference: str) -> Path:
    """The data.parquet a `reference` names (a version folder, an output dir, or a parquet file)."""
    path = Path(reference)
    if not path.is_absolute():
        path = base_dir / path
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


def _plain(values) -> np.ndarray | pa.Array:
    """Evidence values ready for JSON: similarities rounded to 4 places, text as text."""
    if isinstance(values, pa.Array):
        return values
    values = np.asarray(values)
    if values.dtype.kind == "f":
        return np.round(values, 4)
    return np.array([str(v) for v in values], dtype=object) if values.dtype.kind in "OU" else values


def _keep_value(table: pl.DataFrame, keep: str, score_column: str | None) -> np.ndarray:
    """Per record, what `keep` ranks by (lower stays): minus the answer's length, or minus its score
    (records without a score lose to any scored one)."""
    if keep == "longest":
        return -conversation_text(table, "assistant").str.len_chars().to_numpy().astype(np.float64)
    primary = -meta_numbers(table["meta"].to_list(), score_column)
    primary[np.isnan(primary)] = np.inf
    return primary


def _keep_rank(primary: np.ndarray | None, n: int) -> np.ndarray:
    """Each row's place in the keep order (0 stays first); input order breaks ties."""
    order_row = np.arange(n)
    if primary is None:
        return order_row
    order = np.lexsort((order_row, primary))
    rank = np.empty(n, dtype=np.int64)
    rank[order] = order_row
    return rank
