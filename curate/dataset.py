"""Records on disk: an ordered run of parts, read back in batches.

Records move between stages through files, not memory. Each stage writes its output as parts (one
per batch it processed), and the next stage reads them back a few whole parts at a time. Nothing
holds every record at once, so a run's memory does not grow with the dataset.

A part is an Arrow IPC file, lz4-compressed: it holds the arrays as a stage made them, and writes
and reads several times faster than Parquet (whose encoding cost a third of a run's time on
../shared/data/raw when parts were Parquet). Versions themselves are Parquet (curate/versions.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

BATCH_ROWS = 8192  # records per batch a stage sees (and per part it writes)


@dataclass(frozen=True)
class Part:
    """One Parquet file of a run of records, and how many it holds."""

    path: str
    rows: int


@dataclass(frozen=True)
class Segment:
    """Rows [start, start + length) of one part."""

    path: str
    start: int
    length: int


def fixed_size_column(matrix: np.ndarray) -> pa.FixedSizeListArray:
    """A 2-D array as a column of fixed-size lists (one row per record): signatures, band hashes."""
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), matrix.shape[1])


_WRITE = ipc.IpcWriteOptions(compression="lz4")


def write_part(path: Path, table: pa.Table) -> Part | None:
    """Write a table as one part; None if it is empty (no file then)."""
    if table.num_rows == 0:
        return None
    with pa.OSFile(str(path), "wb") as sink, ipc.new_file(sink, table.schema, options=_WRITE) as writer:
        writer.write_table(table)
    return Part(str(path), table.num_rows)


def read_part(path: str, columns: list[str] | None = None) -> pa.Table:
    """A part, or some of its columns (only those are read and decompressed)."""
    with pa.OSFile(path, "rb") as source:
        if columns is None:
            return ipc.open_file(source).read_all()
        schema = ipc.open_file(source).schema
        picked = ipc.IpcReadOptions(included_fields=[schema.get_field_index(c) for c in columns])
        return ipc.open_file(source, options=picked).read_all().select(columns)


def part_schema(path: str) -> pa.Schema:
    with pa.OSFile(path, "rb") as source:
        return ipc.open_file(source).schema


def read_segments(segments: list[Segment], columns: list[str] | None = None) -> pa.Table:
    """The rows of consecutive segments as one table."""
    tables = []
    for seg in segments:
        table = read_part(seg.path, columns)
        whole = (seg.start, seg.length) == (0, table.num_rows)
        tables.append(table if whole else table.slice(seg.start, seg.length))
    return pa.concat_tables(tables)


class RecordFiles:
    """An ordered run of records stored as parts; empty when there are none."""

    def __init__(self, parts: list[Part], schema: pa.Schema | None = None) -> None:
        self.parts = [p for p in parts if p.rows]
        self.schema = schema
        self.starts = np.concatenate([[0], np.cumsum([p.rows for p in self.parts], dtype=np.int64)])

    @property
    def num_rows(self) -> int:
        return int(self.starts[-1])

    @property
    def paths(self) -> list[str]:
        return [p.path for p in self.parts]

    def plan(self, batch_rows: int = BATCH_ROWS) -> list[list[Segment]]:
        """Batches of at most `batch_rows` records, as the segments that hold them: whole parts,
        several to a batch while they fit, so that each part is read once (a part larger than a
        batch is cut). No stage's result depends on where batches are cut."""
        batches: list[list[Segment]] = []
        current: list[Segment] = []
        rows = 0
        for part in self.parts:
            if current and rows + part.rows > batch_rows:
                batches.append(current)
                current, rows = [], 0
            if part.rows > batch_rows:
                batches.extend(
                    [Segment(part.path, lo, min(batch_rows, part.rows - lo))]
                    for lo in range(0, part.rows, batch_rows)
                )
                continue
            current.append(Segment(part.path, 0, part.rows))
            rows += part.rows
        if current:
            batches.append(current)
        return batches

    def segments(self, lo: int, hi: int) -> list[Segment]:
        """Rows [lo, hi) as segments of parts."""
        out = []
        first = int(np.searchsorted(self.starts, lo, side="right")) - 1
        for i in range(max(first, 0), len(self.parts)):
            start = int(self.starts[i])
            if start >= hi:
                break
            a, b = max(lo, start), min(hi, start + self.parts[i].rows)
            if b > a:
                out.append(Segment(self.parts[i].path, a - start, b - a))
        return out

    def batches(self, batch_rows: int = BATCH_ROWS, columns: list[str] | None = None) -> Iterator[pa.Table]:
        for segments in self.plan(batch_rows):
            yield read_segments(segments, columns)

    def column(self, name: str) -> pa.ChunkedArray:
        """One column of every record (one chunk per part)."""
        chunks = [read_part(p.path, [name])[name] for p in self.parts]
        if not chunks:
            field = self.schema.field(name) if self.schema is not None else pa.field(name, pa.null())
            return pa.chunked_array([], field.type)
        return pa.chunked_array([c for chunk in chunks for c in chunk.chunks], chunks[0].type)

    def take(self, rows: np.ndarray, columns: list[str] | None = None) -> pa.Table:
        """The records at `rows` (ascending), reading only the parts that hold them."""
        rows = np.asarray(rows, np.int64)
        if rows.size and (rows[1:] < rows[:-1]).any():
            raise ValueError("take: rows must ascend")
        tables = []
        part_of = np.searchsorted(self.starts, rows, side="right") - 1
        for i in np.unique(part_of).tolist():
            local = rows[part_of == i] - self.starts[i]
            tables.append(read_part(self.parts[i].path, columns).take(pa.array(local)))
        if tables:
            return pa.concat_tables(tables)
        schema = (
            self.schema
            if columns is None or self.schema is None
            else pa.schema([self.schema.field(c) for c in columns])
        )
        return schema.empty_table() if schema is not None else pa.table({})


class InMemory:
    """A table in memory with the reading interface of `RecordFiles` (for `Stage.apply`)."""

    def __init__(self, table: pa.Table) -> None:
        self.table = table

    @property
    def num_rows(self) -> int:
        return self.table.num_rows

    def column(self, name: str) -> pa.ChunkedArray:
        return self.table[name]

    def take(self, rows: np.ndarray, columns: list[str] | None = None) -> pa.Table:
        table = self.table if columns is None else self.table.select(columns)
        return table.take(pa.array(np.asarray(rows, np.int64)))


class Shuffle(Protocol):
    """An engine's way to bring rows with equal keys together across machines (Ray: a shuffle by
    hash partition), round after round, its results kept by the engine until collected. Engines on
    one machine offer none: a stage then groups in its own process."""

    def __call__(
        self,
        rows: Any,
        columns: list[str],
        emit: Callable[[pa.Table, int], pa.Table],
        reduce: Callable[[pa.Table], pa.Table],
    ) -> Any:
        """emit(table, first_row) on every part of `rows` (RecordFiles: only `columns` read, with
        the part's first row; or an earlier result of this shuffle, in pieces, with 0) gives rows
        with a uint64 `key`; all rows of a key reach the same reduce(rows) call (with other keys'
        rows); what the reduce calls return is the result, held by the engine, in no set order."""
        ...

    def collect(self, result: Any) -> pa.Table:
        """A result, as one table here."""
        ...

    def total(self, result: Any, column: str) -> int:
        """The sum of an integer column of a result, computed where it is."""
        ...


class FeatureTable:
    """What a global stage receives: its features of every record (loaded column by column, as it
    asks), the records themselves for the few rows a decision must see whole, and the engine's
    `shuffle` when it spans machines (None on one machine)."""

    def __init__(
        self,
        features: RecordFiles | InMemory,
        records: RecordFiles | InMemory,
        shuffle: Shuffle | None = None,
    ) -> None:
        self.features = features
        self._records = records
        self.shuffle = shuffle
        self._columns: dict[str, pa.ChunkedArray] = {}

    @property
    def num_rows(self) -> int:
        return self._records.num_rows

    def column(self, name: str) -> pa.ChunkedArray:
        """A feature column of every record (read once, then kept)."""
        if name not in self._columns:
            self._columns[name] = self.features.column(name)
        return self._columns[name]

    def gather(self, name: str, rows: np.ndarray) -> pa.Array:
        """A feature column at some rows (ascending), without loading the rest of it."""
        table = self.features.take(rows, [name])
        return (
            table[name].combine_chunks() if table.num_rows else pa.array([], self.features.column(name).type)
        )

    def gather_matrix(self, name: str, rows: np.ndarray, dtype) -> np.ndarray:
        """A feature column of fixed-size lists at some rows (ascending), as a 2-D array filled part
        by part: no copy of it is ever held twice."""
        rows = np.asarray(rows, np.int64)
        out: np.ndarray | None = None
        done = 0
        for chunk in self._gathered(name, rows):
            if not len(chunk):
                continue
            values = chunk.flatten().to_numpy().astype(dtype, copy=False).reshape(len(chunk), -1)
            if out is None:
                out = np.empty((rows.size, values.shape[1]), dtype)
            out[done : done + len(chunk)] = values
            done += len(chunk)
        if out is None:
            return np.empty((0, self._width(name)), dtype)
        return out

    def _width(self, name: str) -> int:
        if isinstance(self.features, InMemory) or not self.features.parts:
            return self.column(name).type.list_size if self.num_rows else 0
        return part_schema(self.features.parts[0].path).field(name).type.list_size

    def _gathered(self, name: str, rows: np.ndarray):
        if name in self._columns or isinstance(self.features, InMemory):
            yield self.column(name).take(pa.array(rows)).combine_chunks()
            return
        files = self.features
        part_of = np.searchsorted(files.starts, rows, side="right") - 1
        for i in np.unique(part_of).tolist():
            local = rows[part_of == i] - files.starts[i]
            yield read_part(files.parts[i].path, [name])[name].combine_chunks().take(pa.array(local))

    def records(self, rows: np.ndarray, columns: list[str] | None = None) -> pa.Table:
        """Whole records (or some of their columns) at some rows (ascending)."""
        return self._records.take(rows, columns)

    @property
    def record_files(self) -> RecordFiles | InMemory:
        """The records, for work that an engine's `shuffle` sends to other machines."""
        return self._records
