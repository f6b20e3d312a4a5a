"""The Ray engine: the same stages on a Ray cluster, through Ray Data, writing the same version.

For when one machine is not enough. Every step is a Ray Data dataset whose rows are tasks (a run
of input files, a batch of records given as segments of the parts), mapped with `map_batches` onto
the same task functions every engine calls (`curate.engines.base`): a task reads its batch from the
parts as an Arrow table, runs the stage and writes its own parts. So the parts, and the version
written from them, are byte for byte those of the local engine (tests/test_ray_engine.py). Parts
go to the stage cache under the output folder, which on several machines must be shared storage
(NFS, a mounted bucket): see docs/ray.md.

What is spread beyond batches:
- a stage's `prepare` (decontaminate: the indexes over the eval items) is built once here and put
  in Ray's object store, which hands it to every worker;
- a stage that `uses_model` (embeddings) runs in an actor pool, one actor per GPU where the
  cluster has GPUs, else one per CPU, so each worker loads the model once;
- a global stage decides here, in the driver, but may group rows by key, round after round, with
  `RayShuffle` (Ray Data's `groupby().map_groups`, results kept in the object store): dedup's
  MinHash band keys meet in buckets, the edges that join them become connected components, and
  each cluster keeps one record, all in shuffles; only the drops come back here
  (curate/text/lsh_shuffle.py);
- a generating stage (evol, respond) decides here too, but its LLM requests are sent by generation
  workers: actors spread over the nodes (one per node unless `generation_workers` says), each with
  the stage's `concurrency` in flight, the budget kept here (curate/llm/fanout.py).

Receipts travel back as JSON and are yielded in task order.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import ray.data
from ray.data.context import ShuffleStrategy

from curate.dataset import BATCH_ROWS, Part, RecordFiles, read_part
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
from curate.engines.local import INGEST_TASK_BYTES, default_workers, file_runs
from curate.errors import CurateError
from curate.llm.config import LLMConfig
from curate.llm.engine import Request
from curate.llm.fanout import Shard, ShardWorker
from curate.stages.base import StageContext


class RayEngine(Engine):
    """Tasks on a Ray cluster: the one this process already joined, the one at `address` (or
    $RAY_ADDRESS), or a local one of `workers` CPUs started on first use (and stopped at `close`).
    A generating stage's requests go to `generation_workers` actors (default: one per node)."""

    name = "ray"

    def __init__(
        self,
        workers: int | None = None,
        address: str | None = None,
        batch_rows: int = BATCH_ROWS,
        generation_workers: int | None = None,
    ):
        if generation_workers is not None and generation_workers < 1:
            raise CurateError(f"generation workers must be 1 or more, not {generation_workers}")
        self.workers = workers or default_workers()
        self.address = address
        self.batch_rows = batch_rows
        self.generation_workers = generation_workers
        self._started = False

    def close(self) -> None:
        if self._started:
            ray.shutdown()
            self._started = False
        super().close()

    # the three steps -------------------------------------------------------------------------------

    def ingest(self, inputs: list[InputFiles], base_dir: Path, out: Path) -> Iterator[IngestReceipt]:
        self._connect()
        size = sum(s for item in inputs for _, s in item.files)
        part = max(INGEST_TASK_BYTES, size // (4 * self._cpus()))
        tasks: list[tuple] = []
        for item in inputs:
            if not item.files:
                tasks.append((item.spec, base_dir, None))
            tasks.extend((item.spec, base_dir, paths) for paths in file_runs(item.files, part))
        yield from self._map(ingest_task, [(*t, out, i) for i, t in enumerate(tasks)], _ingest_receipt)

    def map_stage(self, call: StageCall, source: RecordFiles, out: Path) -> Iterator[BatchReceipt]:
        self._connect()
        from curate.stages import STAGES

        stage = STAGES[call.name](call.config, call.context)
        prepared = stage.prepare()
        tasks = [(call, segments, out, i) for i, segments in enumerate(source.plan(self.batch_rows))]
        shared = None if prepared is None else ray.put(prepared)
        yield from self._map(stage_task, tasks, _batch_receipt, stage.uses_model(), shared)

    def run_global(
        self, call: StageCall, source: RecordFiles, out: Path, progress: Callable[[int], None] | None
    ) -> Iterator[BatchReceipt]:
        self._connect()
        from curate.stages import STAGES

        cls = STAGES[call.name]
        uses_model = cls(call.config, call.context).uses_model()
        plan = source.plan(self.batch_rows)
        parts = []
        tasks = [(call, segments, out, i) for i, segments in enumerate(plan)]
        for segments, part in zip(plan, self._map(features_task, tasks, _part, uses_model), strict=True):
            parts.append(part)
            if progress is not None:
                progress(sum(s.length for s in segments))
        features = RecordFiles([p for p in parts if p is not None])
        workers = GenerationWorkers(self._generation_workers(), call.context) if cls.generates else None
        try:
            decisions = decide(call, features, source, None, self.shuffler(), workers)
        finally:
            if workers is not None:
                workers.close()
        starts = np.cumsum([0] + [sum(s.length for s in segments) for segments in plan])
        apply = [
            (call.name, segments, decisions.slice(int(starts[i]), int(starts[i + 1])), out, i)
            for i, segments in enumerate(plan)
        ]
        yield from self._map(decided_task, apply, _batch_receipt)
        yield added_receipt(call.name, decisions, out, len(plan))

    def shuffler(self) -> RayShuffle:
        """The shuffle a global stage may group rows with (`curate.dataset.Shuffle`)."""
        self._connect()
        return RayShuffle(2 * self._cpus())

    # running tasks -------------------------------------------------------------------------------

    def _connect(self) -> None:
        """Join the cluster (once): the given address, else the one joined already, else a new local one."""
        if not ray.is_initialized():
            self._init()
        logging.getLogger("ray.data").setLevel(logging.ERROR)  # curate shows its own progress
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        context.print_on_execution_start = False
        context.enable_auto_log_stats = False
        # the sort-based shuffle runs as plain tasks; the hash shuffle's aggregator actors took 5-10 s
        # to start on two cores, more than the shuffle of a million records' band keys itself
        context.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED

    def _init(self) -> None:
        quiet = {"logging_level": logging.ERROR, "log_to_driver": False, "include_dashboard": False}
        self.address = self.address or os.environ.get("RAY_ADDRESS") or None
        try:
            if self.address:
                ray.init(address=self.address, **quiet)
            else:  # "local": never the cluster another `ray start` on this machine left its address for
                ray.init(address="local", num_cpus=self.workers, **quiet)
                self._started = True
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise CurateError(
                f"cannot reach a Ray cluster at {self.address}: {exc}",
                hint="start one (`ray start --head`) and give its address (host:port), or leave "
                "--address out for a local cluster",
            ) from None

    def _cpus(self) -> int:
        return max(1, int(ray.cluster_resources().get("CPU", 1)))

    def _generation_workers(self) -> int:
        return self.generation_workers or sum(1 for node in ray.nodes() if node["Alive"])

    def _map(
        self,
        fn: Callable,
        tasks: list[tuple],
        decode: Callable[[Any], Any],
        uses_model: bool = False,
        prepared: Any = None,
    ) -> Iterator[Any]:
        """fn(*task) for every task on the cluster, results in task order as they come in."""
        if not tasks:
            return
        refs = [ray.put(task) for task in tasks]  # each worker fetches only its own tasks
        args = {"fn": fn, "tasks": refs, "prepared": prepared}
        items = ray.data.from_items([{"index": i} for i in range(len(tasks))], override_num_blocks=len(tasks))
        if uses_model:
            gpus = int(ray.cluster_resources().get("GPU", 0))
            results = items.map_batches(
                _ModelWorker,
                batch_size=1,
                batch_format="numpy",
                fn_kwargs=args,
                concurrency=(1, gpus or self._cpus()),
                num_gpus=1 if gpus else 0,
            )
        else:
            results = items.map_batches(_run, batch_size=1, batch_format="numpy", fn_kwargs=args)
        waiting: dict[int, Any] = {}
        next_index = 0
        for batch in results.iter_batches(batch_size=None, batch_format="numpy"):
            for index, result in zip(batch["index"], batch["result"], strict=True):
                waiting[int(index)] = decode(json.loads(result))
            while next_index in waiting:
                yield waiting.pop(next_index)
                next_index += 1


# in the workers ------------------------------------------------------------------------------------


def _run(batch: dict[str, np.ndarray], fn: Callable, tasks: list, prepared: Any) -> dict[str, np.ndarray]:
    """Run the batch's tasks; each result as JSON (dataclasses as dicts)."""
    extra = {} if prepared is None else {"prepared": ray.get(prepared)}
    results = []
    for index in batch["index"]:
        result = fn(*ray.get(tasks[int(index)]), **extra)
        results.append(json.dumps(None if result is None else dataclasses.asdict(result)))
    return {"index": batch["index"], "result": np.array(results, dtype=object)}


class _ModelWorker:
    """An actor of the pool for a stage that loads a model: the stage, built at its first batch,
    stays built in the actor (`StageCall.build`) for every batch after."""

    def __call__(self, batch: dict[str, np.ndarray], fn: Callable, tasks: list, prepared: Any) -> dict:
        return _run(batch, fn, tasks, prepared)


@dataclasses.dataclass
class _Shuffled:
    """A shuffle's result: a materialized dataset in the object store (the driver holds only its
    block references), and an empty table of its schema, for when no rows came out."""

    dataset: ray.data.Dataset
    empty: pa.Table


class RayShuffle:
    """`curate.dataset.Shuffle` on Ray Data: emit per part (or per block of an earlier result),
    rows brought together by `key % partitions` with the sort shuffle (`groupby().map_groups`),
    reduced where they meet; the result stays in the object store, materialized so that the next
    round reads it instead of running the rounds before it again."""

    def __init__(self, partitions: int) -> None:
        self.partitions = partitions

    def __call__(
        self,
        rows: RecordFiles | _Shuffled,
        columns: list[str],
        emit: Callable[[pa.Table, int], pa.Table],
        reduce: Callable[[pa.Table], pa.Table],
    ) -> _Shuffled:
        args = {"emit": emit, "partitions": self.partitions}
        if isinstance(rows, _Shuffled):
            empty = reduce(emit(rows.empty, 0))
            keyed = rows.dataset.map_batches(
                _emit_rows, batch_size=None, batch_format="pyarrow", fn_kwargs=args
            )
        else:
            empty = reduce(emit(read_part(rows.parts[0].path, columns).slice(0, 0), 0))
            items = [{"part": i} for i in range(len(rows.parts))]
            keyed = ray.data.from_items(items, override_num_blocks=max(1, len(items))).map_batches(
                _emit,
                batch_size=1,
                batch_format="numpy",
                fn_kwargs={**args, "features": rows, "columns": columns},
            )
        reduced = keyed.groupby("partition", num_partitions=self.partitions).map_groups(
            _reduce, batch_format="pyarrow", fn_kwargs={"reduce": reduce}
        )
        return _Shuffled(reduced.materialize(), empty)

    def collect(self, result: _Shuffled) -> pa.Table:
        tables = result.dataset.iter_batches(batch_size=None, batch_format="pyarrow")
        return pa.concat_tables([result.empty, *(t for t in tables if t.num_rows)])

    def total(self, result: _Shuffled, column: str) -> int:
        return int(result.dataset.sum(column) or 0)


def _keyed(keyed: pa.Table, partitions: int) -> pa.Table:
    partition = pa.array((keyed["key"].to_numpy() % np.uint64(partitions)).astype(np.int64))
    return keyed.append_column("partition", partition)


def _emit(
    batch: dict[str, np.ndarray], features: RecordFiles, columns: list[str], emit: Callable, partitions: int
) -> pa.Table:
    (index,) = batch["part"]
    part = features.parts[int(index)]
    return _keyed(emit(read_part(part.path, columns), int(features.starts[int(index)])), partitions)


def _emit_rows(rows: pa.Table, emit: Callable, partitions: int) -> pa.Table:
    return _keyed(emit(rows, 0), partitions)


def _reduce(group: pa.Table, reduce: Callable) -> pa.Table:
    return reduce(group.drop_columns(["partition"]))


class GenerationWorkers:
    """A generating stage's generation workers (curate.llm.fanout.Workers): `count` actors spread
    over the nodes, started when the first shard goes out (a stage answered from the request cache
    starts none) and stopped when the stage has decided.

    A worker sending to a remote API reserves no CPU (it waits on the network); one generating with
    a local model takes a GPU, or a CPU where the cluster has no GPU. The API key reaches a worker
    with each shard, in memory, never in Ray's runtime environment (which Ray keeps and shows)."""

    def __init__(self, count: int, context: StageContext) -> None:
        from curate.cache import shared_cache_dir

        self.count = count
        # the driver's request cache, by an absolute path: workers start in folders of their own
        shared = (context.shared_cache or shared_cache_dir()).resolve()
        self.context = dataclasses.replace(context, shared_cache=shared)
        self._actors: list = []

    def submit(
        self, worker: int, config: LLMConfig, requests: list[Request], environment: dict[str, str]
    ) -> Future[Shard]:
        if not self._actors:
            self._start(config)
        return _unwrapped(self._actors[worker].answer.remote(config, requests, environment).future())

    def _start(self, config: LLMConfig) -> None:
        resources: dict = {"num_cpus": 0}
        if config.provider == "local":
            gpus = int(ray.cluster_resources().get("GPU", 0))
            resources = {"num_gpus": 1} if gpus else {"num_cpus": 1}
            have = gpus or int(ray.cluster_resources().get("CPU", 0))
            if self.count > have:
                raise CurateError(
                    f"{self.count} generation workers with a local model need {self.count} "
                    f"{'GPUs' if gpus else 'CPUs'}; the cluster has {have}",
                    hint="set --generation-workers (or engine.generation_workers) to at most that",
                )
        actor = ray.remote(ShardWorker).options(scheduling_strategy="SPREAD", **resources)
        self._actors = [actor.remote(self.context) for _ in range(self.count)]

    def close(self) -> None:
        for actor in self._actors:
            ray.kill(actor)
        self._actors = []


def _unwrapped(future: Future) -> Future:
    """A worker's future failing with curate's error, not Ray's wrapper: a provider's fatal error
    as the worker raised it, a worker that died as what to do about it."""
    out: Future = Future()

    def done(finished: Future) -> None:
        try:
            out.set_result(finished.result())
        except ray.exceptions.RayTaskError as exc:
            out.set_exception(exc.cause if isinstance(exc.cause, CurateError) else exc)
        except ray.exceptions.RayActorError as exc:
            out.set_exception(
                CurateError(
                    f"a generation worker died: {exc}",
                    hint="the answers it received are in the request cache; run again to go on",
                )
            )
        except BaseException as exc:  # noqa: BLE001 - handed to the driver as it is
            out.set_exception(exc)

    future.add_done_callback(done)
    return out


# receipts, back from JSON ------------------------------------------------------------------------------


def _part(d: dict | None) -> Part | None:
    return None if d is None else Part(**d)


def _batch_receipt(d: dict) -> BatchReceipt:
    parts = {k: _part(d[k]) for k in ("kept", "added", "dropped", "edits")}
    return BatchReceipt(**{**d, **parts})


def _ingest_receipt(d: dict) -> IngestReceipt:
    return IngestReceipt([Part(**p) for p in d["parts"]], d["quarantined"], d["files"])
