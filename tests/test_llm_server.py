"""The fake LLM server (tests/llm_server.py) against the real openai and anthropic SDKs."""

from __future__ import annotations

import asyncio
import http.client
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.llm_server import FakeLLM

openai = pytest.importorskip("openai")
anthropic = pytest.importorskip("anthropic")

MSGS = [{"role": "user", "content": "What is the capital of France?"}]


def oai(fake: FakeLLM, **kw):
    kw.setdefault("max_retries", 0)
    return openai.OpenAI(api_key="sk-test-123", base_url=fake.url + "/v1", **kw)


def ant(fake: FakeLLM, **kw):
    kw.setdefault("max_retries", 0)
    return anthropic.Anthropic(api_key="ak-test-456", base_url=fake.url, **kw)


def test_openai_answer_usage_and_log(serve):
    fake = serve()
    raw = oai(fake).chat.completions.with_raw_response.create(model="gpt-x", messages=MSGS)
    assert raw.headers["content-type"] == "application/json"
    assert raw.headers["x-request-id"] == "req_fake_1"
    r = raw.parse()
    assert r.object == "chat.completion" and r.model == "gpt-x"
    assert r.choices[0].message.role == "assistant"
    text = r.choices[0].message.content
    assert text.startswith("Answer to: What is the capital of France?")
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens == 6
    assert r.usage.completion_tokens == len(text.split())
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # deterministic
    again = oai(fake).chat.completions.create(model="gpt-x", messages=MSGS)
    assert again.choices[0].message.content == text
    (e, _) = fake.log
    assert e["n"] == 1 and e["path"] == "/v1/chat/completions" and e["api"] == "openai"
    assert e["key"] == "sk-test-123" and e["status"] == 200 and e["fault"] is None
    assert e["body"]["messages"] == MSGS
    assert e["received"] <= e["answered"]
    assert fake.answered() == [e["body"], fake.log[1]["body"]]


def test_openai_n_choices_and_custom_responder(serve):
    seen = []

    def responder(body, api):
        seen.append((body.get("_choice"), api))
        return f"reply {body.get('_choice')} to {body['messages'][-1]['content']}"

    fake = serve(responder=responder)
    r = oai(fake).chat.completions.create(model="m", messages=[{"role": "user", "content": "x y"}], n=2)
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.message.content for c in r.choices] == ["reply 0 to x y", "reply 1 to x y"]
    assert r.usage.completion_tokens == 10
    assert seen == [(0, "openai"), (1, "openai")]
    assert "_choice" not in fake.log[0]["body"]  # the responder got a copy


def test_max_tokens_cut(serve):
    fake = serve(responder=lambda body, api: "one two three four five six")
    r = oai(fake).chat.completions.create(model="m", messages=MSGS, max_tokens=3)
    assert r.choices[0].message.content == "one two three"
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3
    r = oai(fake).chat.completions.create(model="m", messages=MSGS, max_completion_tokens=2)
    assert r.choices[0].message.content == "one two"
    r = oai(fake).chat.completions.create(model="m", messages=MSGS, max_tokens=10)
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == 6
    m = ant(fake).messages.create(model="c", max_tokens=4, messages=MSGS)
    assert m.content[0].text == "one two three four"
    assert m.stop_reason == "max_tokens" and m.usage.output_tokens == 4
    m = ant(fake).messages.create(model="c", max_tokens=100, messages=MSGS)
    assert m.stop_reason == "end_turn" and m.usage.output_tokens == 6


def test_rate_limit_and_server_errors(serve):
    fake = serve(faults=[{"status": 429, "retry_after": 1.5}, {"status": 500}, {"status": 503}])
    client = oai(fake)
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="m", messages=MSGS)
    assert info.value.status_code == 429
    assert info.value.response.headers["retry-after"] == "1.5"
    assert info.value.body["type"] == "requests" and info.value.code == "rate_limit_exceeded"
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model="m", messages=MSGS)
    assert info.value.status_code == 500 and info.value.body["type"] == "server_error"
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model="m", messages=MSGS)
    assert info.value.status_code == 503
    # the faults are used up: normal answers again
    assert client.chat.completions.create(model="m", messages=MSGS).choices[0].message.content
    assert [e["status"] for e in fake.log] == [429, 500, 503, 200]
    assert fake.log[0]["fault"] == {"status": 429, "retry_after": 1.5}
    assert len(fake.answered()) == 1


def test_anthropic_errors(serve):
    fake = serve(faults=[{"status": 429, "retry_after": 2}, {"status": 500}, {"status": 529}])
    client = ant(fake)
    with pytest.raises(anthropic.RateLimitError) as info:
        client.messages.create(model="c", max_tokens=10, messages=MSGS)
    assert info.value.response.headers["retry-after"] == "2"
    assert info.value.body == {
        "type": "error",
        "error": {"type": "rate_limit_error", "message": info.value.body["error"]["message"]},
    }
    with pytest.raises(anthropic.InternalServerError) as info:
        client.messages.create(model="c", max_tokens=10, messages=MSGS)
    assert info.value.body["error"]["type"] == "api_error"
    # 529 is its own subclass of InternalServerError in the anthropic SDK
    with pytest.raises(anthropic.OverloadedError) as info:
        client.messages.create(model="c", max_tokens=10, messages=MSGS)
    assert isinstance(info.value, anthropic.InternalServerError)
    assert info.value.body["error"]["type"] == "overloaded_error"
    assert info.value.response.headers["request-id"] == "req_fake_3"


def test_malformed_body_is_a_plain_json_error(serve):
    # neither SDK wraps it: the JSONDecodeError of response.json() escapes as it is
    fake = serve(faults=[{"malformed": True}, {"malformed": True}])
    with pytest.raises(json.JSONDecodeError):
        oai(fake).chat.completions.create(model="m", messages=MSGS)
    with pytest.raises(json.JSONDecodeError):
        ant(fake).messages.create(model="c", max_tokens=10, messages=MSGS)
    assert [e["status"] for e in fake.log] == [200, 200]
    assert fake.answered() == []


def test_drop_is_a_connection_error(serve):
    fake = serve(faults=[{"drop": True}, {"drop": True}])
    with pytest.raises(openai.APIConnectionError) as info:
        oai(fake).chat.completions.create(model="m", messages=MSGS)
    assert not isinstance(info.value, openai.APITimeoutError)
    with pytest.raises(anthropic.APIConnectionError):
        ant(fake).messages.create(model="c", max_tokens=10, messages=MSGS)
    assert [(e["status"], e["answered"]) for e in fake.log] == [(None, None), (None, None)]


def test_slow_answer_times_out(serve):
    fake = serve(faults=[{"delay": 0.5}])
    t0 = time.monotonic()
    with pytest.raises(openai.APITimeoutError):
        oai(fake, timeout=0.2).chat.completions.create(model="m", messages=MSGS)
    assert time.monotonic() - t0 < 0.45
    # the next request is answered at once, on a fresh connection
    assert oai(fake).chat.completions.create(model="m", messages=MSGS).choices
    assert fake.log[1]["status"] == 200 and fake.log[0]["fault"] == {"delay": 0.5}
    # when its delay is over the server sees the client is gone and sends nothing
    deadline = time.monotonic() + 3
    while not fake.log[0].get("client_gone") and time.monotonic() < deadline:
        time.sleep(0.02)
    assert fake.log[0]["client_gone"] and fake.log[0]["status"] is None and fake.log[0]["answered"] is None
    assert fake.answered() == [fake.log[1]["body"]]


def test_delay_without_timeout_and_latency(serve):
    fake = serve(latency=0.05, faults=[{"delay": 0.25}])
    t0 = time.monotonic()
    oai(fake).chat.completions.create(model="m", messages=MSGS)
    assert 0.25 <= time.monotonic() - t0 < 1.5
    t0 = time.monotonic()
    oai(fake).chat.completions.create(model="m", messages=MSGS)
    assert 0.05 <= time.monotonic() - t0 < 0.25
    assert len(fake.answered()) == 2


def test_anthropic_system_and_validation(serve):
    fake = serve()
    client = ant(fake)
    m = client.messages.create(model="claude-x", max_tokens=200, system="Be brief and exact.", messages=MSGS)
    assert m.type == "message" and m.role == "assistant" and m.model == "claude-x"
    assert m.content[0].type == "text" and m.content[0].text.startswith("Answer to: What is the capital")
    assert m.stop_reason == "end_turn" and m.stop_sequence is None
    assert m.usage.input_tokens == 4 + 6 and m.usage.output_tokens == len(m.content[0].text.split())
    assert fake.log[0]["key"] == "ak-test-456" and fake.log[0]["body"]["system"] == "Be brief and exact."
    with pytest.raises(anthropic.BadRequestError) as info:
        client.messages.create(
            model="c", max_tokens=10, messages=[{"role": "system", "content": "no"}, *MSGS]
        )
    assert info.value.status_code == 400
    assert info.value.body["error"]["type"] == "invalid_request_error"
    # content as a list of blocks
    m = client.messages.create(
        model="c",
        max_tokens=50,
        messages=[{"role": "user", "content": [{"type": "text", "text": "blocks here"}]}],
    )
    assert m.content[0].text.startswith("Answer to: blocks here") and m.usage.input_tokens == 2


def test_openai_validation_and_404(serve):
    fake = serve()
    with pytest.raises(openai.BadRequestError) as info:
        oai(fake).chat.completions.create(model="m", messages=[])
    assert info.value.body["type"] == "invalid_request_error" and "messages" in info.value.message
    with pytest.raises(openai.BadRequestError):
        oai(fake).chat.completions.create(model="", messages=MSGS)
    with pytest.raises(openai.NotFoundError):
        oai(fake).embeddings.create(model="m", input="x")
    assert [e["status"] for e in fake.log] == [400, 400, 404]
    assert fake.log[2]["api"] is None


def test_fault_for_by_content(serve):
    def fault_for(body):
        return {"status": 500} if "boom" in body["messages"][-1]["content"] else None

    fake = serve(fault_for=fault_for, faults=[{"status": 429}])
    client = oai(fake)
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "boom"}])
    with pytest.raises(openai.RateLimitError):  # the queue was left for the next request
        client.chat.completions.create(model="m", messages=MSGS)
    assert client.chat.completions.create(model="m", messages=MSGS).choices
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "boom again"}])


def test_sdks_retry_by_default(serve):
    # both SDKs default to max_retries=2 and honour retry-after(-ms); they tell the attempt in a header
    fast = {"status": 500, "retry_after_ms": 10}
    fake = serve(faults=[fast, {"status": 529, "retry_after": 0.01}])
    r = openai.OpenAI(api_key="k", base_url=fake.url + "/v1").chat.completions.create(
        model="m", messages=MSGS
    )
    assert r.choices[0].message.content
    fake.faults.append(fast)
    m = anthropic.Anthropic(api_key="k", base_url=fake.url).messages.create(
        model="c", max_tokens=50, messages=MSGS
    )
    assert m.content[0].text
    retries = [e["headers"].get("x-stainless-retry-count") for e in fake.log]
    assert retries == ["0", "1", "2", "0", "1"]
    assert [e["status"] for e in fake.log] == [500, 529, 200, 500, 200]


def test_kill_at_kills_the_process(serve):
    child = subprocess.Popen(["sleep", "30"])
    try:
        fake = serve(kill_at=(child.pid, 2))
        client = oai(fake)
        client.chat.completions.create(model="m", messages=MSGS)
        assert child.poll() is None
        client.chat.completions.create(model="m", messages=MSGS)  # the 2nd request: kill, then answer
        assert child.wait(timeout=5) == -9
        assert len(fake.answered()) == 2
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_http_details_chunked_and_connection_close(serve):
    fake = serve()
    conn = http.client.HTTPConnection("127.0.0.1", fake.port, timeout=5)
    body = json.dumps({"model": "m", "messages": MSGS}).encode()
    chunks = iter([body[:10], body[10:]])
    conn.request(
        "POST",
        "/v1/chat/completions",
        body=chunks,
        headers={"Content-Type": "application/json", "x-api-key": "chunky"},
        encode_chunked=True,
    )
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Connection") == "keep-alive"
    assert json.loads(resp.read())["choices"][0]["message"]["content"].startswith("Answer to:")
    # same connection, then Connection: close
    conn.request("POST", "/v1/messages", body=b"{not json", headers={"Connection": "close"})
    resp = conn.getresponse()
    assert resp.status == 400 and resp.getheader("Connection") == "close"
    assert json.loads(resp.read())["type"] == "error"
    assert resp.will_close
    conn.close()
    conn = http.client.HTTPConnection("127.0.0.1", fake.port, timeout=5)
    conn.request("GET", "/nothing")
    resp = conn.getresponse()
    assert resp.status == 404 and resp.getheader("Content-Type") == "application/json"
    assert resp.getheader("x-request-id") == "req_fake_3"
    json.loads(resp.read())
    conn.close()
    assert [e["key"] for e in fake.log] == ["chunky", None, None]
    assert fake.log[0]["body"]["model"] == "m"


def test_async_clients_concurrency(serve):
    fake = serve(latency=0.2)

    async def run() -> tuple[float, list]:
        client = openai.AsyncOpenAI(api_key="sk-async", base_url=fake.url + "/v1", max_retries=0)
        aclient = anthropic.AsyncAnthropic(api_key="ak-async", base_url=fake.url, max_retries=0)
        t0 = time.monotonic()
        results = await asyncio.gather(
            *(
                client.chat.completions.create(model="m", messages=[{"role": "user", "content": f"q{i}"}])
                for i in range(200)
            ),
            aclient.messages.create(model="c", max_tokens=50, messages=MSGS),
        )
        elapsed = time.monotonic() - t0
        await client.close()
        await aclient.close()
        return elapsed, results

    _, results = asyncio.run(run())
    # served at once, not one after another: many requests were inside the server together
    events = sorted([(e["received"], 1) for e in fake.log] + [(e["answered"], -1) for e in fake.log])
    inside = peak = 0
    for _, step in events:
        inside += step
        peak = max(peak, inside)
    assert peak >= 50, peak
    texts = {r.choices[0].message.content for r in results[:200]}
    assert len(texts) == 200 and all(t.startswith("Answer to: q") for t in texts)
    assert results[200].content[0].text.startswith("Answer to: What")
    assert len(fake.answered()) == 201


def test_runs_as_a_process():
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("llm_server.py")), "--latency", "0.05"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("READY http://127.0.0.1:")
        url = line.split()[1]
        r = openai.OpenAI(api_key="k", base_url=url + "/v1", max_retries=0).chat.completions.create(
            model="m", messages=MSGS
        )
        assert r.choices[0].message.content.startswith("Answer to: What")
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
