"""Pipeline recipes: the YAML a user writes, its JSON Schema, and every check made before a run.

The schema is generated from the config classes (each stage's `Config`, `InputSpec`, the eval set
entry, `OutputSpec`, `CacheSpec`) and committed as `schemas/pipeline.schema.json` for editors;
a test keeps the two equal. `load_recipe` checks a recipe against that same schema, then builds
each part and makes the checks a schema cannot (rules across options, eval set names, files that
must exist), collecting every issue before it reports, so `curate validate` and `curate run`
accept and refuse exactly the same recipes.

    python -m curate.recipe > schemas/pipeline.schema.json     # after changing an option
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from curate.cache import DEFAULT_MAX_BYTES, parse_size
from curate.configs import config_schema, key_path, make_config, option, schema_issues
from curate.errors import CurateError, Issue, RecipeError
from curate.evalsets import EvalSetSpec, eval_set_schema
from curate.formats import InputSpec, input_files, input_schema
from curate.stages import PLUGIN_PROBLEMS, STAGES, Stage

SCHEMA_DIR = Path(__file__).resolve().parent / "schemas"  # links to schemas/ at the repository's top


@dataclass
class OutputSpec:
    """Where versions are written."""

    dir: str | None = option(
        None, help="Output folder, relative to the recipe (default: runs/<name> beside it)."
    )
    parent: str | None = option(
        None,
        help="The version this one is derived from, recorded as its parent: a version folder, or an "
        "output folder for its latest (default: the output folder's latest before the run; "
        "`curate run --parent` overrides both).",
    )


@dataclass
class CacheSpec:
    """Where cached results live, and how much of them to keep."""

    max_size: str | int = option(
        "20GB",
        help="Size limit of the stage cache under the output folder (e.g. 5GB); past it, the least recently "
        "used stage outputs are removed after each run.",
    )
    shared_dir: str | None = option(
        None,
        help="Folder of the shared cache of LLM answers and embeddings (default: $CURATE_CACHE_DIR, else "
        "$XDG_CACHE_HOME/curate, else ~/.cache/curate).",
    )

    def check(self) -> None:
        try:
            parse_size(self.max_size)
        except CurateError as exc:
            raise ValueError(f"max_size: {exc.message}") from None


@dataclass
class EngineSpec:
    """Where the stages run (`curate run --engine` and `--address` override it). Every engine writes
    the same version, so it is not part of the version id."""

    name: Literal["local", "serial", "ray"] = option(
        "local",
        help="local: every core of this machine; serial: one process, one batch at a time (debugging); "
        "ray: a Ray cluster (pip install 'curate[ray]').",
    )
    address: str | None = option(
        None,
        help="ray: the cluster to join (host:port, or `auto` for the one this machine belongs to); "
        "default: a local cluster started for the run.",
    )
    generation_workers: int | None = option(
        None,
        help="ray: processes that send a generating stage's LLM requests, each with the stage's "
        "`concurrency` in flight (so at most workers x concurrency) and an even share of its rate "
        "limits; default: one per node.",
        minimum=1,
    )

    def check(self) -> None:
        if self.address and self.name != "ray":
            raise ValueError("address is for the ray engine", "set name: ray, or leave address out")
        if self.generation_workers is not None and self.name != "ray":
            raise ValueError(
                "generation_workers is for the ray engine", "set name: ray, or leave generation_workers out"
            )


@dataclass
class StageStep:
    """One stage of a recipe: its name, validated config and the options as written."""

    name: str
    config: Any
    options: dict

    @property
    def cls(self) -> type[Stage]:
        return STAGES[self.name]


@dataclass
class Recipe:
    """A checked recipe; paths in it resolve against `base_dir` (the recipe's folder)."""

    name: str
    inputs: list[InputSpec]
    stages: list[StageStep]
    eval_sets: list[dict] = field(default_factory=list)
    output_dir: Path | None = None
    parent: Path | None = None  # the version recorded as this one's parent (output.parent)
    seed: int = 0
    allow_eval_overlap: bool = False
    strict: bool = False
    cache: CacheSpec = field(default_factory=CacheSpec)
    engine: EngineSpec = field(default_factory=EngineSpec)
    base_dir: Path = Path(".")
    raw: dict = field(default_factory=dict)
    path: Path | None = None

    def stage_options(self, name: str) -> dict | None:
        return next((s.options for s in self.stages if s.name == name), None)

    @property
    def cache_max_bytes(self) -> int:
        return parse_size(self.cache.max_size) if self.cache.max_size is not None else DEFAULT_MAX_BYTES


def load_schema(name: str) -> dict:
    """One of the JSON Schemas shipped in curate/schemas (record, pipeline, manifest, train)."""
    return json.loads((SCHEMA_DIR / name).read_text())


def recipe_schema() -> dict:
    """The JSON Schema of a recipe, from the config classes (what `schemas/pipeline.schema.json` holds)."""
    stages = {}
    for name, cls in sorted(STAGES.items()):
        schema = config_schema(cls.Config, nullable=True)
        schema["description"] = " ".join((cls.__doc__ or "").split())
        stages[name] = schema
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "curate/pipeline.schema.json",
        "title": "curate pipeline recipe",
        "description": "Generated from curate's config classes by `python -m curate.recipe`; do not edit.",
        "type": "object",
        "required": ["inputs", "stages"],
        "additionalProperties": False,
        "properties": {
            "name": {
                "type": "string",
                "minLength": 1,
                "description": "Recipe name, shown in manifests and reports.",
            },
            "description": {"type": "string"},
            "seed": {
                "type": "integer",
                "minimum": 0,
                "description": "Seed for every random choice of every stage.",
            },
            "strict": {
                "type": "boolean",
                "description": "Fail the run when an input file yields no records or mostly unreadable rows "
                "(by default such files are only warned about).",
            },
            "allow_eval_overlap": {
                "type": "boolean",
                "description": "Write the version even if kept records hold an exact copy of an eval item.",
            },
            "inputs": {
                "type": "array",
                "minItems": 1,
                "description": "Input files, globs, folders or hf:NAME datasets.",
                "items": {"anyOf": [{"type": "string", "minLength": 1}, input_schema()]},
            },
            "eval_sets": {
                "type": "array",
                "description": "Frozen eval sets: never trained on; for decontaminate and the eval gates.",
                "items": eval_set_schema(),
            },
            "stages": {
                "type": "array",
                "description": "The stages, in order; each is {stage_name: {options}}.",
                "items": {
                    "type": "object",
                    "description": "Each stage is a list item of its own: `- dedup: {...}`.",
                    "minProperties": 1,
                    "maxProperties": 1,
                    "propertyNames": {"title": "stage", "enum": sorted(STAGES)},
                    "properties": stages,
                },
            },
            "output": config_schema(OutputSpec),
            "cache": config_schema(CacheSpec),
            "engine": {
                "description": "Where the stages run: an engine name, or {name, address}.",
                "anyOf": [{"enum": ["local", "serial", "ray"]}, config_schema(EngineSpec)],
            },
        },
    }


def load_recipe(path: str | Path) -> Recipe:
    """Read a YAML recipe and check all of it (shape, stage names, every option, files) before any run."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(
            f"recipe not found: {path}", hint="give the path of a pipeline YAML, e.g. pipelines/demo.yaml"
        )
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise RecipeError(
            f"{path}: not UTF-8 text (byte {exc.start})", hint="a recipe is a YAML file"
        ) from None
    except (yaml.YAMLError, RecursionError) as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise RecipeError(
            f"{path}: a recipe is a mapping with inputs and stages", hint="see pipelines/demo.yaml"
        )
    return recipe_from_dict(raw, base_dir=path.resolve().parent, path=path)


def recipe_from_dict(raw: dict, base_dir: Path, path: Path | None = None) -> Recipe:
    """A checked recipe from its parsed YAML; raises RecipeError with every issue found."""
    recipe, issues = check_recipe(raw, Path(base_dir), path)
    if issues:
        raise RecipeError(issues)
    return recipe


def check_recipe(raw: Any, base_dir: Path, path: Path | None = None) -> tuple[Recipe | None, list[Issue]]:
    """The recipe, or every issue that keeps `raw` from being one."""
    issues = schema_issues(recipe_schema(), raw)
    if issues:
        return None, issues + _plugin_issues(raw)
    inputs = []
    for i, entry in enumerate(raw["inputs"]):
        spec, found = InputSpec.parse(entry, f"inputs[{i}]")
        issues += found
        if spec is not None:
            inputs.append(spec)
            issues += _input_file_issues(spec, base_dir, f"inputs[{i}]")
    eval_sets = list(raw.get("eval_sets") or [])
    for i, entry in enumerate(eval_sets):
        spec, found = EvalSetSpec.parse(entry, f"eval_sets[{i}]")
        issues += found
        if spec is not None and not spec.path.startswith("hf:") and not (base_dir / spec.path).is_file():
            issues.append(
                Issue(
                    f"eval_sets[{i}].path",
                    f"no such file: {spec.path}",
                    "paths resolve against the recipe's folder",
                )
            )
    name = raw.get("name")
    if name is not None and (name.strip() in (".", "..") or "/" in name or "\\" in name):
        issues.append(
            Issue(
                "name",
                f"{name!r} is not a plain name",
                "the default output folder is runs/<name> beside the recipe, so a name holds no / or \\ "
                "and is not . or .. (set output.dir to write elsewhere)",
            )
        )
    names = [e["name"] for e in eval_sets]
    if len(set(names)) != len(names):
        issues.append(Issue("eval_sets", "names must be unique", f"got {names}"))
    steps = []
    for i, item in enumerate(raw["stages"]):
        ((name, options),) = item.items()
        config, found = make_config(STAGES[name].Config, options, f"stages[{i}].{name}")
        issues += found
        if config is not None and not found:
            steps.append(StageStep(name, config, dict(options or {})))
    cache, found = make_config(CacheSpec, raw.get("cache"), "cache")
    issues += found
    engine = raw.get("engine")
    engine, found = make_config(EngineSpec, {"name": engine} if isinstance(engine, str) else engine, "engine")
    issues += found
    out = (raw.get("output") or {}).get("dir")
    parent = (raw.get("output") or {}).get("parent")
    recipe = Recipe(
        name=raw.get("name") or (path.stem if path else "recipe"),
        inputs=inputs,
        stages=steps,
        eval_sets=eval_sets,
        output_dir=(base_dir / out).resolve() if out else None,
        parent=(base_dir / parent).resolve() if parent else None,
        seed=int(raw.get("seed", 0)),
        allow_eval_overlap=bool(raw.get("allow_eval_overlap", False)),
        strict=bool(raw.get("strict", False)),
        cache=cache or CacheSpec(),
        engine=engine or EngineSpec(),
        base_dir=base_dir,
        raw=raw,
        path=path,
    )
    if not issues:
        for i, step in enumerate(steps):
            where = f"stages[{i}].{step.name}"
            issues += [Issue(where, message) for message in step.cls.recipe_issues(step.config, recipe)]
    return (None if issues else recipe), issues


def _plugin_issues(raw: Any) -> list[Issue]:
    """Stages a recipe names that an installed package declares but that failed to load."""
    stages = raw.get("stages") if isinstance(raw, dict) else None
    found = []
    for i, item in enumerate(stages if isinstance(stages, list) else []):
        for name in item if isinstance(item, dict) else []:
            if name in PLUGIN_PROBLEMS:
                found.append(
                    Issue(
                        f"stages[{i}].{name}",
                        f"the stage {name!r} is installed but could not be loaded: {PLUGIN_PROBLEMS[name]}",
                        "fix or reinstall the package that declares it (entry point group curate.stages)",
                    )
                )
    return found


def _input_file_issues(spec: InputSpec, base_dir: Path, where: str) -> list[Issue]:
    """An input that names no files is refused before the run, as the run itself would."""
    try:
        input_files(spec, base_dir)
    except CurateError as exc:
        return [Issue(f"{where}.path", exc.message, exc.hint)]
    return []


def write_schema() -> None:
    json.dump(recipe_schema(), sys.stdout, indent=2)
    sys.stdout.write("\n")


__all__ = [
    "EngineSpec",
    "Recipe",
    "StageStep",
    "check_recipe",
    "key_path",
    "load_recipe",
    "recipe_from_dict",
    "recipe_schema",
]

if __name__ == "__main__":
    write_schema()
