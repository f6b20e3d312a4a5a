"""LLM requests for generating stages: providers (openai, anthropic, local), the concurrent request
engine with rate limits, retries and a budget, and the durable request cache."""

from curate.llm.cache import RequestCache
from curate.llm.config import Budget, LLMConfig, Prices
from curate.llm.engine import Answer, Failure, Request, RequestEngine, Usage, usage_totals
from curate.llm.providers import make_provider

__all__ = [
    "Answer",
    "Budget",
    "Failure",
    "LLMConfig",
    "Prices",
    "Request",
    "RequestCache",
    "RequestEngine",
    "Usage",
    "make_provider",
    "usage_totals",
]
