"""The stage model: a typed config, one method that decides, and a registry keyed by recipe name.

Two kinds of stage exist. A `RowStage` looks at one record at a time and keeps it, drops it with a
reason, or returns a rewritten record. A `TableStage` sees the whole table (dedup, decontamination,
diversity, blending) and returns one verdict per row, plus any records it adds. The runner does
the counting, timing, caching, evidence and progress for every stage alike, so a stage only
decides.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import polars as pl
import pyarrow as pa

from curate.edits import EDITS_SCHEMA, edit_entry
from curate.errors import RecipeError
from curate.records import to_table


@dataclass(frozen=True)
class Drop:
    """Why a record leaves the set, with the evidence a reviewer needs to agree."""

    reason: str
    evidence: dict = field(default_factory=dict)


Verdict = Drop | dict | None  # drop, keep this rewritten record, or keep as is


@dataclass
class TableVerdicts:
    """A table stage's answer: one verdict per input row (None keeps it) and records it adds."""

    verdicts: list[Drop | dict | None]
    added: list[dict] = field(default_factory=list)


@dataclass
class StageContext:
    """What a stage may use besides its config: the recipe's eval sets, seed, folders, progress."""

    base_dir: Path
    cache_dir: Path
    seed: int = 0
    eval_sets: list[dict] = field(default_factory=list)  # eval set specs from the recipe
    progress: Any = None  # a callable(advance: int) or None
    recipe: dict = field(default_factory=dict)
    llm_clients: list = field(default_factory=list)  # every client a stage made, for the manifest's usage

    def advance(self, n: int = 1) -> None:
        if self.progress is not None:
            self.progress(n)

    def llm_client(self, provider: str, model: str, **options: Any) -> Any:
        """An LLM client with the durable request cache under cache_dir; its usage reaches the manifest."""
        from curate.llm import LLMClient

        client = LLMClient(provider, model, self.cache_dir, **options)
        self.llm_clients.append(client)
        return client

    def llm_usage(self) -> dict:
        totals = {"requests": 0, "cached": 0, "input_tokens": 0, "output_tokens": 0}
        for client in self.llm_clients:
            for key in totals:
                totals[key] += getattr(client.usage, key)
        return totals


def option(default: Any = dataclasses.MISSING, help: str = "", **kwargs: Any) -> Any:  # noqa: A002
    """A config field with its documentation (printed by `curate stages`)."""
    if default is not dataclasses.MISSING and isinstance(default, (list, dict, set)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


class Stage:
    """Base of all stages. Subclasses set `name`, `Config` and a one-line docstring."""

    name: ClassVar[str]
    Config: ClassVar[type]

    def __init__(self, config: Any, context: StageContext) -> None:
        self.config = config
        self.context = context

    def setup(self) -> None:
        """Load models or indexes once, before the first record (optional)."""

    def cache_token(self) -> str:
        """What the output depends on beyond the config and the input records (files the stage reads),
        as a string for the stage cache key: when it changes, a cached result is not reused."""
        return ""


def files_token(paths: list[Path]) -> str:
    """A digest of the contents of files (or of every file under folders), for `Stage.cache_token`."""
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    for path in paths:
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            h.update(str(f).encode())
            if f.is_file():
                with open(f, "rb") as fh:
                    for chunk in iter(lambda fh=fh: fh.read(1 << 20), b""):
                        h.update(chunk)
    return h.hexdigest()


@dataclass
class RowsResult:
    """A row stage's answer for a slice of the table: kept rows (rewrites applied), drops, edits."""

    kept: pa.Table
    drops: list[tuple[int, str, str]]  # (row in the slice, reason, evidence as JSON)
    edits: pa.Table  # of curate.edits.EDITS_SCHEMA


class RowStage(Stage):
    """A stage that judges each record on its own.

    A stage writes `process` (one record as a dict in, a verdict out). The engine calls
    `process_table` on slices of the table; its default runs `process` on every row, and a stage
    whose work can be done on whole columns overrides it (normalize and filter do) to skip the dicts.
    """

    def on_columns(self) -> bool:
        """Whether `process_table` works on whole columns with this config. Such work stays in the
        runner's process: sending slices to workers and back would cost more than it saves."""
        return False

    def process(self, record: dict) -> Verdict:
        raise NotImplementedError

    def process_batch(self, records: list[dict]) -> list[Verdict]:
        return [self.process(r) for r in records]

    def process_table(self, table: pa.Table) -> RowsResult:
        rows = table.to_pylist()
        verdicts = self.process_batch(rows)
        if len(verdicts) != len(rows):
            raise RuntimeError(f"stage {self.name} returned {len(verdicts)} verdicts for {len(rows)} records")
        keep, rewritten, drops, edits = [], False, [], []
        for i, (row, verdict) in enumerate(zip(rows, verdicts, strict=True)):
            if isinstance(verdict, Drop):
                drops.append((i, verdict.reason, evidence_json(verdict.evidence)))
                continue
            keep.append(i)
            if isinstance(verdict, dict):
                rewritten = True
                rows[i] = verdict
                entry = edit_entry(self.name, row, verdict)
                if entry:
                    edits.append(entry)
        # untouched slices are cut from the input table: no trip through Python objects and back
        kept = to_table([rows[i] for i in keep]) if rewritten else table.take(pa.array(keep, pa.int64()))
        return RowsResult(kept, drops, pa.Table.from_pylist(edits, schema=EDITS_SCHEMA))


def without_drops(table: pa.Table, drops: list[tuple[int, str, str]]) -> pa.Table:
    """The table without the rows `drops` names (as `RowsResult.drops` lists them)."""
    if not drops:
        return table
    keep = np.ones(table.num_rows, np.bool_)
    keep[[i for i, _, _ in drops]] = False
    return table.filter(pa.array(keep))


def evidence_json(evidence: dict) -> str:
    """A drop's evidence as it is stored in dropped.parquet."""
    return json.dumps(evidence, ensure_ascii=False, sort_keys=True, default=str)


class TableStage(Stage):
    """A stage that needs the whole table at once."""

    def apply(self, table: pl.DataFrame) -> TableVerdicts:
        raise NotImplementedError


STAGES: dict[str, type[Stage]] = {}


def register(cls: type[Stage]) -> type[Stage]:
    """Class decorator: make a stage available under its recipe name."""
    STAGES[cls.name] = cls
    return cls


def build_config(config_cls: type, options: dict | None, where: str) -> Any:
    """Validate recipe options into the stage's config dataclass, with errors that point at the key."""
    options = dict(options or {})
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    hints = typing.get_type_hints(config_cls)
    for key in options:
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"known options: {', '.join(fields)}"
            raise RecipeError(f"{where}: unknown option '{key}'", hint=hint)
    for key, value in options.items():
        sub_cls = _dataclass_in(hints[key])
        if sub_cls is not None and isinstance(value, dict):
            options[key] = build_config(sub_cls, value, f"{where}.{key}")
        elif not _type_ok(hints[key], value):
            raise RecipeError(
                f"{where}.{key}: expected {_type_name(hints[key])}, got {value!r}",
                hint=fields[key].metadata.get("help", ""),
            )
    try:
        config = config_cls(**options)
    except TypeError as exc:
        raise RecipeError(f"{where}: {exc}") from None
    check = getattr(config, "check", None)
    if check is not None:
        try:
            check()
        except ValueError as exc:
            raise RecipeError(f"{where}: {exc}") from None
    return config


def _dataclass_in(tp: Any) -> type | None:
    for arg in (tp, *typing.get_args(tp)):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def _type_ok(tp: Any, value: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin is typing.Union or origin is types.UnionType:
        return any(_type_ok(arg, value) for arg in typing.get_args(tp))
    if origin is typing.Literal:
        return value in typing.get_args(tp)
    if tp is type(None):
        return value is None
    if origin in (list, tuple):
        (item,) = typing.get_args(tp)[:1] or (Any,)
        return isinstance(value, (list, tuple)) and all(_type_ok(item, v) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin is typing.Union or origin is types.UnionType:
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def describe_config(config_cls: type, prefix: str = "") -> list[dict]:
    """Options of a stage config, for `curate stages`: name, type, default, help (nested ones dotted)."""
    hints = typing.get_type_hints(config_cls)
    rows = []
    for f in dataclasses.fields(config_cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None
        nested = _dataclass_in(hints[f.name])
        if dataclasses.is_dataclass(default):
            default = dataclasses.asdict(default)
        rows.append(
            {
                "name": prefix + f.name,
                "type": _type_name(hints[f.name]),
                "default": default,
                "help": f.metadata.get("help", ""),
            }
        )
        if nested is not None:
            rows.extend(describe_config(nested, prefix=f"{prefix}{f.name}."))
    return rows
