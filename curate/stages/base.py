"""The stage contract: a typed config, one method that decides, and a registry keyed by recipe name.

A stage's `process` takes a table of records (pyarrow, canonical columns) and returns `Decisions`:
rows to drop with reason and evidence, replaced columns, added records. The runner applies them,
counts, times, caches and writes evidence and edits for every stage alike, so a stage only decides.

Row-local stages (normalize, filter, decontaminate) judge each record on its own: an engine may cut
the records into batches of any size and run them anywhere. Global stages (dedup, diversity, blend)
need every record at once, but never every record's text: their `features` method, row-local like
the above, reduces each batch to the few columns they need (keys, signatures, lengths), and their
`process` receives those columns for all records as a `FeatureTable`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import pyarrow as pa

from curate.configs import build_config, describe_config, option
from curate.decisions import Applied, Decisions, Drop, apply_decisions
from curate.records import RECORD_SCHEMA

if TYPE_CHECKING:
    from curate.dataset import FeatureTable


@dataclass
class StageContext:
    """What a stage may use besides its config. Everything here is part of the stage's cache key:
    the seed always, the eval sets only for stages that declare `uses_eval_sets`."""

    base_dir: Path  # the recipe's folder: relative paths in options resolve against it
    seed: int = 0
    eval_sets: list[dict] = field(default_factory=list)  # eval set entries of the recipe
    shared_cache: Path | None = None  # user-level folder for LLM answers and embeddings (curate.cache)
    progress: Any = None  # callable(n) while a global stage decides in the runner's process
    status: Any = None  # callable(text): how the stage's work goes, beside its progress bar
    llm_engines: list = field(default_factory=list)  # every request engine a stage made, for usage
    llm_workers: Any = None  # an engine's generation workers (curate.llm.fanout.Workers), while deciding

    def __getstate__(self) -> dict:
        """Progress and status are this process's callables: a worker gets the context without them,
        without the engines (it counts its own usage) and without the generation workers (it sends)."""
        return {**self.__dict__, "progress": None, "status": None, "llm_engines": [], "llm_workers": None}

    def advance(self, n: int = 1) -> None:
        if self.progress is not None:
            self.progress(n)

    def say(self, text: str) -> None:
        if self.status is not None:
            self.status(text)

    def llm_engine(self, config: Any) -> Any:
        """A request engine for an LLMConfig, answering from the shared request cache; its usage
        reaches the manifest, from whichever process it runs in. With `llm_workers` its requests
        are sent by those workers, within the same budget (curate.llm.fanout)."""
        from curate.cache import shared_cache_dir
        from curate.llm import RequestCache, RequestEngine, make_provider

        shared = self.shared_cache or shared_cache_dir()
        provider = make_provider(config, shared, self.base_dir)
        cache = RequestCache.at(shared / "llm" / "requests.sqlite")
        if self.llm_workers is not None:
            from curate.llm.fanout import FanOutEngine

            engine = FanOutEngine(provider, config, cache, self.llm_workers, status=self.say, seed=self.seed)
        else:
            engine = RequestEngine(provider, config, cache, status=self.say, seed=self.seed)
        self.llm_engines.append(engine)
        return engine

    def llm_usage(self) -> dict:
        """Usage of every engine so far, summed (numbers only, so usage since a point is a difference)."""
        from curate.llm import usage_totals

        return usage_totals([engine.usage for engine in self.llm_engines])


class Stage:
    """A row-local stage. Subclasses set `name`, `Config` and a one-line docstring, and write `process`."""

    name: ClassVar[str]
    Config: ClassVar[type]
    row_local: ClassVar[bool] = True
    uses_eval_sets: ClassVar[bool] = False  # the recipe's eval sets reach the context (and the key)
    compiles: ClassVar[bool] = True  # has numba kernels that a first run compiles (curate.warm)
    generates: ClassVar[bool] = False  # makes records with an LLM: needs a blend after it, has `estimate`

    def __init__(self, config: Any, context: StageContext) -> None:
        self.config = config
        self.context = context

    @classmethod
    def recipe_issues(cls, config: Any, recipe: Any) -> list[str]:
        """Problems of this stage's options in the context of the whole recipe (checked by
        `curate validate` and before any run), e.g. eval set names that the recipe does not declare."""
        return []

    def reads(self) -> list[Path]:
        """Files and folders besides the records that the output depends on (a reference version, a
        tokenizer or model folder). The runner hashes their contents into the stage's cache key."""
        return []

    @classmethod
    def warmup_config(cls, config: Any) -> Any:
        """The options to compile this stage's kernels with, on made-up records (curate.warm): the
        same as `config` but without what is slow to load and compiles nothing (models, files)."""
        return config

    def setup(self, prepared: Any = None) -> None:
        """Load models or indexes once per process, before the first batch (optional); `prepared`
        is what `prepare` made, when the engine made it once and shipped it here."""

    def prepare(self) -> Any:
        """What `setup` would build alike in every process and can travel (decontaminate: the
        indexes over the eval items). An engine spanning machines calls it once and hands the
        result to every process's `setup`; None (the default): nothing worth shipping."""
        return None

    def uses_model(self) -> bool:
        """Whether its batches run a model that is slow to load (embeddings): an engine that can
        keeps it in long-lived workers (Ray: an actor pool, a GPU each where the cluster has them)."""
        return False

    def process(self, table: pa.Table) -> Decisions:
        """Decide about a batch of records (RECORD_SCHEMA columns)."""
        raise NotImplementedError

    def apply(self, table: pa.Table) -> Applied:
        """The stage on one table in memory, its decisions applied as a run applies them: for
        notebooks and tests (a run streams batches through an engine instead)."""
        return apply_decisions(self.name, table, self._decide_all(table))

    def _decide_all(self, table: pa.Table) -> Decisions:
        return self.process(table)


class GlobalStage(Stage):
    """A stage that decides about every record at once, from what `features` keeps of each."""

    row_local = False

    def features(self, batch: pa.Table) -> pa.Table:
        """What the stage needs of each record of a batch (one row per record, in order). Runs
        batch by batch, possibly in other processes; the default keeps the ids."""
        return batch.select(["id"])

    def process(self, table: FeatureTable) -> Decisions:  # type: ignore[override]
        """Decide about all records, given their features (and `table.records(rows)` for the few
        whole records a decision needs)."""
        raise NotImplementedError

    def _decide_all(self, table: pa.Table) -> Decisions:
        from curate.dataset import FeatureTable, InMemory

        return self.process(FeatureTable(InMemory(self.features(table)), InMemory(table)))

    def feature_table(self, records: Any) -> FeatureTable:
        """The FeatureTable `process` would get for records on disk (RecordFiles), built here: for
        estimates and notebooks."""
        from curate.dataset import FeatureTable, InMemory

        features = [self.features(batch) for batch in records.batches()]
        table = pa.concat_tables(features) if features else self.features(RECORD_SCHEMA.empty_table())
        return FeatureTable(InMemory(table), records)

    def estimate(self, records: Any) -> dict:
        """A generating stage's expected spend on these records (RecordFiles), before any request:
        {requests, input_tokens, output_tokens, cost} (`curate estimate`, the budget check)."""
        raise NotImplementedError


class GeneratingStage(GlobalStage):
    """A global stage that makes records with an LLM: it writes `estimate` (for `curate estimate` and
    the budget check), and a recipe must blend real data in after it."""

    compiles = False
    generates = True

    @classmethod
    def recipe_issues(cls, config: Any, recipe: Any) -> list[str]:
        at = next(i for i, step in enumerate(recipe.stages) if step.config is config)
        if any(step.name == "blend" for step in recipe.stages[at + 1 :]):
            return []
        return [
            "a generating stage needs a blend stage after it (at least 20% real records); "
            "add `- blend: {min_real_fraction: 0.2}` after it"
        ]


STAGES: dict[str, type[Stage]] = {}


def register(cls: type[Stage]) -> type[Stage]:
    """Class decorator: make a stage available under its recipe name."""
    STAGES[cls.name] = cls
    return cls


__all__ = [
    "STAGES",
    "Decisions",
    "Drop",
    "GeneratingStage",
    "GlobalStage",
    "Stage",
    "StageContext",
    "build_config",
    "describe_config",
    "option",
    "register",
]
