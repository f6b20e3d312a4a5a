"""LLM providers behind one small client, with a durable request cache so no paid request is made twice."""

from curate.llm.client import LLMClient, Usage

__all__ = ["LLMClient", "Usage"]
