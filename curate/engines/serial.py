"""The serial engine: every task in this process, one after another, in batches of its own size.

It exists to prove the engine seam: it reads each input file as its own task and cuts records into
batches of a different size than the local engine, yet must write the same version, byte for
byte (tests/test_engines.py). It is also the engine to debug a stage with: no worker processes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

from curate.dataset import RecordFiles
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


class SerialEngine(Engine):
    name = "serial"

    def __init__(self, batch_rows: int = 3000) -> None:
        self.batch_rows = batch_rows

    def ingest(self, inputs: list[InputFiles], base_dir: Path, out: Path) -> Iterator[IngestReceipt]:
        index = 0
        for item in inputs:
            for paths in [[p] for p, _ in item.files] or [None]:
                yield ingest_task(item.spec, base_dir, paths, out, index)
                index += 1

    def map_stage(self, call: StageCall, source: RecordFiles, out: Path) -> Iterator[BatchReceipt]:
        for i, segments in enumerate(source.plan(self.batch_rows)):
            yield stage_task(call, segments, out, i)

    def run_global(
        self, call: StageCall, source: RecordFiles, out: Path, progress: Callable[[int], None] | None
    ) -> Iterator[BatchReceipt]:
        plan = source.plan(self.batch_rows)
        parts = []
        for i, segments in enumerate(plan):
            parts.append(features_task(call, segments, out, i))
            if progress is not None:
                progress(sum(s.length for s in segments))
        decisions = decide(call, RecordFiles([p for p in parts if p is not None]), source, None)
        start = 0
        for i, segments in enumerate(plan):
            rows = sum(s.length for s in segments)
            yield decided_task(call.name, segments, decisions.slice(start, start + rows), out, i)
            start += rows
        yield added_receipt(call.name, decisions, out, len(plan))
