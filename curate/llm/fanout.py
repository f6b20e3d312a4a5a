"""One stage's LLM requests answered by several generation workers (Ray actors on the Ray engine),
each with its own bounded concurrency, within the stage's one budget.

The stage keeps deciding where it is (the driver) and sees the engine it always sees: `run(requests)`
answers in request order, so every order-dependent choice (which operation, which sample, which
records) is made from the same answers in the same order as on one machine, and the version is the
same. Only what the driver's request cache lacks goes out, cut into shards. A worker answers one
shard at a time with a `RequestEngine` of its own: the stage's `concurrency` in flight, an even
share of its rate limits (those are the provider account's), no budget, and each answer stored in
the request cache as it arrives. At most `workers x concurrency` requests are in flight.

The budget stays on the driver. A request joins a shard only if what was spent plus the worst that
every admitted, unanswered request can cost leaves room for its own worst (the check the one-process
engine makes before each send); holds are taken back as shards return. A request that does not fit
while shards are out waits for them; one that does not fit with none out never will, and it and
every request after it are unsent. So the workers together never spend more than the budget.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, wait
from typing import Any, Protocol

from curate.errors import CurateError
from curate.llm.config import LLMConfig
from curate.llm.engine import Answer, Failure, Request, RequestEngine

# A shard is this many times what a worker holds in flight: long enough that its tail (the last
# requests finishing one by one) is a small share of its time, short enough that the budget and the
# progress line are revisited often.
SHARD_ROUNDS = 8
ATTEMPTS = ("requests", "retries", "failed")  # what only the worker that sent a request can count

Shard = tuple[list[Answer | Failure], dict[str, int]]  # answers in order, and the attempts they took


class Workers(Protocol):
    """Where shards go: `count` workers, each given one shard at a time."""

    count: int

    def submit(
        self, worker: int, config: LLMConfig, requests: list[Request], environment: dict[str, str]
    ) -> Future[Shard]:
        """Have `worker` answer `requests` with `config` (see `ShardWorker.answer`)."""
        ...


def worker_config(config: LLMConfig, workers: int) -> LLMConfig:
    """The config one of `workers` workers sends with: the stage's, without the budget (the driver
    admits every request within it) and with an even share of each rate limit (at least one)."""

    def share(limit: int | None) -> int | None:
        return None if limit is None else max(1, limit // workers)

    return dataclasses.replace(
        config,
        budget=None,
        requests_per_minute=share(config.requests_per_minute),
        tokens_per_minute=share(config.tokens_per_minute),
    )


class ShardWorker:
    """A generation worker: one request engine per config, kept from shard to shard (its rate limits
    hold across shards, a local model loads once), answering from and into the request cache at
    `context.shared_cache`, which must be the driver's folder on the same machine (docs/ray.md)."""

    def __init__(self, context: Any) -> None:
        self.context = context
        self._engines: dict[str, RequestEngine] = {}

    def answer(self, config: LLMConfig, requests: list[Request], environment: dict[str, str]) -> Shard:
        """Answers to `requests` in order, and the attempts they took. `environment` is what the
        provider needs from the driver's (its API key), which a process elsewhere does not have."""
        os.environ.update(environment)
        name = json.dumps(dataclasses.asdict(config), sort_keys=True, default=str)
        engine = self._engines.get(name)
        if engine is None:
            engine = self._engines[name] = self.context.llm_engine(config)
        before = {k: getattr(engine.usage, k) for k in ATTEMPTS}
        results = engine.run(requests)
        return results, {k: getattr(engine.usage, k) - before[k] for k in ATTEMPTS}


class FanOutEngine(RequestEngine):
    """A request engine whose requests are sent by `workers`; the budget, the counting and the
    answers' order are its own, as in one process."""

    def __init__(
        self,
        provider: Any,
        config: LLMConfig,
        cache: Any,
        workers: Workers,
        status: Any = None,
        seed: int = 0,
    ) -> None:
        super().__init__(provider, config, cache, status=status, seed=seed)
        self.workers = workers
        self.worker_config = worker_config(config, workers.count)

    def _send(self, todo: dict[str, tuple[Request, dict]]) -> dict[str, Answer | Failure]:
        batch = max(1, getattr(self.provider, "batch_size", 1))
        size = SHARD_ROUNDS * (batch if batch > 1 else self.config.concurrency)
        environment = self.provider.environment()
        pending = deque(todo.items())
        out: dict[str, Answer | Failure] = {}
        running: dict[Future, tuple[int, list]] = {}
        idle = list(range(self.workers.count))[::-1]
        while True:
            while idle and pending:
                shard = self._admit(pending, size)
                if not shard:
                    break  # the budget has no room now: wait for the shards out, or stop
                worker = idle.pop()
                requests = [request for _, (request, _) in shard]
                future = self.workers.submit(worker, self.worker_config, requests, environment)
                running[future] = (worker, shard)
            if not running:
                break
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            fatal = None
            for future in done:
                worker, shard = running.pop(future)
                idle.append(worker)
                try:
                    self._returned(shard, future.result(), out)
                except CurateError as exc:  # after the answers that came back with it are counted
                    fatal = fatal or exc
            if fatal is not None:
                raise fatal
            self._show(len(out), len(todo))
        for key, _ in pending:
            out[key] = Failure("budget", "the stage's budget was spent")
        self.usage.budget_exhausted = self.usage.budget_exhausted or bool(pending)
        self.usage.unsent += len(pending)
        return out

    def _admit(self, pending: deque, size: int) -> list:
        """The next requests in order, up to `size`, while the budget allows each (held until answered)."""
        shard = []
        while pending and len(shard) < size and self._allows(pending[0][1][0]):
            key, item = pending.popleft()
            self._hold(key, item[0])
            shard.append((key, item))
        return shard

    def _returned(self, shard: list, returned: Shard, out: dict) -> None:
        """Count a shard's answers as the one-process engine counts its own, and keep them in this
        process's request cache too (on another machine, the worker's cache is not this one)."""
        results, attempts = returned
        stored = []
        for (key, (request, described)), result in zip(shard, results, strict=True):
            self._release(key)
            out[key] = result
            if isinstance(result, Answer):
                stored.append((key, described, result.stored()))
                if result.cached:
                    self.usage.cached += 1
                else:
                    self._count(result, request)
        for name, n in attempts.items():
            setattr(self.usage, name, getattr(self.usage, name) + n)
        if self.cache is not None:
            self.cache.put_many(stored)
