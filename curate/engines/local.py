"""The local engine: reads input files and runs row stages on every core, with the result of one process.

Work is cut into ordered tasks (an input file, or a slice of rows) and results come back in task
order, so the output never depends on the number of workers. Workers are spawned processes (polars
and numba keep thread pools that must not be forked); small work stays in this process, where
starting workers would cost more than it saves.
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from curate.errors import CurateError
from curate.records import RECORD_SCHEMA

if TYPE_CHECKING:
    from curate.stages.base import RowsResult

# Below these sizes one process is faster: a spawned worker takes 1-2 s to import polars, pyarrow
# and numba and load the compiled kernels, and every slice travels to it and back. Measured on all
# of ../shared/data/raw (21 MB gzipped, 86k records, 2 cores), two workers were slower than one.
PARALLEL_MIN_ROWS = 200_000
PARALLEL_MIN_BYTES = 64 << 20
ROW_CHUNK = 8192


def default_workers() -> int:
    """CURATE_WORKERS if set, else every core."""
    return max(1, int(os.environ.get("CURATE_WORKERS") or os.cpu_count() or 1))


class LocalEngine:
    """Ordered map over worker processes; `with LocalEngine() as engine:` shuts them down after."""

    def __init__(self, workers: int | None = None) -> None:
        self.workers = workers or default_workers()
        self._pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> LocalEngine:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None
        _STAGES.clear()

    @staticmethod
    def worth_workers(size_bytes: int = 0, rows: int = 0) -> bool:
        """Whether work of this size repays starting workers (PARALLEL_MIN_BYTES / _ROWS)."""
        return size_bytes >= PARALLEL_MIN_BYTES or rows >= PARALLEL_MIN_ROWS

    def map(self, fn: Callable, tasks: list[tuple], parallel: bool) -> Iterator[Any]:
        """fn(*task) for every task, results in task order; in workers only when `parallel` pays off."""
        if not parallel or self.workers == 1 or len(tasks) < 2:
            for task in tasks:
                yield fn(*task)
            return
        if self._pool is None:
            self._pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=get_context("spawn"))
        try:
            yield from self._pool.map(fn, *zip(*tasks, strict=True))
        except BrokenProcessPool:
            raise CurateError(
                "a worker process died before finishing its part",
                hint="a script that runs curate must guard its code with `if __name__ == '__main__':` "
                "(workers re-import it); or run with --workers 1 / CURATE_WORKERS=1",
            ) from None


# ingest -------------------------------------------------------------------------------------------


@dataclass
class IngestResult:
    """One input file (or hf: dataset) read: its records as Arrow, its quarantine, per-file counts."""

    table: pa.Table
    quarantined: list[dict]
    files: list[dict]


def ingest_task(spec: Any, base_dir: Path, paths: list[Path] | None) -> IngestResult:
    """The records of `paths` (files of the input `spec`; None: all of it, e.g. an hf: dataset)."""
    from curate.formats import read_input

    tables, quarantined, files = [], [], {}
    with gc_paused():
        batches = list(read_input(spec, base_dir, paths=paths))
    for batch in batches:
        for entry in batch.files:
            total = files.setdefault(entry["path"], {**entry, "records": 0, "quarantined": 0})
            total["records"] += entry["records"]
            total["quarantined"] += entry["quarantined"]
        if batch.table.num_rows:
            tables.append(batch.table)
        quarantined.extend(batch.quarantined)
    table = pa.concat_tables(tables) if tables else RECORD_SCHEMA.empty_table()
    return IngestResult(table, quarantined, list(files.values()))


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No cycle collection while input is parsed and converted.

    Parsed rows are plain trees of dicts and lists, never cycles, yet making tens of thousands of
    them sets off full collections that walk every object of the process (80-90 ms each, several
    per read of raw/). Everything made meanwhile is still collected once collection resumes.
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


# row stages ---------------------------------------------------------------------------------------


# Stages built in this process, so a worker sets each one up (models, tokenizers) once, not per slice.
_STAGES: dict[tuple, Any] = {}


def _stage(name: str, config: Any, context: Any) -> Any:
    from curate.stages import STAGES

    key = (name, repr(config), str(context.base_dir))
    stage = _STAGES.get(key)
    if stage is None:
        stage = STAGES[name](config, context)
        stage.setup()
        _STAGES[key] = stage
    return stage


def row_stage_task(name: str, config: Any, context: Any, chunk: pa.Table) -> RowsResult:
    """A row stage on one slice of the table: its `RowsResult`."""
    return _stage(name, config, context).process_table(chunk)
