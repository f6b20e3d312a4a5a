"""Lineage: the parent a user names (`--parent`, the recipe's output.parent) or the folder's latest,
and `curate log` listing versions with what changed against their parent."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from curate.cli import main

ROWS = [
    {"instruction": "Name a prime number above 10.", "output": "11"},
    {"instruction": "Name a prime number above 10!", "output": "11"},
    {"instruction": "What is the capital of France?", "output": "Paris"},
    {"instruction": "Translate 'cat' into German.", "output": "Katze"},
]


def write_recipe(folder: Path, threshold: float, **output) -> Path:
    (folder / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    recipe = {
        "name": "lineage",
        "inputs": [{"path": "rows.jsonl"}],
        "stages": [{"normalize": {}}, {"dedup": {"exact": True, "minhash": {"threshold": threshold}}}],
        "output": {"dir": "out", **output},
    }
    path = folder / f"recipe-{threshold}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def run(*args: str) -> dict:
    result = CliRunner().invoke(main, ["run", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_parent_is_the_latest_unless_named(tmp_path: Path):
    first = run(str(write_recipe(tmp_path, 0.9)))
    assert first["parent"] is None and first["parent_from"] is None
    second = run(str(write_recipe(tmp_path, 0.5)))
    assert second["version"] != first["version"]
    assert (second["parent"], second["parent_from"]) == (first["version"], "latest")
    assert second["parent_path"] == str((tmp_path / "out" / first["version"]).resolve())

    # elsewhere, with the parent named on the command line and in the recipe
    other = tmp_path / "other"
    other.mkdir()
    named = run(str(write_recipe(other, 0.9)), "--parent", str(tmp_path / "out" / second["version"]))
    assert (named["parent"], named["parent_from"]) == (second["version"], "--parent")
    in_recipe = run(str(write_recipe(other, 0.7, parent="../out")))  # the first folder's latest
    assert (in_recipe["parent"], in_recipe["parent_from"]) == (second["version"], "recipe")


def test_a_missing_parent_is_a_clear_error(tmp_path: Path):
    result = CliRunner().invoke(main, ["run", str(write_recipe(tmp_path, 0.9, parent="nowhere"))])
    assert result.exit_code == 1 and "parent" in result.output and "Traceback" not in result.output


def test_log_lists_versions_with_parents_and_what_changed(tmp_path: Path):
    first = run(str(write_recipe(tmp_path, 0.9)))
    second = run(str(write_recipe(tmp_path, 0.5)))
    result = CliRunner().invoke(main, ["log", str(tmp_path / "out"), "--json"])
    entries = json.loads(result.output)
    assert [e["version"] for e in entries] == [first["version"], second["version"]]
    assert [e["latest"] for e in entries] == [False, True]
    assert entries[0]["summary"] == f"first version: {first['counts']['kept']} kept of 4"
    delta = second["counts"]["kept"] - first["counts"]["kept"]
    assert entries[1]["summary"] == f"{delta:+,} kept; stages[1].dedup.minhash.threshold 0.9 -> 0.5"
    table = CliRunner().invoke(main, ["log", str(tmp_path / "out")], env={"COLUMNS": "80"})
    assert table.exit_code == 0 and f"*{second['version']}" in table.output
    assert max(len(line) for line in table.output.splitlines()) <= 80


@pytest.mark.parametrize("args", [["log", "."], ["diff", ".", "."]])
def test_commands_refuse_a_folder_without_versions(tmp_path: Path, args, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and "Traceback" not in result.output
