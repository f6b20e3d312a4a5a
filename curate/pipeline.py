"""The runner: plan a recipe's work, reuse cached results, keep the books, and write the version.

The runner never holds the records. An engine reads the inputs and runs each stage, writing parts
on disk; the runner keys every stage's output by everything it can depend on (the cache key is
built here, never by a stage), takes cached outputs where the key matches, counts and checks that
nothing is lost, and assembles the version from the parts, streaming.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars
import pyarrow
import pyarrow.compute

from curate.cache import Entry, FileDigests, StageCache, digest, module_fingerprint, shared_cache_dir
from curate.dataset import BATCH_ROWS, Part, RecordFiles, read_part
from curate.engines import Engine, make_engine
from curate.engines.base import InputFiles, StageCall
from curate.errors import CurateError
from curate.formats import input_files, relative
from curate.progress import Progress
from curate.recipe import Recipe, StageStep
from curate.stages.base import StageContext
from curate.warm import Warmer

# Library versions that shape stored bytes: part of every cache key.
_LIBRARIES = {"polars": polars.__version__, "pyarrow": pyarrow.__version__, "numpy": np.__version__}


@dataclass
class StageResult:
    """What one stage did: counts, reasons, time, and which run computed its output."""

    name: str
    rows_in: int
    rows_out: int
    dropped: dict[str, int]
    added: int
    seconds: float
    cached: bool
    run: str  # the run that computed this output (an earlier one when cached)
    llm: dict = field(default_factory=dict)  # requests and tokens of the LLM calls the stage made
    report: dict = field(default_factory=dict)  # a global stage's own figures (e.g. coverage)

    def as_manifest(self) -> dict:
        return {
            "name": self.name,
            "in": self.rows_in,
            "out": self.rows_out,
            "dropped": self.dropped,
            "added": self.added,
            "seconds": round(self.seconds, 3),
            "cached": self.cached,
            "run": self.run,
            **({"llm": _usage_entry(self.llm)} if self.llm.get("requests") or self.llm.get("cached") else {}),
            **({"report": self.report} if self.report else {}),
        }


@dataclass
class RunResult:
    """A finished run: the version folder, its manifest (as on disk), and what this run did."""

    folder: Path
    manifest: dict
    run: dict  # {"id", "new": whether this run wrote the version, "seconds", "stages": [...]}


def new_run_id() -> str:
    return time.strftime("r%Y%m%d-%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


class Runner:
    """Runs a recipe's stages on an engine, reusing entries of the stage cache."""

    def __init__(
        self, recipe: Recipe, engine: Engine, cache: StageCache, progress: Progress, run_id: str
    ) -> None:
        self.recipe = recipe
        self.engine = engine
        self.cache = cache
        self.progress = progress
        self.run_id = run_id
        self.digests = FileDigests(cache.root / "digests.json")
        self.shared_cache = shared_cache_dir(recipe.cache.shared_dir)
        self.warnings: list[dict] = []  # input files that gave nothing usable

    def run(self, until_generating: bool = False) -> tuple[Entry, list[Entry], list[StageResult]]:
        """The ingest entry, every stage's entry and result, in order (with `until_generating`, only
        those before the first stage that calls an LLM to make records)."""
        warmer = self._warm_up()
        try:
            ingest = self._ingest()
            self._check_inputs(ingest.done["inputs"])
            entries, results = [], []
            current = ingest
            for index, step in enumerate(self.recipe.stages):
                if until_generating and step.cls.generates:
                    break
                call = self._call(step, current.key)
                entry = self.cache.get(call.key)
                if entry is not None:
                    self.progress.note(f"{step.name}: cached, computed by run {entry.done['run']}")
                else:
                    warmer.wait_for(index)
                    entry = self._compute(call, step, current)
                result = StageResult(**{**entry.done["result"], "cached": entry.done["run"] != self.run_id})
                entries.append(entry)
                results.append(result)
                current = entry
            warmer.finish()
            return ingest, entries, results
        finally:
            warmer.stop()
            self.digests.save()

    def _warm_up(self) -> Warmer:
        """Compile the kernels of every stage but the first in a second process while ingest runs
        (the first starts right after ingest, which compiles the text cleanup it mostly uses)."""
        stages = [
            (i, step.name, step.config, self.context(step.cls))
            for i, step in enumerate(self.recipe.stages)
            if i and step.cls.compiles
        ]
        warmer = Warmer(stages, self.shared_cache)
        names = warmer.start()
        if names:
            self.progress.note(f"compiling kernels for {', '.join(names)} (once: later runs load them)")
        return warmer

    def _check_inputs(self, inputs: list[dict]) -> None:
        """Files that gave nothing usable: warned about, or with `strict` the end of the run."""
        self.warnings = input_warnings(inputs)
        for w in self.warnings:
            self.progress.note(f"warning: {w['file']}: {w['problem']}")
        if self.warnings and self.recipe.strict:
            shown = "; ".join(f"{w['file']}: {w['problem']}" for w in self.warnings[:5])
            raise CurateError(
                f"strict: {len(self.warnings)} input file(s) yield nothing usable ({shown})",
                hint="fix or remove them, or run without strict to write the version with a warning",
            )

    # keys -----------------------------------------------------------------------------------------

    def _call(self, step: StageStep, input_key: str) -> StageCall:
        """The stage as an engine builds it, keyed by all it can read: its input, its config, the
        seed, the eval sets (if it uses them), the files it declares, and its code with the curate
        modules that code imports."""
        cls = step.cls
        context = self.context(cls)
        reads = [self._contents(Path(p)) for p in cls(step.config, context).reads()]
        key = digest(
            "stage",
            input_key,
            step.name,
            dataclasses.asdict(step.config),
            self.recipe.seed,
            self._eval_sets_token() if cls.uses_eval_sets else None,
            reads,
            module_fingerprint(cls.__module__),
            module_fingerprint("curate.engines.base"),
            _LIBRARIES,
        )
        return StageCall(step.name, step.config, context, key)

    def context(self, cls: type) -> StageContext:
        """What a stage of this class may read besides its config (see StageContext)."""
        return StageContext(
            base_dir=self.recipe.base_dir,
            seed=self.recipe.seed,
            eval_sets=self.recipe.eval_sets if cls.uses_eval_sets else [],
            shared_cache=self.shared_cache,
        )

    def _contents(self, path: Path) -> str:
        return self.digests.tree(path) if path.exists() else f"missing:{path}"

    def _eval_sets_token(self) -> list:
        base = self.recipe.base_dir
        files = [
            None if str(e["path"]).startswith("hf:") else self._contents(base / e["path"])
            for e in self.recipe.eval_sets
        ]
        return [self.recipe.eval_sets, files]

    # ingest ---------------------------------------------------------------------------------------

    def _ingest(self) -> Entry:
        base = self.recipe.base_dir
        inputs, hashes = [], {}
        for spec in self.recipe.inputs:
            paths = input_files(spec, base)  # raises a FormatError naming the input when nothing matches
            files = []
            for p in paths:
                # a save_to_disk folder is one input too; its digest covers every file in it
                hashes[relative(p, base)] = self.digests.sha256(p) if p.is_file() else None
                files.append((p, p.stat().st_size if p.is_file() else _folder_size(p)))
            inputs.append(InputFiles(spec, files))
        key = digest(
            "ingest",
            [dataclasses.asdict(s) for s in self.recipe.inputs],
            [
                [(relative(p, base), hashes[relative(p, base)] or self._contents(p)) for p, _ in i.files]
                for i in inputs
            ],
            module_fingerprint("curate.formats"),
            module_fingerprint("curate.engines.base"),
            _LIBRARIES,
        )
        entry = self.cache.get(key)
        if entry is not None:
            self.progress.note(f"ingest: cached ({entry.records.num_rows:,} records)")
            return entry
        tmp = self.cache.begin(key)
        started = time.perf_counter()
        task = self.progress.task("ingest", total=None, unit="records")
        parts: list[Part] = []
        files: list[dict] = []
        quarantined = 0
        spec_of = {}
        try:
            with open(tmp / "quarantine.jsonl", "w", encoding="utf-8") as quarantine:
                for item in inputs:
                    for p, _ in item.files:
                        spec_of[relative(p, base)] = item.spec
                for receipt in self.engine.ingest(inputs, base, tmp):
                    parts.extend(receipt.parts)
                    for q in receipt.quarantined:
                        quarantine.write(json.dumps(q, ensure_ascii=False) + "\n")
                    quarantined += len(receipt.quarantined)
                    for entry in receipt.files:
                        spec = spec_of.get(entry["path"])
                        name = spec.name if spec is not None else _hf_name(self.recipe, entry["path"])
                        files.append({**entry, "name": name, "sha256": hashes.get(entry["path"])})
                    task.advance(sum(p.rows for p in receipt.parts) + len(receipt.quarantined))
            task.done()
            rows = sum(p.rows for p in parts)
            result = StageResult("ingest", 0, rows, {}, 0, time.perf_counter() - started, False, self.run_id)
            done = {
                "result": dataclasses.asdict(result),
                "parts": {"records": _names(parts, tmp), "added": [], "dropped": [], "edits": []},
                "inputs": files,
                "quarantined": quarantined,
                "run": self.run_id,
                "created": time.time(),
            }
            return self.cache.commit(key, tmp, done)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    # stages ---------------------------------------------------------------------------------------

    def _compute(self, call: StageCall, step: StageStep, source_entry: Entry) -> Entry:
        source = source_entry.records
        tmp = self.cache.begin(call.key)
        started = time.perf_counter()
        task = self.progress.task(step.name, total=source.num_rows, unit="records")
        kinds: dict[str, list[Part]] = {"records": [], "added": [], "dropped": [], "edits": []}
        reasons: Counter = Counter()
        llm: Counter = Counter()
        report: dict = {}
        artifacts: list[str] = []
        rows_in = rejected = 0
        if not step.cls.row_local:  # a global stage decides here: its status shows beside its bar
            call.context.status = task.status
        try:
            if step.cls.row_local:
                receipts = self.engine.map_stage(call, source, tmp)
            else:
                receipts = self.engine.run_global(call, source, tmp, task.advance)
            for receipt in receipts:
                rows_in += receipt.rows_in
                rejected += receipt.rejected
                for kind, part in (
                    ("records", receipt.kept),
                    ("added", receipt.added),
                    ("dropped", receipt.dropped),
                    ("edits", receipt.edits),
                ):
                    if part is not None:
                        kinds[kind].append(part)
                reasons.update(receipt.reasons)
                llm.update(receipt.llm)
                report.update(receipt.report)
                artifacts.extend(receipt.artifacts)
                if step.cls.row_local:
                    task.advance(receipt.rows_in)
            task.done()
            for scratch in tmp.glob("features-*"):
                scratch.unlink()
            kept, added, dropped = (sum(p.rows for p in kinds[k]) for k in ("records", "added", "dropped"))
            if (
                rows_in != source.num_rows
                or rows_in + rejected != kept + sum(reasons.values())
                or dropped != sum(reasons.values())
            ):
                raise CurateError(
                    f"internal error: stage {step.name} took {source.num_rows:,} records and accounted for "
                    f"{rows_in:,} (kept {kept:,}, dropped {dropped:,}, made and rejected {rejected:,}); "
                    "please report this"
                )
            result = StageResult(
                name=step.name,
                rows_in=rows_in,
                rows_out=kept + added,
                dropped=dict(sorted(reasons.items())),
                added=added + rejected,
                seconds=time.perf_counter() - started,
                cached=False,
                run=self.run_id,
                llm=dict(llm),
                report=report,
            )
            done = {
                "result": dataclasses.asdict(result),
                "parts": {kind: _names(parts, tmp) for kind, parts in kinds.items()},
                "artifacts": artifacts,
                "run": self.run_id,
                "created": time.time(),
            }
            return self.cache.commit(call.key, tmp, done)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def input_warnings(inputs: list[dict]) -> list[dict]:
    """Input files that yield no records, or more unreadable rows than records."""
    warnings = []
    for entry in inputs:
        records, bad = entry["records"], entry["quarantined"]
        if records == 0 and bad == 0:
            problem = "empty: no rows at all"
        elif records == 0:
            problem = f"no records: all {bad:,} rows unreadable (see quarantine.jsonl)"
        elif bad > records:
            problem = f"mostly unreadable: {bad:,} of {bad + records:,} rows quarantined"
        else:
            continue
        warnings.append({"file": entry["path"], "records": records, "quarantined": bad, "problem": problem})
    return warnings


def _names(parts: list[Part], folder: Path) -> list[list]:
    """Parts as [file name, rows] pairs, relative to their entry folder (which is renamed)."""
    return [[Path(p.path).relative_to(folder).as_posix(), p.rows] for p in parts]


def _folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _hf_name(recipe: Recipe, label: str) -> str | None:
    spec = next((s for s in recipe.inputs if label.startswith(s.path)), None)
    return spec.name if spec is not None else None


def run_recipe(
    recipe: Recipe,
    out_dir: Path | None = None,
    progress: Progress | None = None,
    workers: int | None = None,
    engine: Engine | str | None = None,
    parent: Path | str | None = None,
    address: str | None = None,
    generation_workers: int | None = None,
) -> RunResult:
    """Run a recipe and write its version (or find it written already). Its parent is `parent` (a
    version or output folder), else the recipe's `output.parent`, else the output folder's latest.
    The engine is `engine` (or its name, with a Ray cluster's `address` and `generation_workers`),
    else the recipe's."""
    from curate import versions

    started = time.perf_counter()
    run_id = new_run_id()
    out_dir, progress, engine = _setup(
        recipe, out_dir, progress, workers, engine, address, generation_workers
    )
    with versions.output_lock(out_dir):
        return _run_locked(recipe, out_dir, progress, engine, parent, run_id, started)


def _setup(
    recipe: Recipe,
    out_dir: Path | None,
    progress: Progress | None,
    workers: int | None,
    engine: Engine | str | None,
    address: str | None = None,
    generation_workers: int | None = None,
) -> tuple[Path, Progress, Engine]:
    """The output folder (checked writable), the progress display and the engine a run uses: the
    one given, else the recipe's (a name given overrides the recipe's address and generation
    workers too)."""
    from curate import versions

    out_dir = Path(out_dir) if out_dir else recipe.output_dir or recipe.base_dir / "runs" / recipe.name
    if engine is None or isinstance(engine, str):
        name = engine or recipe.engine.name
        if name == recipe.engine.name:
            address = recipe.engine.address if address is None else address
            generation_workers = generation_workers or recipe.engine.generation_workers
        engine = make_engine(name, workers, address, generation_workers)
    versions.check_writable(out_dir)
    return out_dir, progress or Progress(enabled=False), engine


def _run_locked(
    recipe: Recipe,
    out_dir: Path,
    progress: Progress,
    engine: Engine,
    parent: Path | str | None,
    run_id: str,
    started: float,
) -> RunResult:
    """run_recipe's work, with the output folder's lock held."""
    from curate import versions

    cache = StageCache(out_dir / ".cache", recipe.cache_max_bytes)
    lineage = _parent(parent, recipe, out_dir)
    runner = Runner(recipe, engine, cache, progress, run_id)
    with engine:
        ingest, entries, results = runner.run()
    final = entries[-1] if entries else ingest
    records = final.records
    quarantined = ingest.done["quarantined"]
    inputs = ingest.done["inputs"]
    vid = versions.VersionId(recipe.raw, [entry["sha256"] or entry["path"] for entry in inputs])
    for batch in records.batches(BATCH_ROWS, ["id"]):
        vid.kept(batch["id"].to_pylist())
    dropped_parts = [p for e in entries for p in e.dropped]
    for part in dropped_parts:
        table = read_part(part.path, ["id", "stage", "reason"])
        vid.dropped(list(zip(*(table[c].to_pylist() for c in ("id", "stage", "reason")), strict=True)))
    version = vid.hexdigest()
    _real_share_check(recipe, records)
    overlap = _eval_overlap_check(recipe, records)
    counts = {
        "input": ingest.records.num_rows + quarantined,
        "kept": records.num_rows,
        "dropped": sum(p.rows for p in dropped_parts),
        "quarantined": quarantined,
        "synthetic": sum(r.added for r in results),
    }
    if counts["input"] != counts["kept"] + counts["dropped"] + counts["quarantined"] - counts["synthetic"]:
        raise CurateError(f"internal error: counts do not add up {counts}; please report this")
    manifest = {
        "version": version,
        "parent": lineage["parent"] if lineage["parent"] != version else None,
        "parent_path": lineage["path"] if lineage["parent"] != version else None,
        "parent_from": lineage["from"] if lineage["parent"] not in (None, version) else None,
        "created": versions.now_iso(),
        "run": run_id,
        "recipe": recipe.raw,
        "recipe_path": str(recipe.path.resolve()) if recipe.path else None,
        "code_version": versions.code_version(),
        "template": (recipe.stage_options("normalize") or {}).get("template", "chatml"),
        "inputs": inputs,
        "counts": counts,
        "stages": [r.as_manifest() for r in results],
        "eval_overlap": overlap,
        "languages": _languages(records, recipe.seed),
        "warnings": runner.warnings,
        "llm": _llm_totals(results, recipe),
        "seconds": round(time.perf_counter() - started, 3),
    }
    folder, new = versions.write_version(
        out_dir,
        version,
        manifest,
        records,
        [e.dropped for e in entries],
        [e.edits for e in entries],
        ingest.folder / "quarantine.jsonl",
        [a for e in entries for a in e.artifacts],
    )
    cache.prune(protect=frozenset([ingest.key, *(e.key for e in entries)]))
    run = {
        "id": run_id,
        "new": new,
        "engine": engine.name,
        "seconds": round(time.perf_counter() - started, 3),
        "stages": [
            {"name": r.name, "cached": r.cached, "run": r.run, "seconds": round(r.seconds, 3)}
            for r in results
        ],
    }
    return RunResult(folder, versions.read_manifest(folder), run)


def estimate_recipe(
    recipe: Recipe,
    out_dir: Path | None = None,
    progress: Progress | None = None,
    workers: int | None = None,
    engine: Engine | str | None = None,
    address: str | None = None,
) -> dict:
    """What a recipe's generating stages are expected to send and spend, before any request.

    The stages before the first generating one run (or come from the cache: nothing they do is
    paid); every generating stage is then estimated on the records that reach the first one, at
    its worst (each answer as long as max_tokens, each evolution surviving), and held against its
    budget."""
    from curate import synthetic, versions

    out_dir, progress, engine = _setup(recipe, out_dir, progress, workers, engine, address)
    with versions.output_lock(out_dir):
        cache = StageCache(out_dir / ".cache", recipe.cache_max_bytes)
        runner = Runner(recipe, engine, cache, progress, new_run_id())
        with engine:
            ingest, entries, _ = runner.run(until_generating=True)
    records = (entries[-1] if entries else ingest).records
    stages = []
    for step in recipe.stages[len(entries) :]:
        if not step.cls.generates:
            continue
        expected = step.cls(step.config, runner.context(step.cls)).estimate(records)
        budget = step.config.budget
        stages.append(
            {
                "stage": step.name,
                "provider": step.config.provider,
                "model": step.config.model,
                **expected,
                "budget": dataclasses.asdict(budget) if budget is not None else None,
                "over_budget": synthetic.check_budget(step.name, step.config, expected),
            }
        )
    return {"records": records.num_rows, "stages": stages, "total": synthetic.add_estimates(stages)}


def _llm_totals(stages: list[StageResult], recipe: Recipe) -> dict:
    """LLM usage of the stages computed for this version (a cached stage cost nothing this time);
    cost is unknown (null) when no stage has prices."""
    keys = ("requests", "answered", "cached", "retries", "failed", "input_tokens", "output_tokens", "cost")
    totals = dict.fromkeys(keys, 0)
    for s in stages:
        if not s.cached:
            for key in keys:
                totals[key] += s.llm.get(key, 0)
    priced = any(getattr(step.config, "prices", None) is not None for step in recipe.stages)
    return {**totals, "cost": round(totals["cost"], 6) if priced else None}


def _usage_entry(llm: dict) -> dict:
    """A stage's LLM usage as the manifest shows it (whether its budget ran out, as true or false)."""
    if "budget_exhausted" not in llm:
        return llm
    return {**llm, "budget_exhausted": bool(llm["budget_exhausted"])}


def _languages(records: RecordFiles, seed: int, sample: int = 10_000) -> dict:
    """{"sample": n, "shares": {code: share}}: the languages (CLD2) of a seeded sample of the kept
    records' user and assistant turns (system prompts left out: a default one would count)."""
    from curate.text.language import language_shares

    rows = np.random.default_rng(seed).choice(records.num_rows, min(records.num_rows, sample), replace=False)
    conversations = records.take(np.sort(rows), ["messages"])["messages"].to_pylist() if rows.size else []
    texts = [" ".join(m["content"] or "" for m in c if m["role"] != "system") for c in conversations]
    return {"sample": len(texts), "shares": language_shares(texts)}


def _parent(given: Path | str | None, recipe: Recipe, out_dir: Path) -> dict:
    """{"parent": version id, "path": its folder, "from": "--parent" | "recipe" | "latest"}: the
    version a user names (which must exist), else the one the output folder pointed at."""
    from curate import versions

    for where, origin in ((given, "--parent"), (recipe.parent, "recipe")):
        if where is not None:
            try:
                folder = versions.resolve_version(where)
            except CurateError as exc:
                hint = "give a version folder or an output folder"
                raise CurateError(f"parent {where}: {exc}", hint=hint) from None
            return {"parent": folder.name, "path": str(folder.resolve()), "from": origin}
    try:
        folder = versions.resolve_version(out_dir)
    except CurateError:
        return {"parent": None, "path": None, "from": None}
    return {"parent": folder.name, "path": str(folder.resolve()), "from": "latest"}


def _real_share_check(recipe: Recipe, records: RecordFiles) -> None:
    """Refuse a version whose real share is below the recipe's blend minimum (0.2 without a blend):
    a stage after the blend may have dropped real records, or added synthetic ones."""
    from curate.stages.blend import MIN_REAL_FRACTION

    if not any(step.cls.generates for step in recipe.stages):
        return
    blends = [step.config.min_real_fraction for step in recipe.stages if step.name == "blend"]
    minimum = blends[-1] if blends else MIN_REAL_FRACTION
    made = sum(
        pyarrow.compute.sum(pyarrow.compute.equal(batch["origin"], "synthetic")).as_py() or 0
        for batch in records.batches(BATCH_ROWS, ["origin"])
    )
    total = records.num_rows
    if made and (total - made) < minimum * total - 1e-9:
        raise CurateError(
            f"refusing to write a version with {total - made:,} real records of {total:,} "
            f"({(total - made) / total:.1%}): the minimum real share is {minimum:.0%}",
            hint="put the blend stage last, after every stage that drops or adds records",
        )


def _eval_overlap_check(recipe: Recipe, records: RecordFiles) -> dict:
    """Refuse a version that would train on an exact copy of a declared eval item, unless allowed."""
    if not recipe.eval_sets:
        return {"checked": False, "exact_copies": 0}
    from curate.contamination import EvalCopies

    check = EvalCopies(recipe.eval_sets, recipe.base_dir)
    copies = [c for batch in records.batches(BATCH_ROWS, ["id", "messages"]) for c in check.find(batch)]
    if copies and not recipe.allow_eval_overlap:
        shown = "; ".join(f"record {c['id']} = {c['eval_set']}:{c['eval_id']}" for c in copies[:5])
        raise CurateError(
            f"refusing to write a version: {len(copies)} kept record(s) contain an exact copy of an eval "
            f"item ({shown})",
            hint="add a decontaminate stage (methods: [exact, ngram]) or set allow_eval_overlap: true",
        )
    return {"checked": True, "exact_copies": len(copies), "allowed": recipe.allow_eval_overlap}
