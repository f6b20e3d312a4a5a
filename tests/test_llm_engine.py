"""The LLM request engine (curate/llm) through the real openai and anthropic SDKs against FakeLLM.

Every test counts what the server saw (tests/llm_server.py logs each request), so a wrong answer,
a request sent twice, a retry too many or a budget passed shows up as a wrong number.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from curate.errors import CurateError
from curate.llm import (
    Answer,
    Budget,
    Failure,
    LLMConfig,
    Prices,
    Request,
    RequestCache,
    RequestEngine,
    make_provider,
)
from tests.llm_server import FakeLLM, default_responder

pytest.importorskip("openai")
pytest.importorskip("anthropic")

REPO = Path(__file__).resolve().parents[1]
KEY_ENV = "CURATE_TEST_KEY"
KEY = "sk-curate-FAKE-0123456789abcdef"

PROVIDERS = ["openai", "anthropic"]


@pytest.fixture(autouse=True)
def _key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)


def config(url: str, provider: str = "openai", **kw) -> LLMConfig:
    kw.setdefault("concurrency", 4)
    kw.setdefault("max_retries", 3)
    kw.setdefault("timeout", 1.0)
    base_url = url + "/v1" if provider == "openai" else url
    return LLMConfig(provider=provider, model="m", base_url=base_url, api_key_env=KEY_ENV, **kw)


def engine_for(url: str, cache_dir: Path, provider: str = "openai", **kw) -> RequestEngine:
    cfg = config(url, provider, **kw)
    return RequestEngine(make_provider(cfg, cache_dir), cfg, RequestCache(cache_dir / "r.sqlite"))


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def questions(n: int, prefix: str = "q") -> list[Request]:
    return [Request(user(f"{prefix}{i}")) for i in range(n)]


def words(text: str) -> int:
    return len(text.split())


def contents(body: dict) -> list[str]:
    return [m["content"] for m in body["messages"]]


def api_log(fake: FakeLLM) -> list[dict]:
    return [e for e in fake.log if e["api"] is not None]


# 1. answers, usage and the wire format -----------------------------------------------------------


@pytest.mark.parametrize("provider", PROVIDERS)
def test_answers_in_order_with_exact_usage(serve, tmp_path, provider):
    fake = serve(latency=0.01)
    system = "You are a terse assistant for tests."
    requests = [
        Request([{"role": "system", "content": system}, *user(f"question number {i} please")])
        if i % 3 == 0
        else Request(user(f"q{i} " + "w " * i))
        for i in range(10)
    ]
    engine = engine_for(fake.url, tmp_path, provider)
    results = engine.run(requests)

    assert len(results) == 10
    expected_in = expected_out = 0
    for request, result in zip(requests, results, strict=True):
        assert isinstance(result, Answer)
        chat = [m for m in request.messages if m["role"] != "system"]
        text = default_responder({"messages": chat}, provider)
        assert result.text == text
        assert result.finish == "stop" and result.cached is False
        assert result.input_tokens == sum(words(m["content"]) for m in request.messages)
        assert result.output_tokens == words(text)
        expected_in += result.input_tokens
        expected_out += words(text)
    usage = engine.usage
    assert (usage.answered, usage.requests, usage.cached, usage.retries, usage.failed) == (10, 10, 0, 0, 0)
    assert usage.input_tokens == expected_in and usage.output_tokens == expected_out
    assert usage.budget_exhausted is False and usage.unsent == 0 and usage.cost == 0.0

    log = api_log(fake)
    assert len(log) == len(fake.log) == 10
    assert all(e["status"] == 200 and e["key"] == KEY for e in log)
    assert all(e["api"] == provider and e["body"]["model"] == "m" for e in log)
    assert all(e["body"]["max_tokens"] == 512 and "top_p" not in e["body"] for e in log)
    if provider == "openai":
        assert all(e["body"]["temperature"] == 0.7 for e in log)
    by_question = {contents(e["body"])[-1]: e["body"] for e in log}
    assert len(by_question) == 10
    with_system = by_question["question number 3 please"]
    if provider == "anthropic":
        assert with_system["system"] == system
        assert with_system["messages"] == user("question number 3 please")
    else:
        assert "system" not in with_system
        assert with_system["messages"] == [
            {"role": "system", "content": system},
            *user("question number 3 please"),
        ]
    assert "system" not in by_question["q1 w "]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_answer_cut_at_max_tokens_is_length(serve, tmp_path, provider):
    fake = serve()
    engine = engine_for(fake.url, tmp_path, provider, max_tokens=3, top_p=0.5)
    (answer,) = engine.run([Request(user("hello there"))])
    full = default_responder({"messages": user("hello there")}, provider)
    assert answer == Answer(" ".join(full.split()[:3]), 2, 3, "length")
    (entry,) = fake.log
    assert entry["body"]["max_tokens"] == 3
    if provider == "openai":
        assert entry["body"]["top_p"] == 0.5


# 2. the cache ------------------------------------------------------------------------------------


@pytest.mark.parametrize("provider", PROVIDERS)
def test_second_engine_answers_from_cache(serve, tmp_path, provider):
    fake = serve()
    first = engine_for(fake.url, tmp_path, provider).run(questions(10))
    assert len(fake.log) == 10

    engine = engine_for(fake.url, tmp_path, provider)
    again = engine.run(questions(10))
    assert len(fake.log) == 10  # nothing new sent
    assert engine.usage.cached == 10
    assert (engine.usage.requests, engine.usage.answered, engine.usage.input_tokens) == (0, 0, 0)
    assert all(isinstance(a, Answer) and a.cached for a in again)
    assert [(a.text, a.input_tokens, a.output_tokens, a.finish) for a in again] == [
        (a.text, a.input_tokens, a.output_tokens, a.finish) for a in first
    ]
    assert len(RequestCache(tmp_path / "r.sqlite")) == 10


def test_cache_key_depends_on_model_and_url(serve, tmp_path):
    fake = serve()
    engine_for(fake.url, tmp_path).run(questions(2))
    other = serve()  # another endpoint: sent again
    engine_for(other.url, tmp_path).run(questions(2))
    assert len(other.log) == 2
    cfg = config(fake.url)
    cfg.model = "m2"  # another model: sent again
    RequestEngine(make_provider(cfg, tmp_path), cfg, RequestCache(tmp_path / "r.sqlite")).run(questions(2))
    assert len(fake.log) == 4 and [e["body"]["model"] for e in fake.log[2:]] == ["m2", "m2"]
    engine_for(fake.url, tmp_path).run(questions(2))
    assert len(fake.log) == 4


def test_identical_requests_in_one_run_are_sent_once(serve, tmp_path):
    fake = serve(latency=0.01)
    engine = engine_for(fake.url, tmp_path)
    requests = [Request(user("same")) for _ in range(5)] + [Request(user("other"))] * 3
    results = engine.run(requests)
    assert len(fake.log) == 2
    assert sorted(contents(e["body"])[0] for e in fake.log) == ["other", "same"]
    assert [r.text for r in results] == [default_responder({"messages": user("same")}, "openai")] * 5 + [
        default_responder({"messages": user("other")}, "openai")
    ] * 3
    assert (engine.usage.requests, engine.usage.answered, engine.usage.cached) == (2, 2, 0)
    assert len(RequestCache(tmp_path / "r.sqlite")) == 2


def test_samples_and_sampling_params_make_new_keys(serve, tmp_path):
    fake = serve()
    engine = engine_for(fake.url, tmp_path)
    msgs = user("sample me")
    variants = [
        Request(msgs),
        Request(msgs, sample=0),  # the same as the first
        Request(msgs, sample=1),
        Request(msgs, sample=2),
        Request(msgs, temperature=0.0),
        Request(msgs, temperature=0.7),  # the config's temperature: the same as the first
        Request(msgs, max_tokens=7),
        Request(msgs, max_tokens=512),  # the config's max_tokens: the same as the first
    ]
    results = engine.run(variants)
    assert all(isinstance(r, Answer) for r in results)
    assert len(fake.log) == 5
    sent = sorted((e["body"]["temperature"], e["body"]["max_tokens"]) for e in fake.log)
    assert sent == [(0.0, 512), (0.7, 7), (0.7, 512), (0.7, 512), (0.7, 512)]
    assert results[6].output_tokens == 7 and results[6].finish == "length"

    engine = engine_for(fake.url, tmp_path)
    assert all(r.cached for r in engine.run(variants))
    more = engine.run([Request(msgs, sample=3), Request(msgs, temperature=0.3), Request(msgs, max_tokens=8)])
    assert not any(r.cached for r in more)
    assert len(fake.log) == 8 and engine.usage.cached == 8
    cfg = config(fake.url, temperature=0.0)  # the stage's temperature is part of the key as well
    again = RequestEngine(make_provider(cfg, tmp_path), cfg, RequestCache(tmp_path / "r.sqlite"))
    assert again.run([Request(msgs)])[0].cached  # same as Request(msgs, temperature=0.0) above
    assert again.run([Request(msgs, temperature=0.7)])[0].cached
    assert len(fake.log) == 8


# 3. retries --------------------------------------------------------------------------------------


@pytest.mark.parametrize("provider", PROVIDERS)
def test_retries_every_transient_fault(serve, tmp_path, provider):
    # the faults with no Retry-After come first (the backoff grows with each attempt); the 429
    # comes last, where the backoff would be 4-8 s: its Retry-After of 0.3 s must win
    faults = [
        {"drop": True},
        {"malformed": True},
        {"delay": 3.0},  # the client's timeout is 1 s
        {"status": 500, "retry_after": 0},
        {"status": 429, "retry_after": 0.3},
    ]
    fake = serve(faults=faults)
    engine = engine_for(fake.url, tmp_path, provider, concurrency=1, max_retries=5)
    start = time.monotonic()
    results = engine.run(questions(3))
    elapsed = time.monotonic() - start

    assert all(isinstance(r, Answer) and not r.cached for r in results)
    assert [r.text for r in results] == [
        default_responder({"messages": user(f"q{i}")}, provider) for i in range(3)
    ]
    usage = engine.usage
    assert (usage.retries, usage.requests, usage.answered, usage.failed) == (5, 8, 3, 0)
    log = api_log(fake)
    assert len(log) == 8
    first = [e for e in log if contents(e["body"]) == ["q0"]]
    assert len(first) == 6
    assert [e["status"] for e in first] == [None, 200, None, 500, 429, 200]
    assert first[2]["answered"] is None  # the client gave up on the slow answer
    assert [e["key"] for e in log] == [KEY] * 8
    gap_429 = first[5]["received"] - first[4]["answered"]
    assert 0.3 <= gap_429 < 3.5, gap_429  # the backoff alone would wait at least 4 s here
    assert elapsed >= 1.0 + 0.3  # the timed-out attempt and the 429's wait at least
    assert len(RequestCache(tmp_path / "r.sqlite")) == 3


def test_retry_after_longer_than_backoff_is_honoured(serve, tmp_path):
    fake = serve(faults=[{"status": 429, "retry_after": 0.9}, {"status": 503, "retry_after_ms": 600}])
    engine = engine_for(fake.url, tmp_path, concurrency=1)
    start = time.monotonic()
    (answer,) = engine.run(questions(1))
    assert isinstance(answer, Answer)
    assert time.monotonic() - start >= 1.5
    log = fake.log
    assert [e["status"] for e in log] == [429, 503, 200]
    assert log[1]["received"] - log[0]["answered"] >= 0.9  # the first backoff would be 0.25-0.5 s
    assert log[2]["received"] - log[1]["answered"] >= 0.6
    assert engine.usage.retries == 2


@pytest.mark.parametrize("provider", PROVIDERS)
def test_retries_run_out_is_a_failure_not_cached(serve, tmp_path, provider):
    fake = serve(faults=[{"status": 500}] * 3)
    engine = engine_for(fake.url, tmp_path, provider, concurrency=1, max_retries=2)
    results = engine.run(questions(2))
    assert isinstance(results[0], Failure) and results[0].reason == "error"
    assert "500" in results[0].message and KEY not in results[0].message
    assert isinstance(results[1], Answer)
    assert [contents(e["body"]) for e in fake.log] == [["q0"]] * 3 + [["q1"]]
    usage = engine.usage
    assert (usage.requests, usage.retries, usage.failed, usage.answered) == (4, 2, 1, 1)
    assert len(RequestCache(tmp_path / "r.sqlite")) == 1

    later = engine_for(fake.url, tmp_path, provider)
    again = later.run(questions(2))
    assert isinstance(again[0], Answer) and not again[0].cached and again[1].cached
    assert len(fake.log) == 5 and contents(fake.log[4]["body"]) == ["q0"]
    assert later.usage.cached == 1 and later.usage.answered == 1


# 4. errors that are not retried ------------------------------------------------------------------


def fault_on(question: str, fault: dict):
    return lambda body: dict(fault) if contents(body)[-1] == question else None


def sqlite_bytes(folder: Path) -> bytes:
    files = sorted(folder.rglob("*.sqlite*"))
    assert files
    return b"".join(p.read_bytes() for p in files)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_bad_request_fails_only_that_request(serve, tmp_path, provider):
    fake = serve(fault_for=fault_on("q3", {"status": 400, "message": "bad prompt"}))
    engine = engine_for(fake.url, tmp_path, provider)
    results = engine.run(questions(8))
    assert [i for i, r in enumerate(results) if isinstance(r, Failure)] == [3]
    assert results[3].reason == "error" and "400" in results[3].message and "bad prompt" in results[3].message
    assert len(fake.log) == 8  # the 400 was not retried
    usage = engine.usage
    assert (usage.requests, usage.retries, usage.failed, usage.answered) == (8, 0, 1, 7)
    assert len(RequestCache(tmp_path / "r.sqlite")) == 7


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("status", [401, 403, 404])
def test_auth_and_not_found_stop_the_run(serve, tmp_path, provider, status):
    # a real server echoes (part of) the key it refused; the message must not carry it on
    fault = {"status": status, "message": f"Incorrect API key provided: {KEY}. Try again."}
    fake = serve(fault_for=fault_on("q3", fault), latency=0.01)
    engine = engine_for(fake.url, tmp_path, provider, concurrency=1)
    with pytest.raises(CurateError) as caught:
        engine.run(questions(10))
    error = caught.value
    assert str(status) in str(error)
    assert KEY not in str(error) and KEY not in repr(error) and KEY[10:] not in str(error)
    if status != 404:
        assert KEY_ENV in str(error)  # it says which variable to check
    assert [contents(e["body"]) for e in fake.log] == [[f"q{i}"] for i in range(4)]  # no retry, no more
    assert engine.usage.answered == 3 and engine.usage.retries == 0
    assert len(RequestCache(tmp_path / "r.sqlite")) == 3
    assert KEY.encode() not in sqlite_bytes(tmp_path)

    fake.fault_for = None
    later = engine_for(fake.url, tmp_path, provider)
    results = later.run(questions(10))
    assert [r.cached for r in results] == [True] * 3 + [False] * 7
    assert len(fake.log) == 11
    assert KEY.encode() not in sqlite_bytes(tmp_path)


def test_fatal_error_cancels_the_requests_in_flight(serve, tmp_path):
    # q0 is refused at once while q1..q3 are still being answered: they are cancelled, nothing is
    # stored, and nothing after them is sent
    def fault_for(body):
        return {"status": 401} if contents(body) == ["q0"] else {"delay": 1.5}

    fake = serve(fault_for=fault_for)
    engine = engine_for(fake.url, tmp_path, concurrency=4, timeout=5.0)
    with pytest.raises(CurateError):
        engine.run(questions(20))
    # at most the four in flight reached the server (on a busy machine the refusal may come back
    # before the fourth is sent); none of the 16 after them did
    sent = [contents(e["body"])[0] for e in fake.log]
    assert "q0" in sent and set(sent) <= {"q0", "q1", "q2", "q3"}
    assert len(RequestCache(tmp_path / "r.sqlite")) == 0


def test_missing_key_is_a_curate_error(serve, tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV)
    fake = serve()
    with pytest.raises(CurateError, match=KEY_ENV):
        engine_for(fake.url, tmp_path).run(questions(2))
    assert fake.log == []


# 5. budget ---------------------------------------------------------------------------------------

# "q<i>": 2 characters, estimated 1 + 4 tokens; at max_tokens=20 each request reserves 25 tokens.
# The server counts 1 input word and 13 output words ("Answer to: q0 This is a deterministic reply
# from the fake openai server."): 14 real tokens each.


@pytest.mark.parametrize("concurrency", [1, 4])
def test_request_budget(serve, tmp_path, concurrency):
    fake = serve(latency=0.01)
    engine = engine_for(fake.url, tmp_path, concurrency=concurrency, budget=Budget(requests=3))
    results = engine.run(questions(10))
    assert all(isinstance(r, Answer) for r in results[:3])
    assert all(isinstance(r, Failure) and r.reason == "budget" for r in results[3:])
    assert len(fake.log) == 3
    assert sorted(contents(e["body"])[0] for e in fake.log) == ["q0", "q1", "q2"]
    usage = engine.usage
    assert (usage.answered, usage.requests, usage.unsent, usage.budget_exhausted) == (3, 3, 7, True)
    # the budget is spent: a later run of the same engine sends nothing new
    more = engine.run(questions(3, "more"))
    assert all(isinstance(r, Failure) and r.reason == "budget" for r in more)
    assert len(fake.log) == 3


def test_token_budget_exact(serve, tmp_path):
    fake = serve()
    engine = engine_for(fake.url, tmp_path, concurrency=1, max_tokens=20, budget=Budget(tokens=100))
    results = engine.run(questions(10))
    # sent while spent + 25 <= 100: after 0, 14, ..., 70 tokens spent; not at 84
    assert [isinstance(r, Answer) for r in results] == [True] * 6 + [False] * 4
    assert all(r.reason == "budget" for r in results[6:])
    assert len(fake.log) == 6
    usage = engine.usage
    assert (usage.input_tokens, usage.output_tokens) == (6, 78)
    assert usage.budget_exhausted and usage.unsent == 4


def test_cost_budget_exact(serve, tmp_path):
    fake = serve()
    prices = Prices(input=1e6, output=2e6)  # 1 per input token, 2 per output token
    engine = engine_for(
        fake.url, tmp_path, concurrency=1, max_tokens=20, prices=prices, budget=Budget(cost=200)
    )
    results = engine.run(questions(10))
    # each answer costs 1 + 13 * 2 = 27 and reserves 5 + 20 * 2 = 45: sent at 0, 27, ..., 135 spent
    assert sum(isinstance(r, Answer) for r in results) == 6 == len(fake.log)
    assert engine.usage.cost == 162.0
    assert engine.usage.as_dict()["cost"] == 162.0


@pytest.mark.parametrize("kind", ["tokens", "cost"])
@pytest.mark.parametrize("concurrency", [1, 8])
def test_budget_never_passed(serve, tmp_path, kind, concurrency):
    fake = serve(latency=0.02)
    prices = Prices(input=3.0, output=15.0)
    limit = {"tokens": 400, "cost": 0.004}[kind]
    engine = engine_for(
        fake.url,
        tmp_path,
        concurrency=concurrency,
        max_tokens=30,
        prices=prices,
        budget=Budget(**{kind: limit}),
    )
    requests = [Request(user(f"question {i} " + "long " * (i % 5))) for i in range(40)]
    results = engine.run(requests)
    answers = [r for r in results if isinstance(r, Answer)]
    assert answers and len(answers) < 40 and len(answers) == len(fake.log)
    spent_tokens = sum(a.input_tokens + a.output_tokens for a in answers)
    spent_cost = sum(prices.cost(a.input_tokens, a.output_tokens) for a in answers)
    assert engine.usage.input_tokens + engine.usage.output_tokens == spent_tokens
    assert engine.usage.cost == pytest.approx(spent_cost)
    assert (spent_tokens if kind == "tokens" else spent_cost) <= limit
    assert engine.usage.budget_exhausted
    assert all(r.reason == "budget" for r in results if isinstance(r, Failure))


def test_token_budget_holds_when_the_prompt_has_more_tokens_than_estimated(serve, tmp_path):
    # 201 characters: estimated 51 + 4 = 55 tokens (+ 20 out = 75 reserved); the server counts 101
    # words in and 20 out, 121 each. After one answer 121 + 75 = 196 <= 200, so a second is sent.
    fake = serve()
    engine = engine_for(fake.url, tmp_path, concurrency=1, max_tokens=20, budget=Budget(tokens=200))
    engine.run([Request(user("a " * 100 + str(i))) for i in range(5)])
    assert engine.usage.input_tokens + engine.usage.output_tokens == 121  # one answer; two are 242


def test_request_budget_counts_answers_not_failed_attempts(serve, tmp_path):
    """Failed attempts are not billed: the budget counts answered requests (Budget.requests' help)."""
    fake = serve(faults=[{"status": 500, "retry_after": 0}] * 2)
    engine = engine_for(fake.url, tmp_path, concurrency=1, budget=Budget(requests=3))
    results = engine.run(questions(10))
    assert sum(isinstance(r, Answer) for r in results) == engine.usage.answered == 3
    assert [e["status"] for e in fake.log] == [500, 500, 200, 200, 200]
    assert engine.usage.requests == 5 and engine.usage.retries == 2


def test_fatal_error_gives_back_its_budget_reservation(serve, tmp_path):
    fake = serve(faults=[{"status": 401}])
    engine = engine_for(fake.url, tmp_path, concurrency=1, budget=Budget(requests=3))
    with pytest.raises(CurateError):
        engine.run(questions(10))
    assert engine.usage.answered == 0
    results = engine.run(questions(10))  # the key is fixed now: nothing was answered, 3 may be
    assert sum(isinstance(r, Answer) for r in results) == 3


# 6. concurrency and 7. rate limits ---------------------------------------------------------------


def most_in_flight(log: list[dict]) -> int:
    events = sorted([(e["received"], 1) for e in log] + [(e["answered"], -1) for e in log])
    now = peak = 0
    for _, step in events:
        now += step
        peak = max(peak, now)
    return peak


@pytest.mark.parametrize("provider", PROVIDERS)
def test_concurrency_limit(serve, tmp_path, provider):
    fake = serve(latency=0.2)
    engine = engine_for(fake.url, tmp_path, provider, concurrency=8)
    start = time.monotonic()
    results = engine.run(questions(40))
    elapsed = time.monotonic() - start
    assert all(isinstance(r, Answer) for r in results) and len(fake.log) == 40
    assert 4 < most_in_flight(fake.log) <= 8
    assert elapsed >= 1.0  # five waves of eight: the limit held (the server saw at most eight at once)


def test_requests_per_minute(serve, tmp_path):
    fake = serve()
    engine = engine_for(fake.url, tmp_path, concurrency=16, requests_per_minute=120)
    start = time.time()
    results = engine.run(questions(14))
    assert all(isinstance(r, Answer) for r in results) and len(fake.log) == 14
    received = [t - start for t in sorted(e["received"] for e in fake.log)]
    # a bucket of 10 (5 s at 2 a second) goes at once (paced, the 10th would wait 4.5 s), then one
    # every 0.5 s: the 11th at 0.5 s, the 14th at 2 s
    assert received[9] < 3.0  # paced from the start, the 10th would go at 4.5 s
    assert received[10] >= 0.45
    assert received[13] >= 1.9


def test_requests_per_minute_holds_across_runs(serve, tmp_path):
    fake = serve()
    engine = engine_for(fake.url, tmp_path, concurrency=16, requests_per_minute=120)
    start = time.time()
    engine.run(questions(10))
    engine.run(questions(4, "more"))
    assert max(e["received"] for e in fake.log) - start >= 1.9  # not all 14 at once


def test_tokens_per_minute(serve, tmp_path):
    fake = serve()
    # each request reserves 5 + 10 = 15 tokens; 1,800 a minute is 30 a second, a bucket of 150
    engine = engine_for(fake.url, tmp_path, concurrency=16, max_tokens=10, tokens_per_minute=1800)
    start = time.time()
    results = engine.run(questions(13))
    assert all(isinstance(r, Answer) for r in results) and len(fake.log) == 13
    received = [t - start for t in sorted(e["received"] for e in fake.log)]
    assert received[9] < 3.0  # 10 x 15 = 150 at once (paced from the start: the 10th at 4.5 s)
    assert received[10] >= 0.45 and received[12] >= 1.4  # then one every 0.5 s


# 8. a killed run resumes -------------------------------------------------------------------------

KILLED_SCRIPT = """
import sys
from pathlib import Path

from tests.test_llm_engine import engine_for, questions

url, cache_dir = sys.argv[1], Path(sys.argv[2])
engine_for(url, cache_dir, concurrency=1).run(questions(30))
print("finished")
"""


def test_killed_run_resumes_without_repeating(serve, tmp_path):
    script = tmp_path / "run_engine.py"
    script.write_text(textwrap.dedent(KILLED_SCRIPT))
    cache_dir = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": str(REPO), KEY_ENV: KEY}
    fake = serve(latency=0.01)
    proc = subprocess.Popen(
        [sys.executable, str(script), fake.url, str(cache_dir)],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    fake.kill_at = (proc.pid, 12)
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -9, (out, err)
    assert b"finished" not in out
    assert len(fake.log) == 12
    first_run = [contents(e["body"]) for e in fake.log]
    assert first_run == [[f"q{i}"] for i in range(12)]
    assert len(RequestCache(cache_dir / "r.sqlite")) == 11  # each answer stored before the next went out

    engine = engine_for(fake.url, cache_dir, concurrency=1)
    results = engine.run(questions(30))
    assert all(isinstance(r, Answer) for r in results)
    assert [r.cached for r in results] == [True] * 11 + [False] * 19
    second_run = [contents(e["body"]) for e in fake.log[12:]]
    assert len(second_run) == 30 - 11
    assert not any(body in first_run[:11] for body in second_run)
    assert second_run == [[f"q{i}"] for i in range(11, 30)]
    assert engine.usage.cached == 11 and engine.usage.answered == 19


def test_anthropic_keys_hold_only_what_is_sent(serve, tmp_path):
    """This SDK's Messages API may have no temperature: then it is not sent, and two runs that differ
    only in it are one request (a key must not promise a sampling the provider never got)."""
    from curate.llm.providers import AnthropicProvider

    fake = serve()
    engine_for(fake.url, tmp_path, "anthropic", temperature=0.0).run(questions(3))
    engine_for(fake.url, tmp_path, "anthropic", temperature=0.7).run(questions(3))
    takes_temperature = "temperature" in AnthropicProvider._accepted()
    assert len(fake.log) == (6 if takes_temperature else 3)
    assert all(("temperature" in e["body"]) == takes_temperature for e in fake.log)


class _BatchRecorder:
    """A provider that generates in batches (as the local one does) and records each batch."""

    batch_size = 4

    def __init__(self) -> None:
        self.batches: list[list[dict]] = []

    def identity(self) -> dict:
        return {"provider": "recorder"}

    def sent(self, params: dict) -> dict:
        return params

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def send(self, requests: list[Request], params: list[dict]) -> list[Answer]:
        self.batches.append(params)
        return [Answer(f"{r.messages[-1]['content']}!", 1, 1) for r in requests]


def test_local_batches_never_mix_sampling_settings(tmp_path):
    """A judge's greedy 8-token asks and 256-token sampled answers are generated in separate batches."""
    provider = _BatchRecorder()
    cfg = LLMConfig(provider="local", model="x", temperature=0.7, max_tokens=256)
    engine = RequestEngine(provider, cfg, RequestCache(tmp_path / "r.sqlite"))
    asks = [Request(user(f"answer {i}")) for i in range(6)]
    asks += [Request(user(f"judge {i}"), max_tokens=8, temperature=0.0) for i in range(5)]
    results = engine.run(asks)
    assert [r.text for r in results] == [f"{r.messages[-1]['content']}!" for r in asks]
    assert sorted(len(b) for b in provider.batches) == [1, 2, 4, 4]
    for batch in provider.batches:
        assert len({(p["temperature"], p["max_tokens"]) for p in batch}) == 1
