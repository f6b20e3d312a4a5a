"""Fanned-out requests (curate/llm/fanout.py) without Ray: generation workers as threads of this
process, each a `ShardWorker` with its own request engine, against FakeLLM through the openai SDK.

They must give the one-process engine's answers in its order, keep at most workers x concurrency
requests in flight, and keep one budget for all workers: a requests budget sends the same first N
requests as one process does. The request cache they share is written by several processes at once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
from click.testing import CliRunner

from curate.cli import main
from curate.errors import CurateError, RecipeError
from curate.llm import Answer, Budget, Failure, LLMConfig, Request, RequestCache
from curate.llm.engine import prompt_tokens
from curate.llm.fanout import FanOutEngine, ShardWorker, worker_config
from curate.recipe import recipe_from_dict
from curate.stages.base import StageContext
from tests.conftest import EXAMPLES, REPO
from tests.llm_server import FakeLLM
from tests.test_llm_engine import KEY, KEY_ENV, config, questions

pytest.importorskip("openai")


@pytest.fixture(autouse=True)
def _key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)


class ThreadWorkers:
    """`count` generation workers as threads of this process."""

    def __init__(self, count: int, context: StageContext) -> None:
        self.count = count
        self.shard_workers = [ShardWorker(context) for _ in range(count)]
        self.pool = ThreadPoolExecutor(count)
        self.shards: list[tuple[int, int]] = []  # (worker, requests) per shard, as submitted

    def submit(self, worker: int, cfg: LLMConfig, requests: list[Request], environment: dict) -> Future:
        assert cfg.budget is None and environment == {KEY_ENV: KEY}
        self.shards.append((worker, len(requests)))
        return self.pool.submit(self.shard_workers[worker].answer, cfg, requests, environment)


def engines(tmp_path: Path, cfg: LLMConfig, workers: int) -> tuple:
    """A one-process engine and a fanned-out one, each with a request cache of its own."""
    one = StageContext(base_dir=tmp_path, shared_cache=tmp_path / "one").llm_engine(cfg)
    context = StageContext(base_dir=tmp_path, shared_cache=tmp_path / "fan")
    pool = ThreadWorkers(workers, context)
    fan = StageContext(base_dir=tmp_path, shared_cache=tmp_path / "fan", llm_workers=pool).llm_engine(cfg)
    assert isinstance(fan, FanOutEngine) and not isinstance(one, FanOutEngine)
    return one, fan, pool


def most_in_flight(log: list[dict]) -> int:
    """The most requests the server held at once (from when each arrived to when it was answered)."""
    events = sorted([(e["received"], 1) for e in log] + [(e["answered"], -1) for e in log])
    held = most = 0
    for _, step in events:
        held += step
        most = max(most, held)
    return most


def test_workers_give_one_process_answers_in_its_order_and_bound_what_is_in_flight(tmp_path):
    with FakeLLM() as a, FakeLLM(latency=0.03) as b:
        one, _, _ = engines(tmp_path, config(a.url, concurrency=3), 3)
        _, fan, pool = engines(tmp_path, config(b.url, concurrency=3), 3)
        asked = questions(120) + questions(10)  # ten asked twice: sent once
        by_one, by_fan = one.run(asked), fan.run(asked)
        assert [r.text for r in by_fan] == [r.text for r in by_one]
        assert all(
            isinstance(r, Answer) and r.text.startswith(f"Answer to: q{i % 120} ")
            for i, r in enumerate(by_fan)
        )
        assert a.requests == b.requests == 120
        counted = ("requests", "answered", "input_tokens", "output_tokens", "failed", "unsent")
        assert {k: getattr(fan.usage, k) for k in counted} == {k: getattr(one.usage, k) for k in counted}
        # shards of 8 x concurrency, spread over all three workers, at most 3 x 3 in flight
        assert sorted(n for _, n in pool.shards) == [24] * 5
        assert {w for w, _ in pool.shards} == {0, 1, 2}
        assert 3 < most_in_flight(b.log) <= 9
        # the driver's cache has every answer: asked again, nothing is sent
        again = fan.run(asked)
        assert [r.text for r in again] == [r.text for r in by_one] and b.requests == 120
        assert fan.usage.cached == 130


def test_a_requests_budget_holds_over_all_workers(tmp_path):
    with FakeLLM() as a, FakeLLM() as b:
        one, _, _ = engines(tmp_path, config(a.url, concurrency=2, budget=Budget(requests=25)), 4)
        _, fan, pool = engines(tmp_path, config(b.url, concurrency=2, budget=Budget(requests=25)), 4)
        by_one, by_fan = one.run(questions(100)), fan.run(questions(100))
        assert b.requests == a.requests == 25 == fan.usage.answered
        # the first 25 in order, as one process sends them: the same answers and the same failures
        assert [type(r) for r in by_fan] == [type(r) for r in by_one] == [Answer] * 25 + [Failure] * 75
        assert {r.reason for r in by_fan[25:]} == {"budget"}
        assert fan.usage.budget_exhausted and fan.usage.unsent == 75
        assert sorted(n for _, n in pool.shards) == [9, 16]  # shards of 16, cut where the budget ends
        assert fan.run(questions(1, "more"))[0].reason == "budget" and b.requests == 25


def test_a_token_budget_is_never_passed_and_is_spent_as_answers_come_back(tmp_path):
    budget = 3000
    with FakeLLM() as fake:
        cfg = config(fake.url, concurrency=2, max_tokens=64, budget=Budget(tokens=budget))
        _, fan, pool = engines(tmp_path, cfg, 3)
        asked = questions(400)
        results = fan.run(asked)
        spent = fan.usage.input_tokens + fan.usage.output_tokens
        # worst cases alone admit 3000 // 69 = 43 requests; an answer costs 13 tokens, so the holds
        # given back as shards return let more go out, until not one more worst case fits
        worst = prompt_tokens(asked[0].messages) + 64
        assert budget - worst < spent <= budget and fan.usage.budget_exhausted
        assert fan.usage.answered == fake.requests > 3 * (budget // worst)
        answered = [isinstance(r, Answer) for r in results]
        assert answered == [True] * fan.usage.answered + [False] * (400 - fan.usage.answered)
        assert len(pool.shards) > 3


def test_a_key_refused_in_a_worker_ends_the_stage(tmp_path):
    with FakeLLM(faults=[{"status": 401, "message": "bad key"}] * 50) as fake:
        _, fan, _ = engines(tmp_path, config(fake.url, concurrency=2), 2)
        with pytest.raises(CurateError, match=r"was refused \(401\)"):
            fan.run(questions(40))
        assert fake.requests <= 4  # each worker stops at its first refusal


def test_a_worker_sends_with_its_share_of_the_rate_limits_and_the_same_cache_keys(tmp_path):
    cfg = config("http://x", requests_per_minute=100, tokens_per_minute=5, budget=Budget(requests=9))
    share = worker_config(cfg, 3)
    assert (share.requests_per_minute, share.tokens_per_minute, share.budget) == (33, 1, None)
    assert (share.concurrency, share.model, share.max_tokens) == (cfg.concurrency, cfg.model, cfg.max_tokens)
    context = StageContext(base_dir=tmp_path, shared_cache=tmp_path)
    request = questions(1)[0]
    assert context.llm_engine(share).key_of(request) == context.llm_engine(cfg).key_of(request)


WRITER = """
import sys
from pathlib import Path
from curate.llm.cache import RequestCache
cache, worker = RequestCache.at(Path(sys.argv[1])), sys.argv[2]
for i in range(300):  # a transaction per answer, as a worker's answers arrive one by one
    cache.put_many([(f"{worker}-{i}", {"n": i}, {"text": f"answer {worker}-{i}"})])
"""


def test_the_request_cache_takes_answers_from_several_processes_at_once(tmp_path):
    path = tmp_path / "requests.sqlite"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(w)], env=env) for w in range(4)]
    assert [p.wait(60) for p in writers] == [0, 0, 0, 0]
    cache = RequestCache(path)
    keys = [f"{w}-{i}" for w in range(4) for i in range(300)]
    found = cache.get_many(keys)
    assert len(cache) == 1200 and all(found[k] == {"text": f"answer {k}"} for k in keys)


def test_generation_workers_are_for_the_ray_engine_only(tmp_path):
    recipe = {"inputs": [str(EXAMPLES / "raw")], "stages": [{"normalize": {}}]}
    with pytest.raises(RecipeError, match="generation_workers is for the ray engine"):
        recipe_from_dict({**recipe, "engine": {"name": "local", "generation_workers": 2}}, tmp_path)
    with pytest.raises(RecipeError, match="generation_workers"):
        recipe_from_dict({**recipe, "engine": {"name": "ray", "generation_workers": 0}}, tmp_path)
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps(recipe))
    refused = CliRunner().invoke(
        main, ["run", str(path), "--generation-workers", "2", "--out", str(tmp_path)]
    )
    assert refused.exit_code == 1 and not list(tmp_path.glob("v*"))
    assert "generation workers are for the ray engine, not local" in refused.output
    assert "add --engine ray" in refused.output
