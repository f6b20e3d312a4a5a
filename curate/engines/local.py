"""The local engine: every core of one machine, with the result of one process.

Tasks (a run of input files, a batch of records) go to spawned worker processes when the work is
large enough to repay them, and their receipts come back in task order, a bounded number ahead,
so memory does not grow with the number of tasks. Workers are spawned, not forked: polars and
numba keep thread pools that must not be forked.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from curate.dataset import BATCH_ROWS, RecordFiles
from curate.engines.base import (
    BatchReceipt,
    Engine,
    IngestReceipt,
    InputFiles,
    StageCall,
    added_receipt,
    decide,
    decided_task,
    features_task,
    ingest_task,
    stage_task,
)
from curate.errors import CurateError

# Below these sizes one process is faster: a spawned worker takes 1-2 s to import polars, pyarrow
# and numba and load the compiled kernels. Measured on all of ../shared/data/raw (21 MB gzipped,
# 86k records, 2 cores), two workers were slower than one.
PARALLEL_MIN_ROWS = 200_000
PARALLEL_MIN_BYTES = 64 << 20
INGEST_TASK_BYTES = 8 << 20  # input read by one task (compressed size), unless workers need more


def default_workers() -> int:
    """CURATE_WORKERS if set, else every core."""
    return max(1, int(os.environ.get("CURATE_WORKERS") or os.cpu_count() or 1))


class LocalEngine(Engine):
    """Worker processes on this machine for large work, this process for small work."""

    name = "local"

    def __init__(
        self,
        workers: int | None = None,
        batch_rows: int = BATCH_ROWS,
        min_rows: int = PARALLEL_MIN_ROWS,
        min_bytes: int = PARALLEL_MIN_BYTES,
    ) -> None:
        self.workers = workers or default_workers()
        self.batch_rows = batch_rows
        self.min_rows, self.min_bytes = min_rows, min_bytes
        self._pool: ProcessPoolExecutor | None = None

    def close(self) -> None:
        self.close_pool()
        super().close()

    def close_pool(self) -> None:
        """Stop the workers (the next parallel task starts new ones)."""
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def ingest(self, inputs: list[InputFiles], base_dir: Path, out: Path) -> Iterator[IngestReceipt]:
        size = sum(s for item in inputs for _, s in item.files)
        parallel = size >= self.min_bytes
        # tasks of many files each (a file costs little on its own), enough of them to keep the
        # workers busy and the progress bar moving
        part = max(INGEST_TASK_BYTES, size // (4 * self.workers)) if parallel else INGEST_TASK_BYTES
        tasks = []
        for item in inputs:
            if not item.files:
                tasks.append((item.spec, base_dir, None))
            tasks.extend((item.spec, base_dir, paths) for paths in file_runs(item.files, part))
        yield from self._map(ingest_task, ((*t, out, i) for i, t in enumerate(tasks)), parallel)

    def map_stage(self, call: StageCall, source: RecordFiles, out: Path) -> Iterator[BatchReceipt]:
        plan = source.plan(self.batch_rows)
        tasks = ((call, segments, out, i) for i, segments in enumerate(plan))
        yield from self._map(stage_task, tasks, source.num_rows >= self.min_rows)

    def run_global(
        self, call: StageCall, source: RecordFiles, out: Path, progress: Callable[[int], None] | None
    ) -> Iterator[BatchReceipt]:
        plan = source.plan(self.batch_rows)
        parallel = source.num_rows >= self.min_rows
        parts = []
        feature_tasks = ((call, segments, out, i) for i, segments in enumerate(plan))
        for segments, part in zip(plan, self._map(features_task, feature_tasks, parallel), strict=True):
            parts.append(part)
            if progress is not None:
                progress(sum(s.length for s in segments))
        features = RecordFiles([p for p in parts if p is not None])
        self.close_pool()  # idle workers hold hundreds of MB each: not while the features are in memory
        decisions = decide(call, features, source, None)
        starts = np.cumsum([0] + [_rows(segments) for segments in plan])
        apply_tasks = (
            (call.name, segments, decisions.slice(int(starts[i]), int(starts[i + 1])), out, i)
            for i, segments in enumerate(plan)
        )
        yield from self._map(decided_task, apply_tasks, parallel)
        yield added_receipt(call.name, decisions, out, len(plan))

    def _map(self, fn: Callable, tasks: Iterable[tuple], parallel: bool) -> Iterator[Any]:
        """fn(*task) for every task, results in task order; in workers when `parallel` pays off."""
        if not parallel or self.workers == 1:
            for task in tasks:
                yield fn(*task)
            return
        if self._pool is None:
            self._pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=get_context("spawn"))
        ahead: deque = deque()
        try:
            for task in tasks:
                ahead.append(self._pool.submit(fn, *task))
                if len(ahead) >= 2 * self.workers:
                    yield ahead.popleft().result()
            while ahead:
                yield ahead.popleft().result()
        except BrokenProcessPool:
            raise CurateError(
                "a worker process died before finishing its part",
                hint="a script that runs curate must guard its code with `if __name__ == '__main__':` "
                "(workers re-import it); or run with --workers 1 / CURATE_WORKERS=1",
            ) from None
        finally:
            for future in ahead:
                future.cancel()


def _rows(segments) -> int:
    return sum(s.length for s in segments)


def file_runs(files: list[tuple[Path, int]], part: int) -> list[list[Path]]:
    """The paths in order, cut into runs of about `part` bytes each (a bigger file is a run alone)."""
    runs: list[list[Path]] = []
    total = part
    for path, size in files:
        if total >= part:
            runs.append([])
            total = 0
        runs[-1].append(path)
        total += size
    return runs
