"""The command line: exit codes, --json output, friendly errors, and `show` explaining a drop."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from curate.cli import main
from tests.test_pipeline import write_inputs, write_recipe


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_stages_lists_every_option_with_defaults():
    result = invoke("stages", "--json")
    assert result.exit_code == 0
    info = json.loads(result.output)
    assert {"normalize", "filter"} <= set(info)
    options = {o["name"]: o for o in info["filter"]["options"]}
    assert options["min_assistant_chars"]["default"] == 1
    assert options["drop_refusals"]["help"]
    assert "normalize" in invoke("stages", "normalize").output


def test_run_json_show_and_explain_a_drop(tmp_path: Path):
    write_inputs(tmp_path / "data")
    recipe = write_recipe(tmp_path)
    result = invoke("run", str(recipe), "--out", str(tmp_path / "out"), "--json")
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.output)
    assert manifest["counts"]["kept"] == 4
    summary = invoke("show", str(tmp_path / "out"))
    assert manifest["version"] in summary.output and "filter" in summary.output
    import polars as pl

    dropped = pl.read_parquet(Path(manifest["path"]) / "dropped.parquet")
    refusal_id = dropped.filter(pl.col("reason") == "refusal")["id"][0]
    explained = json.loads(invoke("show", str(tmp_path / "out"), "--id", refusal_id, "--json").output)
    assert explained["dropped"][0]["stage"] == "filter"
    assert explained["dropped"][0]["evidence"]["match"] == "As an AI language model"
    data = pl.read_parquet(Path(manifest["path"]) / "data.parquet")
    chat_id = data.filter(pl.col("source").struct.field("path") == "data/chats.jsonl")["id"][0]
    kept = json.loads(invoke("show", str(tmp_path / "out"), "--id", chat_id, "--json").output)
    assert kept["kept"][0]["source"]["row"] == 1
    assert [(e["path"], e["row"], e["change"]) for e in kept["edits"]] == [
        ("data/chats.jsonl", 1, "system prompt set")
    ]
    # an exact copy shares the content id: show lists both, each with its own source
    twins = json.loads(invoke("show", str(tmp_path / "out"), "--id", data["id"][0], "--json").output)
    assert [r["source"]["row"] for r in twins["kept"]] == [1, 4]
    by_source = json.loads(
        invoke("show", str(tmp_path / "out"), "--source", "alpaca.jsonl:2", "--json").output
    )
    assert by_source["kept"][0]["messages"][1]["content"] == "Translate to French.\n\nGood morning"


def test_errors_are_friendly(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("inputs: [{path: x}]\nstages: [{normalise: {}}]\n")
    result = CliRunner().invoke(main, ["validate", str(bad)])
    assert result.exit_code == 1
    assert "unknown stage 'normalise'" in result.output and "hint" in result.output
    assert "Traceback" not in result.output
    missing = CliRunner().invoke(main, ["show", str(tmp_path)])
    assert missing.exit_code == 1 and "is not a dataset version" in missing.output


def test_formats_reports_counts_without_running(tmp_path: Path):
    write_inputs(tmp_path / "data")
    recipe = write_recipe(tmp_path)
    rows = json.loads(invoke("formats", str(recipe), "--json").output)
    assert [(r["path"], r["records"], r["quarantined"]) for r in rows] == [
        ("data/alpaca.jsonl", 5, 1),
        ("data/chats.jsonl", 1, 0),
    ]


def test_decontam_report_on_the_demo(demo_out: Path):
    report = json.loads(invoke("decontam-report", str(demo_out), "--json").output)
    (demo_eval,) = report["eval_sets"]
    assert (demo_eval["name"], demo_eval["items"], demo_eval["items_found"]) == ("demo_eval", 25, 1)
    assert demo_eval["by_method"]["exact"] == 1 and demo_eval["by_method"]["ngram"] == 1


def test_train_overrides_are_typed():
    from curate.cli import _overrides

    assert _overrides(("max_steps=20", "lora.r=8", "packing=true", "lr=2e-4")) == {
        "max_steps": 20,
        "lora.r": 8,
        "packing": True,
        "lr": 2e-4,
    }


def test_stages_lists_nested_options():
    info = json.loads(invoke("stages", "dedup", "--json").output)
    names = [o["name"] for o in info["dedup"]["options"]]
    assert {"minhash", "minhash.threshold", "minhash.num_perm"} <= set(names)
