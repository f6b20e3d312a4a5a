"""`curate diff` on real versions of ../shared/data/raw: counts that agree with both manifests, every
removed record explained by the stage that dropped it, and a normalize change seen as "changed"."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
from click.testing import CliRunner

from curate.cli import main
from curate.pipeline import run_recipe
from curate.recipe import recipe_from_dict
from curate.report.diff import NOT_DROPPED, diff_versions


def run(out: Path, stages: list[dict], shared: Path) -> Path:
    raw = {"inputs": [{"path": str(shared / "raw")}], "stages": stages}
    return run_recipe(recipe_from_dict(raw, out.parent), out).folder


def dedup(threshold: float) -> list[dict]:
    return [{"normalize": {}}, {"dedup": {"exact": True, "minhash": {"threshold": threshold}}}]


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    """One output folder for every version of raw/ here: a run takes the steps it shares with an
    earlier one (reading raw/, normalize) from the folder's stage cache, as a user's runs do."""
    return tmp_path_factory.mktemp("diff") / "out"


@pytest.fixture(scope="module")
def versions(out, shared_data) -> dict[str, Path]:
    return {"loose": run(out, dedup(0.9), shared_data), "strict": run(out, dedup(0.8), shared_data)}


def manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def test_counts_agree_with_both_manifests_and_every_removal_is_explained(versions):
    loose, strict = manifest(versions["loose"]), manifest(versions["strict"])
    report = diff_versions(versions["loose"], versions["strict"], sample=5)
    counts = report["counts"]
    assert report["a"]["records"] == loose["counts"]["kept"]
    assert report["b"]["records"] == strict["counts"]["kept"]
    assert counts["kept"] + counts["removed"] + counts["changed"] == loose["counts"]["kept"]
    assert counts["kept"] + counts["added"] + counts["changed"] == strict["counts"]["kept"]
    assert counts["changed"] == 0  # same normalize: no source row changes content
    # 0.8 merges more: the near-duplicate drops grow by exactly what the diff removes net
    near = [
        next(s for s in m["stages"] if s["name"] == "dedup")["dropped"].get("near_duplicate", 0)
        for m in (loose, strict)
    ]
    assert counts["removed"] > 1000 and counts["removed"] - counts["added"] == near[1] - near[0]
    # every removed record is among B's drops, by dedup, with the record it duplicates
    assert sum(r["records"] for r in report["removed_by"]) == counts["removed"]
    assert {(r["stage"], r["reason"]) for r in report["removed_by"]} == {("dedup", "near_duplicate")}
    assert all(r["reason"] != NOT_DROPPED for r in report["added_by"])
    for sample in report["samples"]["removed"]:
        assert sample["stage"] == "dedup" and sample["evidence"]["duplicate_of"] and sample["text"]
    stages = {s["name"]: s for s in report["stages"]}
    assert stages["dedup"]["out"] == [loose["counts"]["kept"], strict["counts"]["kept"]]
    assert report["recipe_changes"] == [{"key": "stages[1].dedup.minhash.threshold", "a": 0.9, "b": 0.8}]
    # languages of a 10,000-record sample of each: mostly English, and the Chinese alpaca demo's share
    languages = report["distributions"]["language"]
    assert languages["en"][0] > 0.85 and languages["en"][1] > 0.85
    assert 0.005 < languages["zh"][0] < 0.05 and 0.005 < languages["zh"][1] < 0.05
    assert loose["languages"]["sample"] == 10_000


def test_a_normalize_change_shows_as_changed_records(out, shared_data):
    # a system prompt no raw record has: every record's content, and so its id, changes
    plain = run(out, [{"normalize": {}}], shared_data)
    prompt = {"system_prompt": "You answer for the curate diff test.", "system_prompt_mode": "replace"}
    prompted = run(out, [{"normalize": prompt}], shared_data)
    records = manifest(plain)["counts"]["kept"]
    assert manifest(prompted)["counts"]["kept"] == records == 85_669
    report = diff_versions(plain, prompted, sample=2)
    assert report["counts"] == {"kept": 0, "removed": 0, "added": 0, "changed": records}
    change = report["samples"]["changed"][0]
    assert change["text_a"] == change["text_b"]  # the same user turn; the system prompt differs
    # ids stay (they name the conversation as cleaned, before the prompt); the content does not
    tables = [pl.read_parquet(f / "data.parquet", columns=["id", "messages"]) for f in (plain, prompted)]
    assert tables[0]["id"].sort().equals(tables[1]["id"].sort())
    first = tables[1]["messages"].list.first().struct.field("content")
    assert (first == prompt["system_prompt"]).all()
    assert report["recipe_changes"] == [
        {"key": "stages[0].normalize.system_prompt", "a": None, "b": prompt["system_prompt"]},
        {"key": "stages[0].normalize.system_prompt_mode", "a": None, "b": "replace"},
    ]


def test_copies_count(tmp_path):
    """Exact copies share an id: a copy gone from B is removed even though its id survives."""
    rows = ['{"instruction": "Say hi", "output": "hi"}', '{"instruction": "Say bye", "output": "bye"}']
    (tmp_path / "a.jsonl").write_text("\n".join([rows[0], rows[0], rows[1]]) + "\n")
    (tmp_path / "b.jsonl").write_text("\n".join([rows[0], rows[1]]) + "\n")
    folders = []
    for name in ("a", "b"):
        raw = {"inputs": [{"path": f"{name}.jsonl"}], "stages": [{"normalize": {}}]}
        folders.append(run_recipe(recipe_from_dict(raw, tmp_path), tmp_path / f"out-{name}").folder)
    report = diff_versions(*folders)
    assert report["counts"] == {"kept": 2, "removed": 1, "added": 0, "changed": 0}
    assert report["removed_by"] == [{"stage": "-", "reason": NOT_DROPPED, "records": 1}]


def test_cli_prints_tables_at_80_columns_and_json(versions):
    result = CliRunner().invoke(
        main, ["diff", str(versions["loose"]), str(versions["strict"])], env={"COLUMNS": "80"}
    )
    assert result.exit_code == 0, result.output
    assert "removed: what dropped them in B" in result.output and "near_duplicate" in result.output
    assert max(len(line) for line in result.output.splitlines()) <= 80
    as_json = CliRunner().invoke(main, ["diff", str(versions["loose"]), str(versions["strict"]), "--json"])
    assert json.loads(as_json.output)["counts"]["removed"] > 1000
    missing = CliRunner().invoke(main, ["diff", str(versions["loose"]), str(versions["loose"].parent.parent)])
    assert missing.exit_code == 1 and "Traceback" not in missing.output


def test_token_lengths_with_a_tokenizer(tmp_path):
    from tests.test_first_use import smollm2_tokenizer

    tokenizer = smollm2_tokenizer()
    tokenizer.save_pretrained(tmp_path / "tok")
    rows = [{"instruction": f"Count to {n} in words.", "output": " ".join(["one"] * n)} for n in (1, 5, 40)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    raw = {"inputs": [{"path": "a.jsonl"}], "stages": [{"normalize": {}}]}
    folder = run_recipe(recipe_from_dict(raw, tmp_path), tmp_path / "out").folder
    report = diff_versions(folder, folder, tokenizer=str(tmp_path / "tok"))
    texts = [
        "\n".join(m["content"] for m in messages)
        for messages in pl.read_parquet(folder / "data.parquet")["messages"].to_list()
    ]
    counts = sorted(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
    tokens = report["distributions"]["tokens"]
    assert tokens["max"] == [counts[-1]] * 2 and tokens["p50"] == [counts[1]] * 2
    assert tokens["mean"] == [round(sum(counts) / 3, 1)] * 2
    assert "tokens" not in diff_versions(folder, folder)["distributions"]
