"""The request engine: many LLM requests, concurrently, within rate limits and a budget, each paid
answer stored before the next requests go out.

`RequestEngine.run(requests)` answers a list of requests in order. Answers already in the durable
cache cost nothing; identical requests are sent once. The rest go out on one asyncio loop with at
most `concurrency` in flight, paced by request and token rate limits, each with a timeout and
retries with exponential backoff on 429, 5xx, timeouts, dropped connections and malformed bodies
(a server's Retry-After wins over the backoff). A budget is checked before every send against what
was spent plus the worst that requests in flight can cost; once the next request could pass it,
nothing more is sent and the requests left get a `Failure("budget")` (prompt tokens are estimated
until answers say how the provider counts them; see `_allows`). An authentication or unknown-model
error ends the run at once (every other request would fail the same way); other errors fail one
request, are never cached, and are counted.
"""

from __future__ import annotations

import asyncio
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

from curate.errors import CurateError
from curate.llm.cache import RequestCache, request_key
from curate.llm.config import LLMConfig


@dataclass
class Request:
    """A chat to complete. `sample` tells apart samples of the same chat (the cache keeps each)."""

    messages: list[dict]  # [{role, content}], a system turn first if any
    sample: int = 0
    max_tokens: int | None = None  # None: the stage's max_tokens
    temperature: float | None = None  # None: the stage's temperature (a judge asks at 0)


@dataclass
class Answer:
    text: str
    input_tokens: int
    output_tokens: int
    finish: str = "stop"  # "stop" or "length" (cut at max_tokens)
    cached: bool = False

    def stored(self) -> dict:
        """What the request cache keeps of it (whether it came from the cache is not the answer's)."""
        return {
            "text": self.text,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "finish": self.finish,
        }


@dataclass
class Failure:
    reason: str  # "budget" (never sent) or "error" (sent, failed after retries)
    message: str = ""


class ProviderError(Exception):
    """An SDK error sorted by what to do: `retry` it, `fail` the one request, or `fatal` (stop)."""

    def __init__(self, kind: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.kind, self.message, self.retry_after = kind, message, retry_after


@dataclass
class Usage:
    """What a stage's requests took. `requests` counts every attempt sent; the budget counts answers."""

    requests: int = 0
    answered: int = 0
    cached: int = 0
    retries: int = 0
    failed: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost: float = 0.0
    budget_exhausted: bool = False
    unsent: int = 0  # requests the budget left unsent

    def as_dict(self) -> dict:
        out = asdict(self)
        out["cost"] = round(self.cost, 6)
        return out


def estimate_tokens(text: str) -> int:
    """Tokens of a text without its tokenizer: about four characters per token (English, BPE)."""
    return max(1, (len(text) + 3) // 4)


def prompt_tokens(messages: list[dict]) -> int:
    return sum(estimate_tokens(m.get("content") or "") + 4 for m in messages)


class _Bucket:
    """A token bucket refilled at `per_minute`, holding at most five seconds' worth (short bursts)."""

    def __init__(self, per_minute: int) -> None:
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, self.rate * 5)
        self.level = self.capacity
        self.stamp = time.monotonic()

    async def take(self, amount: float) -> None:
        amount = min(amount, self.capacity)  # one request larger than the bucket waits for a full one
        while True:
            now = time.monotonic()
            self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
            self.stamp = now
            if self.level >= amount:
                self.level -= amount
                return
            await asyncio.sleep((amount - self.level) / self.rate)


class RequestEngine:
    """Answers requests for one provider and config; `usage` adds up over every `run`."""

    def __init__(
        self,
        provider: Any,
        config: LLMConfig,
        cache: RequestCache | None,
        status: Any = None,
        seed: int = 0,
    ) -> None:
        self.provider = provider
        self.config = config
        self.cache = cache
        self.usage = Usage()
        self.status = status  # callable(text) that shows how the requests go, or None
        self._random = random.Random(seed)  # backoff jitter
        self._reserved = {"tokens": 0, "cost": 0.0, "requests": 0}  # what requests in flight may cost
        self._held: dict[str, tuple[int, float]] = {}  # per request in flight: its tokens and cost held
        self._scale = 1.0  # largest ratio of real to estimated prompt tokens seen (estimates learn)
        # rate limits hold across runs of this engine (a stage runs it several times)
        self._requests_bucket = _Bucket(config.requests_per_minute) if config.requests_per_minute else None
        self._tokens_bucket = _Bucket(config.tokens_per_minute) if config.tokens_per_minute else None

    # what a request is ------------------------------------------------------------------------

    def params(self, request: Request) -> dict:
        cfg = self.config
        return {
            "temperature": cfg.temperature if request.temperature is None else request.temperature,
            "top_p": cfg.top_p,
            "max_tokens": request.max_tokens or cfg.max_tokens,
        }

    def key_of(self, request: Request) -> tuple[str, dict]:
        described = {
            **self.provider.identity(),
            **self.provider.sent(self.params(request)),
            "messages": [{"role": m["role"], "content": m["content"]} for m in request.messages],
            "sample": request.sample,
        }
        return request_key(described), described

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        prices = self.config.prices
        return prices.cost(input_tokens, output_tokens) if prices is not None else 0.0

    # running ----------------------------------------------------------------------------------

    def run(self, requests: list[Request]) -> list[Answer | Failure]:
        """An answer (or a failure) for every request, in order."""
        keyed = [self.key_of(r) for r in requests]
        stored = self.cache.get_many(list({k for k, _ in keyed})) if self.cache is not None else {}
        results: list[Answer | Failure | None] = [None] * len(requests)
        todo: dict[str, tuple[Request, dict]] = {}
        for i, (key, described) in enumerate(keyed):
            if key in stored:
                results[i] = Answer(**stored[key], cached=True)
                self.usage.cached += 1
            else:
                todo.setdefault(key, (requests[i], described))
        if todo:
            answers = self._send(todo)
            for i, (key, _) in enumerate(keyed):
                if results[i] is None:
                    results[i] = answers[key]
        return results  # type: ignore[return-value]

    def _send(self, todo: dict[str, tuple[Request, dict]]) -> dict[str, Answer | Failure]:
        """Answers for the requests the cache did not have, sent from this process (an engine that
        fans them out to other processes overrides this: curate.llm.fanout)."""
        return _run_coroutine(self._send_all(todo))

    def _worst(self, request: Request) -> tuple[int, float]:
        """The most a request can cost: its prompt (estimated, scaled by what answers showed) and
        max_tokens out, in tokens and money."""
        tokens_in = int(prompt_tokens(request.messages) * self._scale + 0.999)
        tokens_out = self.params(request)["max_tokens"]
        return tokens_in + tokens_out, self.cost(tokens_in, tokens_out)

    def _allows(self, request: Request) -> bool:
        """Whether sending `request` keeps the budget whatever it costs. Prompt tokens are estimated
        before the first answer says how the provider counts them; after that the estimate is scaled
        to the largest ratio seen, so only the first requests in flight can pass a token budget, by
        their misestimate. Answered requests count (failed attempts are not billed)."""
        budget = self.config.budget
        if budget is None:
            return True
        reserved, usage = self._reserved, self.usage
        tokens, cost = self._worst(request)
        if budget.requests is not None and usage.answered + reserved["requests"] + 1 > budget.requests:
            return False
        spent_tokens = usage.input_tokens + usage.output_tokens + reserved["tokens"]
        if budget.tokens is not None and spent_tokens + tokens > budget.tokens:
            return False
        if budget.cost is not None:
            return usage.cost + reserved["cost"] + cost <= budget.cost
        return True

    def _hold(self, key: str, request: Request) -> None:
        tokens, cost = self._held[key] = self._worst(request)
        self._reserved["requests"] += 1
        self._reserved["tokens"] += tokens
        self._reserved["cost"] += cost

    def _release(self, key: str) -> None:
        tokens, cost = self._held.pop(key, (None, None))
        if tokens is not None:
            self._reserved["requests"] -= 1
            self._reserved["tokens"] -= tokens
            self._reserved["cost"] -= cost

    def _count(self, answer: Answer, request: Request) -> None:
        if answer.input_tokens:
            self._scale = max(self._scale, answer.input_tokens / prompt_tokens(request.messages))
        usage = self.usage
        usage.answered += 1
        usage.input_tokens += answer.input_tokens
        usage.output_tokens += answer.output_tokens
        usage.cost += self.cost(answer.input_tokens, answer.output_tokens)

    def _show(self, done: int, total: int) -> None:
        if self.status is not None:
            u = self.usage
            spent = f", cost {u.cost:.4f}" if self.config.prices is not None else ""
            self.status(f"(LLM requests {done:,}/{total:,}, retries {u.retries}, failed {u.failed}{spent})")

    async def _send_all(self, todo: dict[str, tuple[Request, dict]]) -> dict[str, Answer | Failure]:
        batch = max(1, getattr(self.provider, "batch_size", 1))
        limit = 1 if batch > 1 else self.config.concurrency
        items = list(todo.items())
        groups = [items[i : i + 1] for i in range(len(items))] if batch == 1 else self._batches(items, batch)
        out: dict[str, Answer | Failure] = {}
        in_flight: set[asyncio.Task] = set()
        finished: asyncio.Queue = asyncio.Queue()  # tasks as they end: O(1) per answer at any concurrency
        pending = iter(groups)
        stopped = False
        await self.provider.open()
        try:
            while True:
                while not stopped and len(in_flight) < limit:
                    group = next(pending, None)
                    if group is None:
                        break
                    if not all(self._allows(request) for _, (request, _) in group):
                        stopped = self.usage.budget_exhausted = True
                        for key, _ in group:
                            out[key] = Failure("budget", "the stage's budget was spent")
                        break
                    for key, (request, _) in group:
                        self._hold(key, request)
                    task = asyncio.ensure_future(self._one(group))
                    task.keys = [key for key, _ in group]  # type: ignore[attr-defined]
                    task.add_done_callback(finished.put_nowait)
                    in_flight.add(task)
                if not in_flight:
                    break
                done = {await finished.get()}
                while not finished.empty():  # answers that arrived together: one transaction
                    done.add(finished.get_nowait())
                in_flight -= done
                self._finish(done, todo, out)
                self._show(len(out), len(todo))
        except BaseException:
            for task in in_flight:
                task.cancel()
            if in_flight:
                done, _ = await asyncio.wait(in_flight)
                self._finish({t for t in done if not t.cancelled() and t.exception() is None}, todo, out)
                for task in done:
                    for key in task.keys:
                        self._release(key)
            raise
        finally:
            await self.provider.close()
        for group in pending:
            for key, _ in group:
                out[key] = Failure("budget", "the stage's budget was spent")
        self.usage.unsent += sum(isinstance(v, Failure) and v.reason == "budget" for v in out.values())
        return out

    def _batches(self, items: list, size: int) -> list[list]:
        """Local generation: a batch shares its sampling settings (a judge's greedy 8 tokens never
        ride with 256-token sampled answers), and prompts of similar length go together (less
        padding)."""
        by_params: dict[tuple, list] = {}
        for item in items:
            by_params.setdefault(tuple(sorted(self.params(item[1][0]).items(), key=str)), []).append(item)
        batches = []
        for _, same in sorted(by_params.items(), key=lambda kv: str(kv[0])):
            same.sort(key=lambda item: prompt_tokens(item[1][0].messages))
            batches += [same[i : i + size] for i in range(0, len(same), size)]
        return batches

    def _finish(self, done: set[asyncio.Task], todo: dict, out: dict) -> None:
        """Count finished groups and store their answers in one transaction (a fatal error raises,
        after the answers that came with it are stored)."""
        stored, fatal = [], None
        for task in done:
            for key in task.keys:
                self._release(key)
            try:
                results = task.result()
            except ProviderError as exc:
                fatal = fatal or exc
                continue
            for key, result in results:
                out[key] = result
                if isinstance(result, Answer):
                    self._count(result, todo[key][0])
                    stored.append((key, todo[key][1], result.stored()))
        if self.cache is not None:
            self.cache.put_many(stored)
        if fatal is not None:
            raise CurateError(fatal.message, hint="nothing more is sent; the answers received are cached")

    async def _one(self, group: list) -> list[tuple[str, Answer | Failure]]:
        """One request (or one local batch), retried as its errors allow."""
        requests = [request for _, (request, _) in group]
        params = [self.params(r) for r in requests]
        attempt = 0
        while True:
            requests_bucket, tokens_bucket = self._requests_bucket, self._tokens_bucket
            if requests_bucket is not None:
                await requests_bucket.take(len(requests))
            if tokens_bucket is not None:
                wanted = sum(
                    prompt_tokens(r.messages) + p["max_tokens"] for r, p in zip(requests, params, strict=True)
                )
                await tokens_bucket.take(wanted)
            self.usage.requests += len(requests)
            try:
                answers = await asyncio.wait_for(
                    self.provider.send(requests, params), timeout=self.config.timeout * len(requests) + 5
                )
                return [(key, answer) for (key, _), answer in zip(group, answers, strict=True)]
            except asyncio.TimeoutError:
                error = ProviderError("retry", f"no answer within {self.config.timeout:g} s")
            except ProviderError as exc:
                error = exc
            if error.kind == "fatal":
                raise error
            if error.kind == "fail" or attempt >= self.config.max_retries:
                self.usage.failed += len(requests)
                return [(key, Failure("error", error.message)) for key, _ in group]
            self.usage.retries += 1
            attempt += 1
            backoff = min(60.0, 0.5 * 2 ** (attempt - 1)) * (0.5 + self._random.random() / 2)
            await asyncio.sleep(error.retry_after if error.retry_after is not None else backoff)


def _run_coroutine(coroutine) -> Any:
    """Run to completion from sync code, also when the caller is inside an event loop (a notebook)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


def usage_totals(usages: list[Usage]) -> dict:
    """Several usages summed, as numbers (budget_exhausted counts the engines whose budget ran out)."""
    total = {key: 0 for key in asdict(Usage())}
    for usage in usages:
        for key, value in asdict(usage).items():
            total[key] += int(value) if isinstance(value, bool) else value
    total["cost"] = round(total["cost"], 6)
    return total
