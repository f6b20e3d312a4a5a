"""Generating stages end to end: evol, respond and blend in real runs over ../shared/data/raw, through
the real openai and anthropic SDKs against a local server (tests/llm_server.py): elimination, lineage,
the request cache across runs and kills, budgets, the estimate, the real-data share, and the key."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from curate.cli import main
from curate.errors import CurateError, RecipeError
from curate.pipeline import run_recipe
from curate.recipe import load_recipe
from curate.stages.evol import OPERATIONS
from curate.synthetic import fill, template
from tests.conftest import REPO
from tests.llm_server import FakeLLM

KEY = "sk-curate-FAKE-evol-7c1e9f3a"
RAW = "raw/llamafactory_alpaca_en_demo.json.gz"  # 999 Alpaca records
APOLOGY = "I'm sorry, but I cannot help with that."


def _text(body: dict) -> str:
    content = body["messages"][-1]["content"]
    return content if isinstance(content, str) else "".join(b.get("text", "") for b in content)


def _h(text: str) -> int:
    return int(hashlib.md5(text.encode()).hexdigest(), 16)


def responder(body: dict, api: str) -> str:
    """An evolver, judge and answerer whose failures are planted by a hash of the prompt."""
    text = _text(body)
    h = _h(text)
    if text.startswith("Compare two instructions"):
        return "Same" if h % 6 == 0 else "Different"
    if "<<<" in text:
        instruction = text.split("<<<")[1].split(">>>")[0].strip()
        if h % 9 == 0:
            return "Rewritten instruction: " + instruction
        if h % 9 == 1:
            return "the of and ?"
        return f"{instruction} Answer in exactly {h % 5 + 2} numbered steps."
    if h % 8 == 0:
        return APOLOGY
    return "Here is a careful answer. " + " ".join(f"point{i}" for i in range(h % 20 + 5))


def write_recipe(folder: Path, stages: list[dict], inputs: list[dict], **top) -> Path:
    recipe = {"name": "gen", "inputs": inputs, "stages": stages, "output": {"dir": "out"}, **top}
    path = folder / "recipe.yaml"
    path.write_text(json.dumps(recipe))
    return path


def llm(server: FakeLLM, provider: str = "openai", **options) -> dict:
    url = server.url + "/v1" if provider == "openai" else server.url
    return {
        "provider": provider,
        "model": "fake-1",
        "base_url": url,
        "api_key_env": "CURATE_GEN_KEY",
        **options,
    }


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("CURATE_GEN_KEY", KEY)
    with FakeLLM(responder=responder) as fake:
        yield fake


@pytest.fixture
def shared_cache(tmp_path, monkeypatch) -> Path:
    """A request cache of this test's own, so counts do not depend on other tests."""
    folder = tmp_path / "shared-cache"
    monkeypatch.setenv("CURATE_CACHE_DIR", str(folder))
    return folder


def evol_recipe(tmp_path: Path, shared_data: Path, server: FakeLLM, **options) -> Path:
    evol = llm(server, **{"seeds": 30, "rounds": 2, "prices": {"input": 1.0, "output": 2.0}, **options})
    return write_recipe(
        tmp_path,
        [{"normalize": {"system_prompt": "You are a helpful assistant."}}, {"evol": evol}, {"blend": {}}],
        [{"path": str(shared_data / RAW), "name": "alpaca"}],
    )


def version_rows(folder: Path, name: str) -> list[dict]:
    return pq.read_table(folder / name).to_pylist()


def test_evol_eliminates_what_failed_and_keeps_lineage(tmp_path, shared_data, server, shared_cache):
    result = run_recipe(load_recipe(evol_recipe(tmp_path, shared_data, server)))
    m = result.manifest
    stage = next(s for s in m["stages"] if s["name"] == "evol")
    report = stage["report"]
    c = m["counts"]
    assert c["input"] == c["kept"] + c["dropped"] + c["quarantined"] - c["synthetic"]
    assert report["seeds"] == 30 and c["input"] == 999
    # every chain makes one attempt per round: kept or eliminated, nothing failed
    assert report["kept"] + sum(report["eliminated"].values()) == 60 == stage["added"]
    assert report["failed"] == report["unsent_budget"] == 0
    assert set(report["eliminated"]) == {
        "copied_prompt",
        "empty_instruction",
        "no_new_information",
        "refused_answer",
    }

    rows = version_rows(result.folder, "data.parquet")
    kept = [r for r in rows if r["origin"] == "synthetic"]
    real_ids = {r["id"] for r in rows if r["origin"] == "real"}
    assert len(kept) == report["kept"] == sum(report["kept_by_operation"].values())
    synthetic_ids = {r["id"] for r in kept}
    for r in kept:
        meta = json.loads(r["meta"])["evol"]
        assert meta["op"] in OPERATIONS and meta["round"] in (1, 2)
        assert (meta["provider"], meta["model"]) == ("openai", "fake-1")
        assert r["parent_id"] in real_ids | synthetic_ids  # a seed record or an earlier round's survivor
        if meta["round"] == 1:
            assert r["parent_id"] == meta["root_id"]
        roles = [t["role"] for t in r["messages"]]
        assert roles == ["system", "user", "assistant"]
        assert r["messages"][2]["content"] != APOLOGY and "Rewritten" not in r["messages"][1]["content"]
        assert r["source"]["format"] == "evol" and r["source"]["name"] == "alpaca"

    eliminated = [r for r in version_rows(result.folder, "dropped.parquet") if r["stage"] == "evol"]
    assert len(eliminated) == sum(report["eliminated"].values())
    for r in eliminated:
        evidence = json.loads(r["evidence"])
        user = next(t["content"] for t in r["messages"] if t["role"] == "user")
        assert r["origin"] == "synthetic" and evidence["op"] in OPERATIONS
        if r["reason"] == "copied_prompt":
            assert user.startswith("Rewritten instruction:") and evidence["copied"] == "rewritten instruction"
        elif r["reason"] == "empty_instruction":
            assert user == "the of and ?"
        elif r["reason"] == "no_new_information":
            assert evidence["judge"] == "Same"
        else:
            assert r["messages"][-1]["content"] == APOLOGY and evidence["words"] == 8
    # the judge's verdict was followed: each kept evolution is one it called Different
    users = {r["id"]: next(t["content"] for t in r["messages"] if t["role"] == "user") for r in rows}
    judge = template("evol_judge", "", tmp_path)
    for r in kept:
        asked = fill(judge, first=users[r["parent_id"]], second=users[r["id"]])
        assert responder({"messages": [{"role": "user", "content": asked}]}, "openai") == "Different"
    llm_usage = stage["llm"]
    assert llm_usage["answered"] == server.requests and llm_usage["failed"] == 0
    assert m["llm"]["cost"] == pytest.approx(
        (llm_usage["input_tokens"] * 1.0 + llm_usage["output_tokens"] * 2.0) / 1e6, abs=1e-6
    )

    # `curate show` tells where a synthetic record comes from and how it was made
    record = kept[0]
    shown = CliRunner().invoke(
        main, ["show", str(result.folder), "--id", record["id"]], catch_exceptions=False
    )
    meta = json.loads(record["meta"])["evol"]
    assert f"synthetic, made by evol: model fake-1, op {meta['op']}, provider openai, round" in " ".join(
        shown.output.split()
    )
    assert f"parent {record['parent_id']}" in shown.output

    # a second run in a new output folder: every answer from the request cache, the same version
    sent = server.requests
    again = run_recipe(load_recipe(evol_recipe(tmp_path, shared_data, server)), out_dir=tmp_path / "again")
    assert server.requests == sent
    assert again.manifest["version"] == m["version"]
    assert next(s for s in again.manifest["stages"] if s["name"] == "evol")["llm"]["requests"] == 0


def test_estimate_before_any_request_and_the_budget(tmp_path, shared_data, server, shared_cache):
    recipe = evol_recipe(tmp_path, shared_data, server, budget={"requests": 25})
    shown = CliRunner().invoke(main, ["estimate", str(recipe), "--json"], catch_exceptions=False)
    figures = json.loads(shown.output)
    (evol,) = figures["stages"]
    assert figures["records"] == 999 and server.requests == 0
    assert evol["requests"] == 30 * 2 * 3  # evolve, answer and judge, per seed and round
    assert evol["over_budget"] == ["180 requests > budget 25"]
    dry = CliRunner().invoke(main, ["run", str(recipe), "--dry-run"], catch_exceptions=False)
    assert "a run would stop before its first request" in dry.output and server.requests == 0

    with pytest.raises(CurateError, match="the estimate passes the budget"):
        run_recipe(load_recipe(recipe))
    assert server.requests == 0 and not list((tmp_path / "out").glob("v*"))

    partial = evol_recipe(tmp_path, shared_data, server, budget={"requests": 25, "allow_partial": True})
    result = run_recipe(load_recipe(partial))
    stage = next(s for s in result.manifest["stages"] if s["name"] == "evol")
    assert stage["llm"]["budget_exhausted"] is True and stage["report"]["budget_exhausted"] is True
    assert stage["llm"]["answered"] == server.requests <= 25
    assert stage["report"]["unsent_budget"] > 0
    c = result.manifest["counts"]
    assert c["input"] == c["kept"] + c["dropped"] + c["quarantined"] - c["synthetic"]


def test_a_killed_run_repeats_no_answered_request(tmp_path, shared_data, server, shared_cache):
    recipe = evol_recipe(tmp_path, shared_data, server, concurrency=1, seeds=10, rounds=1)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = [sys.executable, "-m", "curate", "run", str(recipe), "--json"]
    proc = subprocess.Popen(run, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    server.kill_at = (proc.pid, 14)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    # the 14th request killed the run before it was answered (the server answers it to no one)
    first = [json.dumps(e["body"], sort_keys=True) for e in server.log[:13]]
    assert all(e["answered"] is not None for e in server.log[:13])
    server.kill_at = None  # the same command again, in this process: what it resumes from is on disk
    done = CliRunner().invoke(main, ["run", str(recipe), "--json"], catch_exceptions=False)
    assert done.exit_code == 0, done.output[-2000:]
    second = [json.dumps(e["body"], sort_keys=True) for e in server.log[14:]]
    assert not set(first) & set(second)  # nothing answered before the kill was asked again
    manifest = json.loads(done.stdout)
    stage = next(s for s in manifest["stages"] if s["name"] == "evol")
    assert stage["llm"]["cached"] >= 13 and stage["report"]["seeds"] == 10


def test_the_api_key_is_written_nowhere(tmp_path, shared_data, server, shared_cache):
    recipe = evol_recipe(tmp_path, shared_data, server, seeds=5, rounds=1)
    ran = CliRunner().invoke(main, ["run", str(recipe), "--json"], catch_exceptions=False)
    server.faults.append({"status": 401, "message": f"Incorrect API key provided: {KEY}"})
    refused = CliRunner().invoke(
        main,
        [
            "run",
            str(evol_recipe(tmp_path, shared_data, server, seeds=6, rounds=1)),
            "--out",
            str(tmp_path / "x"),
        ],
    )
    assert ran.exit_code == 0 and refused.exit_code == 1
    assert "was refused (401)" in refused.output and "Traceback" not in refused.output
    assert KEY not in ran.output + refused.output
    assert all(e["key"] == KEY for e in server.log)  # it did reach the server
    for path in tmp_path.rglob("*"):  # both runs' outputs, the request cache (WAL too), the recipes
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path


def test_anthropic_and_respond_answer_prompt_only_records(tmp_path, shared_data, server, shared_cache):
    respond = llm(server, "anthropic", samples=2, max_tokens=64)
    recipe = write_recipe(
        tmp_path,
        [
            {"normalize": {"system_prompt": "Be brief."}},
            {"filter": {"keep_prompt_only": True}},
            {"respond": respond},
            {"blend": {"min_real_fraction": 0.2}},
        ],
        [
            {"path": str(shared_data / "raw/alpaca_seed_tasks.jsonl.gz"), "name": "seed_tasks"},
            {
                "path": str(shared_data / "raw/selfinstruct_user_oriented_instructions.jsonl.gz"),
                "name": "user",
            },
            {"path": str(shared_data / RAW), "name": "alpaca"},
        ],
    )
    result = run_recipe(load_recipe(recipe))
    stage = next(s for s in result.manifest["stages"] if s["name"] == "respond")
    report = stage["report"]
    prompts = report["prompts"]
    assert prompts > 100
    assert {e["path"] for e in server.log} == {"/v1/messages"}
    assert server.requests == 2 * prompts  # two samples of each prompt are two requests
    assert all(e["body"]["system"] == "Be brief." for e in server.log)
    dropped = [r for r in version_rows(result.folder, "dropped.parquet") if r["stage"] == "respond"]
    answered = [r for r in dropped if r["reason"] == "answered"]
    refused = [r for r in dropped if r["reason"] == "refused_answer"]
    twins = [r for r in dropped if r["reason"] == "duplicate"]
    assert len(answered) + sum(r["reason"] == "unanswered" for r in dropped) == prompts
    assert report["kept"] + len(refused) + len(twins) == 2 * prompts == stage["added"]
    # the server answers a prompt the same way twice: the second sample is a duplicate of the first
    assert len(twins) == len(answered) == report["kept"] and len(refused) == 2 * (prompts - len(answered))
    made = {r["id"]: r for r in version_rows(result.folder, "data.parquet") if r["origin"] == "synthetic"}
    assert len(made) == report["kept"]
    for r in answered:
        for answer_id in json.loads(r["evidence"])["answers"]:
            record = made[answer_id]
            assert record["parent_id"] == r["id"] and record["messages"][-1]["role"] == "assistant"
            assert record["messages"][:-1] == r["messages"]
            assert json.loads(record["meta"])["respond"]["provider"] == "anthropic"
    mix = result.manifest["stages"][-1]["report"]["mix_after"]
    assert mix["alpaca"]["synthetic"] == 0 and sum(m["synthetic"] for m in mix.values()) == report["kept"]


def _rows(path: Path, rows: list[dict]) -> dict:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"path": str(path), "name": path.stem}


def test_blend_keeps_the_real_share(tmp_path, server, shared_cache):
    real = [
        {"instruction": f"Name a use of the number {i}.", "output": f"Counting {i} apples."}
        for i in range(10)
    ]
    inputs = [_rows(tmp_path / "real.jsonl", real)]
    evol = llm(server, rounds=3, judge=False)
    with pytest.raises(RecipeError, match="needs a blend stage after it"):
        load_recipe(write_recipe(tmp_path, [{"evol": evol}], inputs))

    result = run_recipe(
        load_recipe(write_recipe(tmp_path, [{"evol": evol}, {"blend": {"min_real_fraction": 0.5}}], inputs))
    )
    report = result.manifest["stages"][-1]["report"]
    made = result.manifest["stages"][0]["report"]["kept"]
    assert made > 10  # more synthetic than real before the blend
    assert report == {
        **report,
        "real": 10,
        "synthetic_in": made,
        "synthetic_kept": 10,
        "real_share": 0.5,
        "mix_after": {"real": {"real": 10, "synthetic": 10}},
    }
    drops = [r for r in version_rows(result.folder, "dropped.parquet") if r["stage"] == "blend"]
    assert len(drops) == made - 10 and {r["reason"] for r in drops} == {"real_share"}
    again = run_recipe(
        load_recipe(write_recipe(tmp_path, [{"evol": evol}, {"blend": {"min_real_fraction": 0.5}}], inputs)),
        out_dir=tmp_path / "again",
    )
    assert again.manifest["version"] == result.manifest["version"]  # the same synthetic ones went

    # a stage after the blend that drops real records: the version is refused, not written
    after = [{"evol": evol}, {"blend": {}}, {"filter": {"min_chars": 100}}]  # the real ones are short
    with pytest.raises(CurateError, match="minimum real share is 20%"):
        run_recipe(load_recipe(write_recipe(tmp_path, after, inputs)), out_dir=tmp_path / "refused")
    assert not list((tmp_path / "refused").glob("v*"))

    # only synthetic records: no share can be met
    prompts = [_rows(tmp_path / "prompts.jsonl", [{"instruction": f"Say {i}."} for i in range(4)])]
    only = [{"filter": {"keep_prompt_only": True}}, {"respond": llm(server)}, {"blend": {}}]
    with pytest.raises(CurateError, match="no real records to blend"):
        run_recipe(load_recipe(write_recipe(tmp_path, only, prompts)), out_dir=tmp_path / "none")


def test_the_judges_verdict_is_read_whatever_its_formatting():
    from curate.stages.evol import judged_same

    same = ["Same", "same.", "**Same**", '"Same"', "The two ask for the same thing.", "SAME - no change"]
    different = [
        "Different",
        "**Different**",
        "Different: it adds a constraint",
        "Not the same, different",
        "",
    ]
    assert [judged_same(t) for t in same] == [True] * len(same)
    assert [judged_same(t) for t in different] == [False] * len(different)
