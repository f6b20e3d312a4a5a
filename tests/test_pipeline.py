"""The runner and versions: recipe errors, conservation, determinism, the stage cache, atomic writes."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
import yaml

from curate import versions
from curate.errors import CurateError, RecipeError
from curate.pipeline import run_recipe
from curate.recipe import load_recipe, recipe_from_dict

GOOD = [
    {"instruction": "Name a primary colour.", "input": "", "output": "Red is a primary colour."},
    {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour."},
    {
        "instruction": "Name a primary colour.",
        "input": "",
        "output": "Red is a primary colour.",
    },  # exact copy
    {"instruction": "Say something.", "input": "", "output": "As an AI language model, I cannot."},  # refusal
    {"instruction": "Empty answer here.", "input": "", "output": "   "},  # empty turn
]


def _run(recipe, out: Path, **kwargs) -> tuple[Path, dict]:
    result = run_recipe(recipe, out, **kwargs)
    return result.folder, result.manifest


def write_inputs(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r) for r in GOOD]
    lines.insert(2, '{"instruction": "broken", "output": ')  # line 3 is not JSON
    (folder / "alpaca.jsonl").write_text("\n".join(lines) + "\n")
    chats = [
        {"messages": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]}
    ]
    (folder / "chats.jsonl").write_text("\n".join(json.dumps(c) for c in chats) + "\n")


def write_recipe(folder: Path, stages: list | None = None, **extra) -> Path:
    recipe = {
        "name": "t",
        "inputs": [{"path": "data/alpaca.jsonl"}, {"path": "data/chats.jsonl"}],
        "stages": stages
        if stages is not None
        else [{"normalize": {"system_prompt": "Be brief."}}, {"filter": {}}],
        **extra,
    }
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.fixture
def project(tmp_path: Path) -> Path:
    write_inputs(tmp_path / "data")
    return tmp_path


def test_run_writes_a_version_that_adds_up(project: Path):
    folder, manifest = _run(load_recipe(write_recipe(project)), project / "out")
    assert folder.parent == project / "out" and (project / "out" / "latest").resolve() == folder
    c = manifest["counts"]
    assert c == {"input": 7, "kept": 4, "dropped": 2, "quarantined": 1, "synthetic": 0}
    assert c["input"] == c["kept"] + c["dropped"] + c["quarantined"] - c["synthetic"]
    for s in manifest["stages"]:
        assert s["in"] == s["out"] + sum(s["dropped"].values()) - s["added"]
    assert manifest["stages"][1]["dropped"] == {"empty_turn": 1, "refusal": 1}
    assert [i["path"] for i in manifest["inputs"]] == ["data/alpaca.jsonl", "data/chats.jsonl"]
    assert all(len(i["sha256"]) == 64 for i in manifest["inputs"])
    quarantine = [json.loads(x) for x in (folder / "quarantine.jsonl").read_text().splitlines()]
    assert [(q["file"], q["line"]) for q in quarantine] == [("data/alpaca.jsonl", 3)]
    dropped = pl.read_parquet(folder / "dropped.parquet")
    assert sorted(dropped["reason"]) == ["empty_turn", "refusal"]
    assert (
        json.loads(dropped.filter(pl.col("reason") == "refusal")["evidence"][0])["match"]
        == "As an AI language model"
    )


def test_train_jsonl_loads_with_datasets(project: Path):
    from datasets import load_dataset

    folder, _ = _run(load_recipe(write_recipe(project)), project / "out")
    rows = load_dataset("json", data_files=str(folder / "train.jsonl"), split="train")
    assert len(rows) == 4
    for row in rows:
        roles = [m["role"] for m in row["messages"]]
        assert roles[0] == "system" and roles[-1] == "assistant"
        assert all(isinstance(m["content"], str) and m["content"] for m in row["messages"])
    assert rows[0]["messages"][1]["content"] == "Name a primary colour."


def test_same_recipe_same_version_and_bytes_and_cache(project: Path):
    recipe = write_recipe(project)
    first = run_recipe(load_recipe(recipe), project / "a")
    again = run_recipe(load_recipe(recipe), project / "a")
    cold = run_recipe(load_recipe(recipe), project / "b")
    assert first.manifest["version"] == again.manifest["version"] == cold.manifest["version"]
    assert [s["cached"] for s in first.run["stages"]] == [False, False]
    assert [s["cached"] for s in again.run["stages"]] == [True, True]
    # the re-run names the run that computed each stage: the first one
    assert [s["run"] for s in again.run["stages"]] == [first.run["id"]] * 2 != [again.run["id"]] * 2
    assert (first.run["new"], again.run["new"], cold.run["new"]) == (True, False, True)
    for name in ("data.parquet", "train.jsonl", "dropped.parquet", "edits.parquet", "quarantine.jsonl"):
        assert (first.folder / name).read_bytes() == (cold.folder / name).read_bytes(), name


def test_a_cached_rerun_leaves_the_version_untouched(project: Path):
    recipe = load_recipe(write_recipe(project))
    first = run_recipe(recipe, project / "out")
    files = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in first.folder.iterdir()}
    again = run_recipe(recipe, project / "out")
    assert again.folder == first.folder and not again.run["new"]
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in again.folder.iterdir()} == files
    assert again.manifest == first.manifest  # the manifest too: it tells how the version was made


def test_changing_a_late_stage_reuses_the_early_ones(project: Path):
    run_recipe(load_recipe(write_recipe(project)), project / "out")
    changed = write_recipe(
        project, [{"normalize": {"system_prompt": "Be brief."}}, {"filter": {"min_chars": 25}}]
    )
    folder, manifest = _run(load_recipe(changed), project / "out")
    assert [s["cached"] for s in manifest["stages"]] == [True, False]
    assert manifest["stages"][1]["dropped"]["too_short"] == 1
    assert manifest["parent"] is not None and manifest["parent"] != manifest["version"]


def test_a_crash_while_writing_leaves_no_half_version(project: Path, monkeypatch):
    recipe = load_recipe(write_recipe(project))
    good, _ = _run(recipe, project / "out")
    changed = load_recipe(write_recipe(project, [{"normalize": {}}]))

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(versions, "_write_train_jsonl", boom)  # data.parquet is written by then
    with pytest.raises(OSError, match="disk full"):
        run_recipe(changed, project / "out")
    entries = sorted(p.name for p in (project / "out").iterdir() if p.name not in (".cache", ".lock"))
    assert entries == sorted([good.name, "latest"])
    assert versions.resolve_version(project / "out") == good


@pytest.mark.parametrize(
    ("raw", "message", "hint"),
    [
        (
            {"inputs": [{"path": "x"}], "stages": [], "stagse": []},
            "recipe: unknown key 'stagse'",
            "did you mean 'stages'?",
        ),
        ({"stages": []}, "inputs: required", "Input files, globs"),
        (
            {"inputs": [{"path": "x"}], "stages": [{"filtre": {}}]},
            "stages[0]: unknown stage 'filtre'",
            "filter",
        ),
        (
            {"inputs": [{"path": "x"}], "stages": [{"normalize": {}, "filter": {}}]},
            "stages[0]: one key per item, got normalize, filter",
            "a list item of its own",
        ),
        (
            {"inputs": [{"path": "x"}], "stages": [{"filter": {"min_chars": -1.5}}]},
            "stages[0].filter.min_chars",
            "",
        ),
        ({"inputs": [{"pth": "x"}], "stages": []}, "inputs[0]", ""),
    ],
)
def test_recipe_errors_point_at_the_key(raw, message, hint, tmp_path):
    with pytest.raises(RecipeError) as exc:
        recipe_from_dict(raw, base_dir=tmp_path)
    assert message in exc.value.message
    assert hint in exc.value.hint


def test_missing_input_is_a_clear_error_before_any_run(tmp_path: Path):
    with pytest.raises(CurateError, match="the pattern matched nothing") as exc:
        recipe_from_dict({"inputs": [{"path": "nope/*.jsonl"}], "stages": []}, base_dir=tmp_path)
    assert exc.value.issues[0].where == "inputs[0].path"


def test_manifest_and_records_match_their_schemas(project: Path):
    import jsonschema

    from curate.recipe import load_schema

    folder, manifest = _run(load_recipe(write_recipe(project)), project / "out")
    jsonschema.validate(manifest, load_schema("manifest.schema.json"))
    record_schema = load_schema("record.schema.json")
    for record in pl.read_parquet(folder / "data.parquet").to_dicts():
        jsonschema.validate(record, record_schema)


def test_a_changed_eval_file_invalidates_the_cached_decontamination(project: Path):
    evals = project / "eval.jsonl"
    evals.write_text(
        json.dumps({"id": "e1", "question": "What is the capital of Peru?", "answer": "Lima"}) + "\n"
    )
    stages = [{"normalize": {}}, {"decontaminate": {"methods": ["exact"]}}]
    recipe = write_recipe(project, stages, eval_sets=[{"name": "ev", "path": "eval.jsonl"}])
    _, first = _run(load_recipe(recipe), project / "out")
    assert first["stages"][1]["dropped"] == {}
    evals.write_text(json.dumps({"id": "e1", "question": "Name a primary colour.", "answer": "Red"}) + "\n")
    _, second = _run(load_recipe(recipe), project / "out")
    assert [s["cached"] for s in second["stages"]] == [True, False]
    assert second["stages"][1]["dropped"] == {"eval_overlap": 2}  # the record and its exact copy


def test_a_saved_hugging_face_dataset_folder_is_an_input(tmp_path: Path):
    from datasets import Dataset

    rows = [{"instruction": f"Say {w}.", "input": "", "output": w} for w in ("yes", "no", "maybe")]
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    recipe = recipe_from_dict({"inputs": [{"path": "saved"}], "stages": [{"filter": {}}]}, base_dir=tmp_path)
    folder, manifest = _run(recipe, tmp_path / "out")
    assert manifest["counts"]["kept"] == 3
    assert [(i["path"], i["records"], i["sha256"]) for i in manifest["inputs"]] == [("saved", 3, None)]
    again = run_recipe(recipe, tmp_path / "out")
    assert again.manifest["version"] == manifest["version"] and again.run["stages"][0]["cached"]


def test_tool_calls_and_definitions_reach_train_jsonl(shared_data: Path, tmp_path: Path):
    from datasets import load_dataset

    recipe = recipe_from_dict(
        {
            "inputs": [{"path": "raw/llamafactory_glaive_toolcall_en_demo.json.gz"}],
            "stages": [{"normalize": {}}],
        },
        base_dir=shared_data,
    )
    folder, manifest = _run(recipe, tmp_path / "out")
    rows = load_dataset("json", data_files=str(folder / "train.jsonl"), split="train")
    assert len(rows) == manifest["counts"]["kept"] == 300
    first = rows[0]
    # definitions as one JSON text of OpenAI function entries (TRL parses it back)
    tools = json.loads(first["tools"])
    assert tools[0]["type"] == "function" and tools[0]["function"]["name"] == "search_recipes"
    assert tools[0]["function"]["parameters"]["required"] == ["ingredients"]
    call = next(m for m in first["messages"] if m.get("tool_calls"))
    assert call["role"] == "assistant" and call["tool_calls"][0]["function"]["name"] == "search_recipes"
    # the OpenAI wire format: arguments are JSON text
    assert json.loads(call["tool_calls"][0]["function"]["arguments"]) == {
        "ingredients": ["chicken", "bell peppers", "rice"]
    }
    assert any(m["role"] == "tool" and m["name"] == "search_recipes" for m in first["messages"])
