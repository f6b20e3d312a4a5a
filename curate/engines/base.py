"""The engine interface: how a run's work is executed, kept apart from what the work is.

The runner plans (what to compute, cache keys) and keeps the books (counts, conservation, the
version). An engine executes three kinds of work and hands back receipts, in order:

- `ingest`: read input files into record parts;
- `map_stage`: run a row-local stage over batches of records, writing kept, dropped, edited and
  added records as parts;
- `run_global`: compute a global stage's features batch by batch, let it decide once, and apply
  its decisions batch by batch.

The work itself is the task functions below, which every engine calls, wherever it runs them; a
batch's decisions are always applied by `curate.decisions.apply_decisions`. An engine decides only
where tasks run and how records are cut into batches, which no result depends on: every engine
writes the same version.
"""

from __future__ import annotations

import ctypes
import gc
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from curate.dataset import FeatureTable, Part, RecordFiles, Segment, Shuffle, read_segments, write_part
from curate.decisions import Decisions, apply_decisions, rejected_table
from curate.edits import added_edits
from curate.stages.base import Stage, StageContext


@dataclass(frozen=True)
class StageCall:
    """What a process needs to build a stage (picklable); `key` is its cache key."""

    name: str
    config: Any
    context: StageContext
    key: str

    def build(self, prepared: Any = None) -> Stage:
        """The stage, built and set up once per process and key (models, indexes load once);
        `prepared` is what its `prepare` made elsewhere, when an engine ships it to every process."""
        stage = _BUILT.get(self.key)
        if stage is None:
            from curate.stages import STAGES

            stage = STAGES[self.name](self.config, self.context)
            if prepared is None:
                stage.setup()
            else:
                stage.setup(prepared)
            _BUILT.clear()  # one stage at a time: the previous one's models can go
            _BUILT[self.key] = stage
        return stage


_BUILT: dict[str, Stage] = {}


@dataclass(frozen=True)
class InputFiles:
    """One input of the recipe and its files with their sizes (no files: an hf: dataset)."""

    spec: Any  # curate.formats.InputSpec
    files: list[tuple[Path, int]]


@dataclass
class IngestReceipt:
    parts: list[Part]
    quarantined: list[dict]
    files: list[dict]  # {"path", "format", "records", "quarantined"} per file read


@dataclass
class BatchReceipt:
    """What one batch of a stage wrote and counted."""

    index: int
    rows_in: int
    kept: Part | None
    added: Part | None
    dropped: Part | None
    edits: Part | None
    reasons: dict[str, int]
    llm: dict = field(default_factory=dict)
    report: dict = field(default_factory=dict)  # a global stage's figures for the manifest
    artifacts: list[str] = field(default_factory=list)  # files it wrote beside its parts
    rejected: int = 0  # records the stage made and dropped (counted in `added` and in `reasons`)


class Engine(ABC):
    """Executes a run's tasks; `with engine:` releases its workers after."""

    name: str = "engine"

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        _BUILT.clear()

    @abstractmethod
    def ingest(self, inputs: list[InputFiles], base_dir: Path, out: Path) -> Iterator[IngestReceipt]:
        """Read every input's files into parts under `out`; receipts in input and file order."""

    @abstractmethod
    def map_stage(self, call: StageCall, source: RecordFiles, out: Path) -> Iterator[BatchReceipt]:
        """A row-local stage over batches of `source`; receipts in batch order."""

    @abstractmethod
    def run_global(
        self, call: StageCall, source: RecordFiles, out: Path, progress: Callable[[int], None] | None
    ) -> Iterator[BatchReceipt]:
        """A global stage over all of `source`; receipts in batch order, then one for added records."""


# tasks: the work itself, the same in every engine ---------------------------------------------------


def ingest_task(spec: Any, base_dir: Path, paths: list[Path] | None, out: Path, index: int) -> IngestReceipt:
    """Read some files of an input (None: all of it, e.g. an hf: dataset) into parts."""
    from curate.formats import read_input

    parts, quarantined, files = [], [], {}
    with gc_paused():
        for j, batch in enumerate(read_input(spec, base_dir, paths=paths)):
            for entry in batch.files:
                total = files.setdefault(entry["path"], {**entry, "records": 0, "quarantined": 0})
                total["records"] += entry["records"]
                total["quarantined"] += entry["quarantined"]
            part = write_part(out / f"ingest-{index:06d}-{j:05d}.arrow", batch.table)
            if part is not None:
                parts.append(part)
            quarantined.extend(batch.quarantined)
    release_memory()
    return IngestReceipt(parts, quarantined, list(files.values()))


def stage_task(
    call: StageCall, segments: list[Segment], out: Path, index: int, prepared: Any = None
) -> BatchReceipt:
    """A row-local stage on one batch: decide, apply, write."""
    stage = call.build(prepared)
    batch = read_segments(segments)
    before = call.context.llm_usage()
    decisions = stage.process(batch)
    receipt = _store(call.name, batch, decisions, out, index, _usage_since(before, call.context.llm_usage()))
    release_memory()
    return receipt


def features_task(call: StageCall, segments: list[Segment], out: Path, index: int) -> Part | None:
    """A global stage's features of one batch, written as a part."""
    batch = read_segments(segments)
    features = call.build().features(batch)
    if features.num_rows != batch.num_rows:
        raise ValueError(f"stage {call.name}: features gave {features.num_rows} rows for {batch.num_rows}")
    part = write_part(out / f"features-{index:06d}.arrow", features)
    release_memory()
    return part


def decided_task(
    name: str, segments: list[Segment], decisions: Decisions, out: Path, index: int
) -> BatchReceipt:
    """A global stage's decisions about one batch, applied and written."""
    return _store(name, read_segments(segments), decisions, out, index, {})


def decide(
    call: StageCall,
    features: RecordFiles,
    source: RecordFiles,
    progress,
    shuffle: Shuffle | None = None,
    llm_workers: Any = None,
) -> Decisions:
    """A global stage's decisions about every record, made in this process (with `shuffle`, the
    engine's way to group rows by key over many machines, for a stage that can use it; with
    `llm_workers`, the processes that send a generating stage's LLM requests: curate.llm.fanout)."""
    stage = call.build()
    stage.context.progress = progress
    stage.context.llm_workers = llm_workers
    before = stage.context.llm_usage()
    try:
        decisions = stage.process(FeatureTable(features, source, shuffle))
    finally:
        stage.context.progress = stage.context.llm_workers = None
        release_memory()
    decisions.llm = _usage_since(before, stage.context.llm_usage())
    if decisions.rows != source.num_rows:
        raise ValueError(f"stage {call.name} decided about {decisions.rows} rows of {source.num_rows}")
    return decisions


def added_receipt(name: str, decisions: Decisions, out: Path, index: int) -> BatchReceipt:
    """What a global stage made besides decisions, after every batch: the records it added, its
    report, its artifacts (written as `<stage>-<name>` beside the parts), the records it made and
    rejected, and the LLM usage of its decisions."""
    artifacts = []
    for file_name, content in sorted(decisions.artifacts.items()):
        (out / f"{name}-{file_name}").write_bytes(content)
        artifacts.append(f"{name}-{file_name}")
    added = pa.concat_tables(decisions.added) if decisions.added else None
    added_part = edits = None
    if added is not None:
        edits = write_part(out / f"edits-{index:06d}.arrow", added_edits(name, added))
        added_part = write_part(out / f"added-{index:06d}.arrow", added)
    rejected = rejected_table(decisions, name)
    dropped = reasons = None
    if rejected is not None:
        dropped = write_part(out / f"dropped-{index:06d}.arrow", rejected)
        reasons = dict(Counter(rejected["reason"].to_pylist()))
    return BatchReceipt(
        index,
        0,
        None,
        added_part,
        dropped,
        edits,
        reasons or {},
        decisions.llm,
        decisions.report,
        artifacts,
        rejected=rejected.num_rows if rejected is not None else 0,
    )


def _store(
    name: str, batch: pa.Table, decisions: Decisions, out: Path, index: int, llm: dict
) -> BatchReceipt:
    applied = apply_decisions(name, batch, decisions)
    return BatchReceipt(
        index=index,
        rows_in=batch.num_rows,
        kept=write_part(out / f"records-{index:06d}.arrow", applied.kept),
        added=write_part(out / f"added-{index:06d}.arrow", applied.added),
        dropped=write_part(out / f"dropped-{index:06d}.arrow", applied.dropped),
        edits=write_part(out / f"edits-{index:06d}.arrow", applied.edits),
        reasons=applied.reasons,
        llm=llm,
        rejected=sum(t.num_rows for t in decisions.rejected),
    )


def _usage_since(before: dict, after: dict) -> dict:
    return {k: after[k] - before.get(k, 0) for k in after}


def release_memory() -> None:
    """Hand memory that a finished step freed back to the system: Arrow's allocator and glibc's keep
    freed blocks for reuse, and a run's peak would otherwise be the sum of its steps' peaks."""
    pa.default_memory_pool().release_unused()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018 - glibc only
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _libc()


class gc_paused:  # noqa: N801 - used as a context manager
    """No cycle collection while input is parsed and converted.

    Parsed rows are plain trees of dicts and lists, never cycles, yet making tens of thousands of
    them sets off full collections that walk every object of the process (80-90 ms each, several
    per read of raw/). Everything made meanwhile is still collected once collection resumes.
    """

    def __enter__(self) -> None:
        self.was_enabled = gc.isenabled()
        gc.disable()

    def __exit__(self, *exc: Any) -> None:
        if self.was_enabled:
            gc.enable()
