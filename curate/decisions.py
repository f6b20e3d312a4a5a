"""What a stage decides about a table of records, and how those decisions are applied.

A stage never cuts tables itself. It returns `Decisions`: rows to drop (each with a reason and the
evidence a reviewer needs), columns it replaced, records it adds. `apply_decisions` alone turns
them into kept records, dropped rows with their evidence, and edits, the same way for every stage,
wherever the batch happens to be (the runner's process or an engine's worker).

Evidence may be given row by row (dicts) or as columns (one array per evidence key): a dedup of
millions of records drops millions of rows, and columns keep that compact until each batch is
written.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from curate.edits import EDITS_SCHEMA, added_edits, describe_changes
from curate.records import RECORD_SCHEMA

DROPPED_SCHEMA = pa.schema(
    [
        *RECORD_SCHEMA,
        pa.field("stage", pa.string()),
        pa.field("reason", pa.string()),
        pa.field("evidence", pa.string()),
    ]
)


@dataclass(frozen=True)
class Drop:
    """Why one record leaves the set, with the evidence a reviewer needs to agree."""

    reason: str
    evidence: dict = field(default_factory=dict)


def evidence_json(evidence: Mapping) -> str:
    """A drop's evidence as it is stored in dropped.parquet."""
    return json.dumps(evidence, ensure_ascii=False, sort_keys=True, default=str)


class _Evidence:
    """The evidence of one group of drops: a list of dicts, or columns of equal length."""

    def __init__(self, values: Mapping[str, Sequence] | Sequence[Mapping] | None, n: int) -> None:
        if values is None:
            values = [{}] * n
        if isinstance(values, Mapping):
            self.columns = {k: v if isinstance(v, _ARRAYS) else list(v) for k, v in values.items()}
            self.dicts = None
            sizes = {len(v) for v in self.columns.values()}
            if sizes - {n}:
                raise ValueError(
                    f"evidence columns must have one value per dropped row ({n}), got {sorted(sizes)}"
                )
        else:
            self.columns, self.dicts = None, list(values)
            if len(self.dicts) != n:
                raise ValueError(f"evidence for {n} dropped rows has {len(self.dicts)} entries")

    def reordered(self, order: np.ndarray) -> _Evidence:
        if self.dicts is not None:
            return _Evidence([self.dicts[i] for i in order.tolist()], len(order))
        return _Evidence({k: _reorder(v, order) for k, v in self.columns.items()}, len(order))

    def take(self, positions: np.ndarray) -> list[dict]:
        if self.dicts is not None:
            return [self.dicts[p] for p in positions.tolist()]
        names = list(self.columns)
        values = [_plain(self.columns[k], positions) for k in names]
        return (
            [dict(zip(names, row, strict=True)) for row in zip(*values, strict=True)]
            if names
            else [{} for _ in range(len(positions))]
        )


_ARRAYS = (np.ndarray, pa.Array, pa.ChunkedArray)


def _reorder(column, order: np.ndarray):
    if isinstance(column, (pa.Array, pa.ChunkedArray)):
        return column.take(pa.array(order, pa.int64()))
    if isinstance(column, np.ndarray):
        return column[order]
    return [column[i] for i in order.tolist()]


def _plain(column, positions: np.ndarray) -> list:
    """Values of an evidence column at `positions`, as plain Python (JSON-ready)."""
    if isinstance(column, (pa.Array, pa.ChunkedArray)):
        return column.take(pa.array(positions, pa.int64())).to_pylist()
    if isinstance(column, np.ndarray):
        return column[positions].tolist()
    return [column[i] for i in positions.tolist()]


class Decisions:
    """A stage's answer for `rows` records (a batch, or for a global stage every record).

    Rows nobody drops are kept. `replace` gives a whole new column (the runner records what it
    changed in each kept record); `add` appends new records, which the runner places after all
    kept records of the stage, in the order of the batches that made them; `reject` records
    records the stage made and threw away (an eliminated evolution): they count as added and as
    dropped, so the books balance and each is findable with its reason. A global stage may also
    leave a `report` (figures for the manifest's stage entry) and `artifacts` (files, by name,
    that the version folder gets beside its data, e.g. a plot).
    """

    def __init__(self, rows: int) -> None:
        self.rows = rows
        self._groups: list[tuple[np.ndarray, str, _Evidence]] = []
        self._single: dict[str, tuple[list[int], list[dict]]] = {}  # drop() calls, grouped on reading
        self.columns: dict[str, pa.Array] = {}
        self.added: list[pa.Table] = []
        self.rejected: list[pa.Table] = []  # DROPPED_SCHEMA rows of records made and thrown away
        self.report: dict = {}
        self.llm: dict = {}  # LLM usage while deciding (set by the engine that ran the stage)
        self.artifacts: dict[str, bytes] = {}

    def drop(self, row: int, reason: str, evidence: Mapping | None = None) -> None:
        """Drop one row."""
        rows, proofs = self._single.setdefault(reason, ([], []))
        rows.append(row)
        proofs.append(dict(evidence or {}))

    def _gather(self) -> list[tuple[np.ndarray, str, _Evidence]]:
        """Every group of drops, single drops grouped by reason first."""
        single, self._single = self._single, {}
        for reason, (rows, proofs) in single.items():
            self.drop_many(rows, reason, proofs)
        return self._groups

    def drop_many(
        self,
        rows: Sequence[int] | np.ndarray,
        reason: str,
        evidence: Mapping[str, Sequence] | Sequence[Mapping] | None = None,
    ) -> None:
        """Drop several rows for one reason; evidence is one dict per row, or one column per key."""
        rows = np.asarray(rows, np.int64)
        if not rows.size:
            return
        proof = _Evidence(evidence, rows.size)
        if not _ascending(rows):  # kept sorted, so a slice of the rows is a binary search away
            order = np.argsort(rows, kind="stable")
            rows, proof = rows[order], proof.reordered(order)
        if rows[0] < 0 or rows[-1] >= self.rows:
            raise ValueError(f"a drop names row {rows[0] if rows[0] < 0 else rows[-1]} of {self.rows}")
        self._groups.append((rows, reason, proof))

    def replace(self, column: str, values: pa.Array | pa.ChunkedArray) -> None:
        """Replace a whole column (one value per row, kept rows and dropped alike)."""
        if column not in RECORD_SCHEMA.names:
            raise ValueError(f"unknown record column {column!r}")
        if len(values) != self.rows:
            raise ValueError(f"column {column} has {len(values)} values for {self.rows} rows")
        self.columns[column] = values

    def add(self, records: pa.Table) -> None:
        """Add records (of the record schema; origin and parent_id say where they come from)."""
        self.added.append(records.select(RECORD_SCHEMA.names).cast(RECORD_SCHEMA))

    def reject(self, records: pa.Table, reasons: Sequence[str], evidence: Sequence[Mapping]) -> None:
        """Records this stage made but does not keep, each with its reason and evidence."""
        if len(reasons) != records.num_rows or len(evidence) != records.num_rows:
            raise ValueError(f"reject: {records.num_rows} records need as many reasons and evidence")
        records = records.select(RECORD_SCHEMA.names).cast(RECORD_SCHEMA)
        self.rejected.append(dropped_table(records, "", reasons, evidence))  # named when applied

    def dropped(self) -> tuple[np.ndarray, list[str], list[dict]]:
        """(rows ascending, reasons, evidence dicts) of every drop; a row dropped twice is an error."""
        groups = self._gather()
        if not groups:
            return np.zeros(0, np.int64), [], []
        rows = np.concatenate([r for r, _, _ in groups])
        order = np.argsort(rows, kind="stable")
        rows = rows[order]
        if rows.size > 1 and (rows[1:] == rows[:-1]).any():
            raise ValueError(f"row {int(rows[1:][rows[1:] == rows[:-1]][0])} is dropped twice")
        reasons: list[str] = []
        evidence: list[dict] = []
        for group_rows, reason, proof in groups:
            reasons.extend([reason] * group_rows.size)
            evidence.extend(proof.take(np.arange(group_rows.size)))
        picks = order.tolist()
        return rows, [reasons[i] for i in picks], [evidence[i] for i in picks]

    def slice(self, start: int, stop: int) -> Decisions:
        """The decisions about rows [start, stop), numbered from 0 (a global stage's answer, cut to
        the batches the runner applies it to). Added records belong to no slice."""
        part = Decisions(stop - start)
        for rows, reason, proof in self._gather():
            lo, hi = np.searchsorted(rows, [start, stop])
            if hi > lo:
                taken = _Evidence(proof.take(np.arange(lo, hi)), hi - lo)
                part._groups.append((rows[lo:hi] - start, reason, taken))
        part.columns = {k: v.slice(start, stop - start) for k, v in self.columns.items()}
        return part


def dropped_table(
    records: pa.Table, stage: str, reasons: Sequence[str], evidence: Sequence[Mapping]
) -> pa.Table:
    """Records with the stage, reason and evidence of their drop (DROPPED_SCHEMA)."""
    return pa.Table.from_arrays(
        [
            *records.columns,
            pa.array([stage] * records.num_rows, pa.string()),
            pa.array(list(reasons), pa.string()),
            pa.array([evidence_json(e) for e in evidence], pa.string()),
        ],
        schema=DROPPED_SCHEMA,
    )


def rejected_table(decisions: Decisions, stage: str) -> pa.Table | None:
    """The records a stage rejected, under its name, or None."""
    if not decisions.rejected:
        return None
    return pa.concat_tables([_named(t, stage) for t in decisions.rejected])


def _named(rejected: pa.Table, stage: str) -> pa.Table:
    column = pa.array([stage] * rejected.num_rows, pa.string())
    return rejected.set_column(DROPPED_SCHEMA.get_field_index("stage"), "stage", column)


def _ascending(rows: np.ndarray) -> bool:
    return rows.size < 2 or bool((rows[1:] >= rows[:-1]).all())


@dataclass
class Applied:
    """Decisions applied to one batch: what the runner writes and counts."""

    kept: pa.Table  # records that stay, with replaced columns (RECORD_SCHEMA)
    dropped: pa.Table  # dropped input rows with stage, reason and evidence (DROPPED_SCHEMA)
    edits: pa.Table  # what the stage changed in kept records, and the records it added (EDITS_SCHEMA)
    added: pa.Table  # records the stage added (RECORD_SCHEMA)
    drop_rows: np.ndarray  # input rows dropped, ascending
    rows_in: int
    report: dict = field(default_factory=dict)  # a global stage's figures (Decisions.report)

    @property
    def reasons(self) -> dict[str, int]:
        return dict(Counter(self.dropped["reason"].to_pylist()))

    def verdicts(self) -> list[Drop | None]:
        """Per input row: its Drop, or None when it stays (for inspection and tests)."""
        out: list[Drop | None] = [None] * self.rows_in
        reasons = self.dropped["reason"].to_pylist()
        evidence = self.dropped["evidence"].to_pylist()
        for row, reason, proof in zip(self.drop_rows.tolist(), reasons, evidence, strict=True):
            out[row] = Drop(reason, json.loads(proof))
        return out


def apply_decisions(stage: str, batch: pa.Table, decisions: Decisions) -> Applied:
    """Kept rows (replaced columns applied), dropped rows with evidence, and edits, for one batch."""
    if decisions.rows != batch.num_rows:
        raise ValueError(f"stage {stage} decided about {decisions.rows} rows of a batch of {batch.num_rows}")
    batch = batch.cast(RECORD_SCHEMA) if batch.schema != RECORD_SCHEMA else batch
    rows, reasons, evidence = decisions.dropped()
    new = batch
    for name, values in decisions.columns.items():
        i = RECORD_SCHEMA.get_field_index(name)
        column = values if isinstance(values, pa.ChunkedArray) else pa.chunked_array([values])
        new = new.set_column(i, RECORD_SCHEMA.field(name), column.cast(RECORD_SCHEMA.field(name).type))
    keep = np.ones(batch.num_rows, np.bool_)
    keep[rows] = False
    kept = new if keep.all() else new.filter(pa.array(keep))
    dropped = dropped_table(batch.take(pa.array(rows, pa.int64())), stage, reasons, evidence)
    if decisions.rejected:
        dropped = pa.concat_tables([dropped, *(_named(t, stage) for t in decisions.rejected)])
    added = pa.concat_tables(decisions.added) if decisions.added else RECORD_SCHEMA.empty_table()
    edits = [describe_changes(stage, batch, new, keep, list(decisions.columns))] if decisions.columns else []
    if added.num_rows:
        edits.append(added_edits(stage, added))
    edits_table = pa.concat_tables(edits) if edits else EDITS_SCHEMA.empty_table()
    return Applied(kept, dropped, edits_table, added, rows, batch.num_rows, decisions.report)
