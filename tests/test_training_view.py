"""What training will see, on real records of ../shared/data/raw: the view's trained tokens are the
trainer's own loss mask, the sequence-length cut is the trainer's, and a template that loses tool
calls (SmolLM2-135M-Instruct's own) is caught where chatml is not."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
from click.testing import CliRunner

from curate.cli import main
from curate.pipeline import run_recipe
from curate.recipe import recipe_from_dict
from curate.records import train_messages
from curate.train.data import IGNORE, encode
from curate.training_view import version_stats, view
from tests.test_first_use import smollm2_tokenizer

FILES = [
    "oasst_en_100_tree.jsonl.gz",
    "llamafactory_glaive_toolcall_en_demo.json.gz",
    "alpaca_seed_tasks.jsonl.gz",
]


@pytest.fixture(scope="module")
def tokenizer():
    return smollm2_tokenizer()


@pytest.fixture(scope="module")
def version(tmp_path_factory, shared_data) -> Path:
    tmp = tmp_path_factory.mktemp("view")
    raw = {
        "inputs": [{"path": str(shared_data / "raw" / f)} for f in FILES],
        "stages": [{"normalize": {}}, {"filter": {}}],
    }
    return run_recipe(recipe_from_dict(raw, tmp), tmp / "out").folder


def test_trained_tokens_are_the_trainers_mask(version, tokenizer):
    table = pl.read_parquet(version / "data.parquet", columns=["messages"]).sample(120, seed=1)
    for template in ("chatml", tokenizer):
        name = "chatml" if template == "chatml" else "smollm2"
        for messages in table["messages"].to_list():
            for max_len in (2048, 48):
                seen = view(messages, name, tokenizer, max_len)
                row = encode(train_messages(messages), tokenizer, template, max_len)
                assert seen["trained_tokens"] == sum(label != IGNORE for label in row["labels"])
                assert seen["cut"] == (seen["tokens"] > max_len)
                assert "".join(s["text"] for s in seen["segments"]) == seen["text"]


def test_every_assistant_turn_is_trained_and_nothing_else(version, tokenizer):
    table = pl.read_parquet(version / "data.parquet", columns=["messages"])
    multi = next(m for m in table["messages"].to_list() if sum(t["role"] == "assistant" for t in m) >= 2)
    seen = view(multi, "chatml", tokenizer, 100_000)
    trained = "".join(s["text"] for s in seen["segments"] if s["trained"])
    for turn in multi:
        if turn["role"] == "assistant":
            assert turn["content"] in trained
        elif turn["content"]:
            assert turn["content"] not in trained


def test_a_template_that_drops_tool_calls_is_caught(version, tokenizer):
    table = pl.read_parquet(version / "data.parquet", columns=["id", "messages"])
    with_calls = {
        rid for rid, messages in table.iter_rows() if any(m["tool_calls"] for m in messages)
    }  # fmt: skip
    assert len(with_calls) > 100
    smol = version_stats(version, "smollm2", tokenizer, 4096, sample=100_000)
    assert {p["id"] for p in smol["tool_call_problems"]} == with_calls  # its template ignores tool_calls
    chatml = version_stats(version, "chatml", tokenizer, 4096, sample=100_000)
    assert chatml["tool_call_problems"] == [] and chatml["records"] == table.height
    # a record trains on nothing only when the cut falls before its answer (one has a 6,293-character prompt)
    assert chatml["nothing_trained"] and set(chatml["nothing_trained"]) <= set(chatml["cut"])
    whole = version_stats(version, "chatml", tokenizer, 100_000, sample=100_000)
    assert whole["nothing_trained"] == [] == whole["cut"] and len(whole["trained"]) == table.height
    short = version_stats(version, "chatml", tokenizer, 32, sample=100_000)
    assert 0 < len(short["cut"]) < table.height


def test_cli_show_and_report_with_a_template(version, tmp_path):
    rid = pl.read_parquet(version / "data.parquet", columns=["id"])["id"][0]
    result = CliRunner().invoke(main, ["show", str(version), "--id", rid, "--template", "chatml", "--json"])
    assert result.exit_code == 0, result.output
    (seen,) = json.loads(result.output)
    assert seen["id"] == rid and any(s["trained"] for s in seen["segments"]) and seen["tokens"] is None
    bare = CliRunner().invoke(main, ["show", str(version), "--template", "chatml"])
    assert bare.exit_code == 1 and "--id" in bare.output
    page = tmp_path / "r.html"
    done = CliRunner().invoke(main, ["report", str(version), "--out", str(page), "--template", "chatml"])
    assert done.exit_code == 0, done.output
    assert "What training will see: chatml" in page.read_text()
