"""Recipes and the runner: load and check a recipe whole, then ingest, run each stage, and cache results.

The runner owns everything stages have in common: counting, timing, evidence, progress and the
stage cache. A stage's cache key chains the key of its input with its own name, options and code,
so re-running a recipe whose first stages did not change reuses their output.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import polars as pl
import pyarrow as pa
import yaml

import curate
from curate import stages as stage_registry
from curate.edits import EDITS_SCHEMA, edit_entry
from curate.engines.local import (
    ROW_CHUNK,
    LocalEngine,
    ingest_task,
    row_stage_task,
)
from curate.errors import CurateError, RecipeError
from curate.formats import InputSpec, input_files, relative
from curate.progress import Progress
from curate.records import RECORD_SCHEMA, to_table
from curate.stages.base import Drop, RowStage, Stage, StageContext, build_config, evidence_json, files_token

# schemas/ at the top of the repository; curate/schemas links to it, so wheels carry the files too
SCHEMA_DIR = Path(__file__).resolve().parent / "schemas"

# Extra words for the most common recipe mistakes, keyed by the schema keyword that failed.
_SCHEMA_HINTS = {
    "required": "see pipelines/demo.yaml for a complete recipe",
    "additionalProperties": "top-level keys are name, description, seed, inputs, eval_sets, stages, output, "
    "allow_eval_overlap",
    "maxProperties": "write each stage as its own list item: `- dedup: {...}`",
    "minProperties": "write each stage as its own list item: `- dedup: {...}`",
}


@dataclass
class StageStep:
    """One stage of a recipe: its name, validated config and the options as written."""

    name: str
    config: Any
    options: dict

    @property
    def cls(self) -> type[Stage]:
        return stage_registry.STAGES[self.name]


@dataclass
class Recipe:
    """A validated recipe; paths in it resolve against `base_dir` (the recipe's folder)."""

    name: str
    inputs: list[InputSpec]
    stages: list[StageStep]
    eval_sets: list[dict] = field(default_factory=list)
    output_dir: Path | None = None
    seed: int = 0
    allow_eval_overlap: bool = False
    base_dir: Path = Path(".")
    raw: dict = field(default_factory=dict)
    path: Path | None = None

    def stage_options(self, name: str) -> dict | None:
        return next((s.options for s in self.stages if s.name == name), None)


def load_schema(name: str) -> dict:
    return json.loads((SCHEMA_DIR / name).read_text())


def load_recipe(path: str | Path) -> Recipe:
    """Read a YAML recipe and check all of it (shape, stage names, every option) before anything runs."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(
            f"recipe not found: {path}", hint="give the path of a pipeline YAML, e.g. pipelines/demo.yaml"
        )
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise RecipeError(
            f"{path}: a recipe is a mapping with inputs and stages", hint=_SCHEMA_HINTS["required"]
        )
    return recipe_from_dict(raw, base_dir=path.resolve().parent, path=path)


def recipe_from_dict(raw: dict, base_dir: Path, path: Path | None = None) -> Recipe:
    validator = jsonschema.Draft202012Validator(load_schema("pipeline.schema.json"))
    errors = sorted(validator.iter_errors(raw), key=lambda e: list(e.absolute_path))
    if errors:
        err = errors[0]
        where = _key_path(err.absolute_path) or "recipe"
        raise RecipeError(f"{where}: {err.message}", hint=_SCHEMA_HINTS.get(err.validator, ""))
    inputs = [InputSpec.from_recipe(entry, f"inputs[{i}]") for i, entry in enumerate(raw["inputs"])]
    eval_sets = list(raw.get("eval_sets") or [])
    if eval_sets:
        from curate.evalsets import EvalSetSpec

        for i, entry in enumerate(eval_sets):
            EvalSetSpec.from_recipe(entry, f"eval_sets[{i}]")
        names = [e["name"] for e in eval_sets]
        if len(set(names)) != len(names):
            raise RecipeError("eval_sets: names must be unique", hint=f"got {names}")
    steps = []
    for i, item in enumerate(raw["stages"]):
        ((name, options),) = item.items()
        if name not in stage_registry.STAGES:
            close = difflib.get_close_matches(name, stage_registry.STAGES, n=1)
            hint = f"did you mean '{close[0]}'?" if close else "`curate stages` lists them"
            raise RecipeError(f"stages[{i}]: unknown stage '{name}'", hint=hint)
        cls = stage_registry.STAGES[name]
        steps.append(
            StageStep(name, build_config(cls.Config, options, f"stages[{i}].{name}"), dict(options or {}))
        )
    out = (raw.get("output") or {}).get("dir")
    return Recipe(
        name=raw.get("name") or (path.stem if path else "recipe"),
        inputs=inputs,
        stages=steps,
        eval_sets=eval_sets,
        output_dir=(base_dir / out).resolve() if out else None,
        seed=int(raw.get("seed", 0)),
        allow_eval_overlap=bool(raw.get("allow_eval_overlap", False)),
        base_dir=base_dir,
        raw=raw,
        path=path,
    )


def _key_path(parts) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


@dataclass
class StageResult:
    """What one stage did: counts, reasons, time, and whether its output came from the cache."""

    name: str
    rows_in: int
    rows_out: int
    dropped: dict[str, int]
    added: int
    seconds: float
    cached: bool
    llm: dict = field(default_factory=dict)  # requests and tokens of the LLM calls the stage made

    def as_manifest(self) -> dict:
        return {
            "name": self.name,
            "in": self.rows_in,
            "out": self.rows_out,
            "dropped": self.dropped,
            "added": self.added,
            "seconds": round(self.seconds, 3),
            "cached": self.cached,
            **({"llm": self.llm} if self.llm.get("requests") or self.llm.get("cached") else {}),
        }


@dataclass
class RunOutput:
    """Everything a run produced, before the version is written."""

    kept: pl.DataFrame
    dropped: pl.DataFrame
    edits: pl.DataFrame
    quarantine: list[dict]
    inputs: list[dict]
    stages: list[StageResult]
    ingested: int

    @property
    def synthetic(self) -> int:
        return sum(s.added for s in self.stages)


INGEST_TASK_BYTES = 8 << 20  # files read by one ingest task (compressed size), unless workers need more

DROPPED_EXTRA = pa.schema(
    [pa.field("stage", pa.string()), pa.field("reason", pa.string()), pa.field("evidence", pa.string())]
)


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """Hash of every source file of curate: a stage's output also depends on the kernels, readers and
    helpers it calls, so any code change invalidates the cache (hashing ~10k lines takes a millisecond)."""
    h = hashlib.blake2b(digest_size=8)
    package = Path(curate.__file__).resolve().parent
    for path in sorted(package.rglob("*.py")):
        h.update(path.relative_to(package).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def _digest(*parts: Any) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.blake2b(blob.encode(), digest_size=12).hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Runner:
    """Runs a recipe on the local engine, reusing cached stage outputs under `cache_dir`."""

    def __init__(self, recipe: Recipe, cache_dir: Path, progress: Progress, engine: LocalEngine) -> None:
        self.recipe = recipe
        self.cache_dir = cache_dir
        self.progress = progress
        self.engine = engine

    def run(self) -> RunOutput:
        table, quarantine, inputs, key = self._ingest()
        ingested = table.height
        dropped_parts: list[pl.DataFrame] = []
        edit_parts: list[pl.DataFrame] = []
        results = []
        for step in self.recipe.stages:
            ctx = self._context()
            key = _digest(
                key,
                step.name,
                dataclasses.asdict(step.config),
                step.cls(step.config, ctx).cache_token(),
                code_fingerprint(),
            )
            cached = self._load_cached(key)
            if cached is not None:
                kept, dropped, edits, result = cached
                result.cached = True
                self.progress.note(f"{step.name}: cached ({result.rows_in:,} -> {result.rows_out:,})")
            else:
                kept, dropped, edits, result = self._run_stage(step, ctx, table)
                self._store_cached(key, kept, dropped, edits, result)
            table = kept
            dropped_parts.append(dropped)
            edit_parts.append(edits)
            results.append(result)
        return RunOutput(
            kept=table,
            dropped=pl.concat(dropped_parts) if dropped_parts else _empty_dropped(),
            edits=pl.concat(edit_parts) if edit_parts else pl.from_arrow(EDITS_SCHEMA.empty_table()),
            quarantine=quarantine,
            inputs=inputs,
            stages=results,
            ingested=ingested,
        )

    # ingest ---------------------------------------------------------------------------------------

    def _ingest(self) -> tuple[pl.DataFrame, list[dict], list[dict], str]:

        base = self.recipe.base_dir
        files = []
        for spec in self.recipe.inputs:
            paths = input_files(spec, base)  # raises a FormatError naming the input when nothing matches
            # a save_to_disk folder is one input too; its digest covers every file in it
            files.append([(p, file_sha256(p) if p.is_file() else files_token([p])) for p in paths])
        key = _digest(
            "ingest",
            [dataclasses.asdict(s) for s in self.recipe.inputs],
            [[(str(p), h) for p, h in group] for group in files],
            code_fingerprint(),
        )
        cached = self._load_cached(key)
        if cached is not None:
            table, _, _, result = cached
            self.progress.note(f"ingest: cached ({table.height:,} records)")
            meta = json.loads((self.cache_dir / key / "ingest.json").read_text())
            return table, meta["quarantine"], meta["inputs"], key
        hashes = {relative(p, base): h if p.is_file() else None for group in files for p, h in group}
        sizes = [[p.stat().st_size for p, _ in group] for group in files]
        size = sum(map(sum, sizes))
        parallel = self.engine.worth_workers(size_bytes=size)
        # tasks of many files each (a file costs little on its own), enough of them to keep the
        # workers busy and the progress bar moving
        part = max(INGEST_TASK_BYTES, size // (4 * self.engine.workers)) if parallel else INGEST_TASK_BYTES
        tasks = []
        for spec, group, group_sizes in zip(self.recipe.inputs, files, sizes, strict=True):
            if spec.path.startswith("hf:"):
                tasks.append((spec, base, None))
            for paths in _by_size([p for p, _ in group], group_sizes, part):
                tasks.append((spec, base, paths))
        tables: list[pa.Table] = []
        quarantine: list[dict] = []
        inputs: list[dict] = []
        task = self.progress.task("ingest", total=None, unit="records")
        results = self.engine.map(ingest_task, tasks, parallel=parallel)
        for (spec, _, _), result in zip(tasks, results, strict=True):
            tables.append(result.table)
            quarantine.extend(result.quarantined)
            for entry in result.files:
                inputs.append({**entry, "name": spec.name, "sha256": hashes.get(entry["path"])})
            task.advance(result.table.num_rows + len(result.quarantined))
        task.done()
        arrow = pa.concat_tables(tables) if tables else RECORD_SCHEMA.empty_table()
        table = pl.from_arrow(arrow).rechunk()  # one chunk, not one per file: slices stay cheap
        self._store_cached(
            key,
            table,
            _empty_dropped(),
            _empty_edits(),
            StageResult("ingest", 0, table.height, {}, 0, 0, False),
        )
        (self.cache_dir / key / "ingest.json").write_text(
            json.dumps({"quarantine": quarantine, "inputs": inputs})
        )
        return table, quarantine, inputs, key

    # stages ---------------------------------------------------------------------------------------

    def _context(self) -> StageContext:
        return StageContext(
            base_dir=self.recipe.base_dir,
            cache_dir=self.cache_dir,
            seed=self.recipe.seed,
            eval_sets=self.recipe.eval_sets,
            recipe=self.recipe.raw,
        )

    def _run_stage(self, step: StageStep, ctx: StageContext, table: pl.DataFrame):
        started = time.perf_counter()
        task = self.progress.task(step.name, total=table.height, unit="records")
        if issubclass(step.cls, RowStage):
            kept, dropped, edits, reasons = self._run_row_stage(step, ctx, table, task.advance)
            added = 0
        else:
            stage = step.cls(step.config, ctx)
            ctx.progress = task.advance
            stage.setup()
            out = stage.apply(table)
            if len(out.verdicts) != table.height:
                raise CurateError(
                    f"stage {step.name} returned {len(out.verdicts)} verdicts for {table.height} records"
                )
            kept, dropped, edits = _apply_verdicts(step.name, table, out.verdicts, out.added)
            reasons = Counter(v.reason for v in out.verdicts if isinstance(v, Drop))
            added = len(out.added)
        task.done()
        result = StageResult(
            name=step.name,
            rows_in=table.height,
            rows_out=kept.height,
            dropped=dict(sorted(reasons.items())),
            added=added,
            seconds=time.perf_counter() - started,
            cached=False,
            llm=ctx.llm_usage(),
        )
        return kept, dropped, edits, result

    def _run_row_stage(self, step: StageStep, ctx: StageContext, table: pl.DataFrame, advance):
        """A row stage over slices of the table, on the engine's workers when the table is large."""
        offsets = range(0, table.height, ROW_CHUNK)
        on_columns = step.cls(step.config, ctx).on_columns()
        parallel = not on_columns and self.engine.worth_workers(rows=table.height)
        arrow = table.to_arrow().cast(RECORD_SCHEMA)  # once: a polars slice converts all it shares
        compact = parallel and self.engine.workers > 1
        tasks = [(step.name, step.config, ctx, _slice(arrow, o, ROW_CHUNK, compact)) for o in offsets]
        kept_parts, edit_parts, drop_idx, reasons, evidence = [], [], [], [], []
        results = self.engine.map(row_stage_task, tasks, parallel=parallel)
        for offset, part in zip(offsets, results, strict=True):
            kept_parts.append(part.kept)
            edit_parts.append(part.edits)
            for i, reason, proof in part.drops:
                drop_idx.append(offset + i)
                reasons.append(reason)
                evidence.append(proof)
            advance(min(ROW_CHUNK, table.height - offset))
        kept = pl.from_arrow(pa.concat_tables(kept_parts)).rechunk() if kept_parts else table.clear()
        dropped = _dropped_rows(step.name, table, drop_idx, reasons, evidence)
        edits = pl.from_arrow(pa.concat_tables(edit_parts)) if edit_parts else _empty_edits()
        return kept, dropped, edits, Counter(reasons)

    # cache ----------------------------------------------------------------------------------------

    def _load_cached(self, key: str):
        folder = self.cache_dir / key
        if not (folder / "done.json").is_file():
            return None
        result = StageResult(**json.loads((folder / "done.json").read_text()))
        return (
            pl.read_parquet(folder / "kept.parquet"),
            pl.read_parquet(folder / "dropped.parquet"),
            pl.read_parquet(folder / "edits.parquet"),
            result,
        )

    def _store_cached(self, key: str, kept, dropped, edits, result: StageResult) -> None:
        folder = self.cache_dir / key
        folder.mkdir(parents=True, exist_ok=True)
        kept.write_parquet(folder / "kept.parquet", compression="lz4")
        dropped.write_parquet(folder / "dropped.parquet", compression="lz4")
        edits.write_parquet(folder / "edits.parquet", compression="lz4")
        # done.json last: a crash mid-write leaves an entry that is ignored, never a half one that is used
        (folder / "done.json").write_text(json.dumps(dataclasses.asdict(result)))


def _by_size(paths: list[Path], sizes: list[int], part: int) -> list[list[Path]]:
    """The paths in order, cut into runs of about `part` bytes each (a bigger file is a run alone)."""
    runs: list[list[Path]] = []
    total = part
    for path, size in zip(paths, sizes, strict=True):
        if total >= part:
            runs.append([])
            total = 0
        runs[-1].append(path)
        total += size
    return runs


def _slice(table: pa.Table, offset: int, length: int, compact: bool) -> pa.Table:
    """Rows [offset, offset + length). A slice shares its parent's buffers, and pickling it for a
    worker would send them whole, so a slice bound for a worker is copied out (`compact`)."""
    part = table.slice(offset, length)
    return part.take(pa.array(np.arange(part.num_rows))) if compact else part


def _empty_dropped() -> pl.DataFrame:
    return pl.from_arrow(pa.unify_schemas([RECORD_SCHEMA, DROPPED_EXTRA]).empty_table())


def _empty_edits() -> pl.DataFrame:
    return pl.from_arrow(EDITS_SCHEMA.empty_table())


def _dropped_rows(stage: str, table: pl.DataFrame, idx: list[int], reasons: list[str], evidence: list[str]):
    return table[idx].with_columns(
        pl.lit(stage).alias("stage"),
        pl.Series("reason", reasons, dtype=pl.String),
        pl.Series("evidence", evidence, dtype=pl.String),
    )


def _apply_verdicts(stage: str, table: pl.DataFrame, verdicts: list, added: list[dict]):
    """Split a table by a table stage's verdicts into kept rows (rewrites applied, additions last), drops."""
    keep_idx, drop_idx, drops, rewrites = [], [], [], {}
    for i, v in enumerate(verdicts):
        if isinstance(v, Drop):
            drop_idx.append(i)
            drops.append(v)
        else:
            keep_idx.append(i)
            if isinstance(v, dict):
                rewrites[i] = v
    kept = table[keep_idx] if len(keep_idx) != table.height else table
    edits = []
    if rewrites:
        rows = table.to_arrow().to_pylist()
        edits = [e for i, new in rewrites.items() if (e := edit_entry(stage, rows[i], new))]
        kept = pl.from_arrow(to_table([rewrites.get(i, rows[i]) for i in keep_idx]))
    if added:
        kept = pl.concat([kept, pl.from_arrow(to_table(added))])
        edits.extend(edit_entry(stage, None, r) for r in added)
    evidence = [evidence_json(d.evidence) for d in drops]
    dropped = _dropped_rows(stage, table, drop_idx, [d.reason for d in drops], evidence)
    return kept, dropped, pl.from_arrow(pa.Table.from_pylist(edits, schema=EDITS_SCHEMA))


def run_recipe(
    recipe: Recipe, out_dir: Path | None = None, progress: Progress | None = None, workers: int | None = None
) -> tuple[Path, dict]:
    """Run a recipe and write its version; returns the version folder and its manifest."""
    from curate import versions

    out_dir = Path(out_dir) if out_dir else recipe.output_dir or recipe.base_dir / "runs" / recipe.name
    progress = progress or Progress(enabled=False)
    started = time.perf_counter()
    with LocalEngine(workers) as engine:
        output = Runner(recipe, out_dir / ".cache", progress, engine).run()
    overlap = _eval_overlap_check(recipe, output.kept)
    dropped_key = output.dropped.select("id", "stage", "reason").rows()
    input_hashes = [entry["sha256"] or entry["path"] for entry in output.inputs]
    vid = versions.version_id(recipe.raw, input_hashes, output.kept["id"].to_list(), dropped_key)
    previous = _previous_version(out_dir)
    counts = {
        "input": output.ingested + len(output.quarantine),
        "kept": output.kept.height,
        "dropped": output.dropped.height,
        "quarantined": len(output.quarantine),
        "synthetic": output.synthetic,
    }
    if counts["input"] != counts["kept"] + counts["dropped"] + counts["quarantined"] - counts["synthetic"]:
        raise CurateError(f"internal error: counts do not add up {counts}; please report this")
    manifest = {
        "version": vid,
        "parent": previous if previous != vid else None,
        "created": versions.now_iso(),
        "recipe": recipe.raw,
        "recipe_path": str(recipe.path.resolve()) if recipe.path else None,
        "code_version": versions.code_version(),
        "template": (recipe.stage_options("normalize") or {}).get("template", "chatml"),
        "inputs": output.inputs,
        "counts": counts,
        "stages": [s.as_manifest() for s in output.stages],
        "eval_overlap": overlap,
        "llm": _llm_totals(output.stages),
        "seconds": round(time.perf_counter() - started, 3),
    }
    folder = versions.write_version(
        out_dir, vid, manifest, output.kept, output.dropped, output.edits, output.quarantine
    )
    return folder, versions.read_manifest(folder)


def _llm_totals(stages: list[StageResult]) -> dict:
    """LLM usage of this run: a cached stage made no calls; cost is left unknown (null) without prices."""
    totals = {"requests": 0, "cached": 0, "input_tokens": 0, "output_tokens": 0}
    for s in stages:
        if not s.cached:
            for key in totals:
                totals[key] += s.llm.get(key, 0)
    return {**totals, "cost": None}


def _previous_version(out_dir: Path) -> str | None:
    from curate import versions

    try:
        return versions.resolve_version(out_dir).name
    except CurateError:
        return None


def _eval_overlap_check(recipe: Recipe, kept: pl.DataFrame) -> dict:
    """Refuse a version that would train on an exact copy of a declared eval item, unless allowed."""
    if not recipe.eval_sets:
        return {"checked": False, "exact_copies": 0}
    from curate.stages.decontaminate import exact_eval_copies

    copies = exact_eval_copies(kept, recipe.eval_sets, recipe.base_dir)
    if copies and not recipe.allow_eval_overlap:
        shown = "; ".join(f"record {c['id']} = {c['eval_set']}:{c['eval_id']}" for c in copies[:5])
        raise CurateError(
            f"refusing to write a version: {len(copies)} kept record(s) contain an exact copy of an eval "
            f"item ({shown})",
            hint="add a decontaminate stage (methods: [exact, ngram]) or set allow_eval_overlap: true",
        )
    return {"checked": True, "exact_copies": len(copies), "allowed": recipe.allow_eval_overlap}
