"""Recipes have one source of truth: the committed JSON Schema is generated from the config classes,
and the editor schema, `curate validate` and `curate run` accept and refuse the same recipes."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml
from click.testing import CliRunner

from curate.cli import main
from curate.errors import RecipeError
from curate.pipeline import run_recipe
from curate.recipe import SCHEMA_DIR, load_recipe, recipe_schema
from tests.test_pipeline import write_inputs

GOOD = {
    "name": "r",
    "inputs": [{"path": "data/alpaca.jsonl"}],
    "eval_sets": [{"name": "ev", "path": "eval.jsonl"}],
    "stages": [{"normalize": {}}, {"filter": {}}, {"dedup": {"minhash": {"threshold": 0.9}}}],
}

# (what is wrong, the recipe, the key the issue names, whether a schema alone can tell)
BAD = [
    ("a misspelt top-level key", {**GOOD, "stagse": []}, "recipe", True),
    ("no inputs", {k: v for k, v in GOOD.items() if k != "inputs"}, "inputs", True),
    ("an unknown stage", {**GOOD, "stages": [{"normalise": {}}]}, "stages[0]", True),
    ("two stages in one item", {**GOOD, "stages": [{"normalize": {}, "filter": {}}]}, "stages[0]", True),
    ("an unknown option", {**GOOD, "stages": [{"filter": {"min_char": 3}}]}, "stages[0].filter", True),
    (
        "a wrong type",
        {**GOOD, "stages": [{"filter": {"min_chars": "ten"}}]},
        "stages[0].filter.min_chars",
        True,
    ),
    (
        "a nested option out of range",
        {**GOOD, "stages": [{"dedup": {"minhash": {"threshold": 1.5}}}]},
        "stages[0].dedup.minhash.threshold",
        True,
    ),
    (
        "an unknown format",
        {**GOOD, "inputs": [{"path": "data/alpaca.jsonl", "format": "alpacca"}]},
        "inputs[0].format",
        True,
    ),
    (
        "a fields part",
        {**GOOD, "inputs": [{"path": "data/alpaca.jsonl", "fields": {"usr": "q"}}]},
        "inputs[0].fields",
        True,
    ),
    ("an eval set without a path", {**GOOD, "eval_sets": [{"name": "ev"}]}, "eval_sets[0].path", True),
    ("a bad cache size", {**GOOD, "cache": {"max_size": "lots"}}, "cache", False),
    (
        "options that contradict",
        {**GOOD, "stages": [{"filter": {"min_chars": 10, "max_chars": 5}}]},
        "stages[0].filter",
        False,
    ),
    ("an input that matches nothing", {**GOOD, "inputs": [{"path": "data/*.csv"}]}, "inputs[0].path", False),
    (
        "a missing eval set file",
        {**GOOD, "eval_sets": [{"name": "ev", "path": "nope.jsonl"}]},
        "eval_sets[0].path",
        False,
    ),
    (
        "decontaminate without eval sets",
        {**GOOD, "eval_sets": [], "stages": [{"decontaminate": {}}]},
        "stages[0].decontaminate",
        False,
    ),
    (
        "an eval set name nobody declared",
        {**GOOD, "stages": [{"decontaminate": {"eval_sets": ["gsm8k"]}}]},
        "stages[0].decontaminate",
        False,
    ),
    (
        "a reference that is not there",
        {**GOOD, "stages": [{"dedup": {"reference": "runs/x"}}]},
        "stages[0].dedup",
        False,
    ),
    (
        "a duplicate eval set name",
        {**GOOD, "eval_sets": [{"name": "ev", "path": "eval.jsonl"}] * 2},
        "eval_sets",
        False,
    ),
]


@pytest.fixture
def project(tmp_path: Path) -> Path:
    write_inputs(tmp_path / "data")
    (tmp_path / "eval.jsonl").write_text(json.dumps({"question": "What is the capital of Peru?"}) + "\n")
    return tmp_path


def test_the_committed_schema_is_the_generated_one():
    committed = json.loads((SCHEMA_DIR / "pipeline.schema.json").read_text())
    assert committed == recipe_schema(), "run: python -m curate.recipe > schemas/pipeline.schema.json"


@pytest.mark.parametrize(("what", "raw", "where", "schema_tells"), BAD, ids=[b[0] for b in BAD])
def test_validate_and_run_refuse_the_same_recipes(project: Path, what, raw, where, schema_tells):
    path = project / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    validated = CliRunner().invoke(main, ["validate", str(path), "--json"])
    assert validated.exit_code == 1, validated.output
    problems = json.loads(validated.output)["problems"]
    assert where in [p["where"] for p in problems]
    ran = CliRunner().invoke(main, ["run", str(path), "--out", str(project / "out")])
    assert ran.exit_code == 1 and "Traceback" not in ran.output
    assert where in ran.output
    assert not (project / "out").exists()  # refused before anything ran
    schema_errors = list(
        jsonschema.Draft202012Validator(
            json.loads((SCHEMA_DIR / "pipeline.schema.json").read_text())
        ).iter_errors(raw)
    )
    assert bool(schema_errors) == schema_tells


def test_the_good_recipe_passes_all_three(project: Path):
    path = project / "recipe.yaml"
    path.write_text(yaml.safe_dump(GOOD))
    jsonschema.validate(GOOD, json.loads((SCHEMA_DIR / "pipeline.schema.json").read_text()))
    assert CliRunner().invoke(main, ["validate", str(path)]).exit_code == 0
    assert (
        CliRunner().invoke(main, ["run", str(path), "--out", str(project / "out"), "--json"]).exit_code == 0
    )


def test_every_error_is_reported_at_once(project: Path):
    raw = {
        **GOOD,
        "stages": [
            {"filter": {"min_chars": "ten", "refusal_patern": []}},
            {"dedup": {"minhash": {"threshold": 2}}},
            {"normalise": {}},
        ],
    }
    path = project / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(RecipeError) as exc:
        load_recipe(path)
    issues = {(i.where, i.message, i.hint) for i in exc.value.issues}
    assert issues == {
        ("stages[0].filter", "unknown option 'refusal_patern'", "did you mean 'refusal_patterns'?"),
        (
            "stages[0].filter.min_chars",
            "expected integer, got 'ten'",
            "Minimum characters of the whole conversation (system turns excluded).",
        ),
        (
            "stages[1].dedup.minhash.threshold",
            "2 is greater than the maximum of 1.0",
            "Jaccard similarity of shingle sets at or above which records are near-duplicates.",
        ),
        ("stages[2]", "unknown stage 'normalise'", "did you mean 'normalize'?"),
    }
    output = CliRunner().invoke(main, ["validate", str(path)]).output
    assert "4 problems in the recipe" in output and output.count("hint:") == 4


def test_a_list_of_keys_joins_them_into_one_turn(project: Path):
    """docs/formats.md: `fields: {user: [question, context]}` makes one user turn of both keys."""
    rows = [{"question": "Summarise this.", "context": "Cats sleep a lot.", "answer": "Cats sleep."}]
    (project / "data" / "qa.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    raw = {
        "inputs": [
            {"path": "data/qa.jsonl", "fields": {"user": ["question", "context"], "assistant": "answer"}}
        ],
        "stages": [],
    }
    path = project / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    jsonschema.validate(raw, json.loads((SCHEMA_DIR / "pipeline.schema.json").read_text()))
    result = run_recipe(load_recipe(path), project / "out")
    line = json.loads((result.folder / "train.jsonl").read_text())
    assert line["messages"] == [
        {"role": "user", "content": "Summarise this.\n\nCats sleep a lot.", "tool_calls": None, "name": None},
        {"role": "assistant", "content": "Cats sleep.", "tool_calls": None, "name": None},
    ]
