"""One chat-completion call for every provider: OpenAI (or any OpenAI-compatible base_url) and Anthropic.

Answers go through the durable request cache first. The API key is read from an environment
variable at call time and handed to the SDK only; it is never part of a cache key, a log or an
error message. The SDKs are imported when the first uncached request is made.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from curate.errors import CurateError
from curate.llm.cache import RequestCache

PROVIDERS = ("openai", "anthropic")
_DEFAULT_KEY_ENV = {"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY"}


@dataclass
class Usage:
    requests: int = 0  # requests actually sent
    cached: int = 0  # requests answered from the cache
    input_tokens: int = 0
    output_tokens: int = 0


class LLMClient:
    def __init__(
        self,
        provider: str,
        model: str,
        cache_dir: Path,
        base_url: str = "",
        api_key_env: str = "",
        max_tokens: int = 16,
        temperature: float = 0.0,
    ) -> None:
        if provider not in PROVIDERS:
            raise CurateError(f"unknown LLM provider {provider!r}", hint=f"one of {', '.join(PROVIDERS)}")
        if not model:
            raise CurateError("an LLM model name is required", hint="e.g. gpt-4o-mini or claude-haiku-4-5")
        self.provider, self.model, self.base_url = provider, model, base_url
        self.api_key_env = api_key_env or _DEFAULT_KEY_ENV[provider]
        self.max_tokens, self.temperature = max_tokens, temperature
        self.cache = RequestCache(Path(cache_dir) / "llm" / "requests.sqlite")
        self.usage = Usage()
        self._sdk = None

    def complete(self, messages: list[dict]) -> str:
        """The model's reply text to a chat (list of {role, content}), from the cache when asked before."""
        request = {
            "provider": self.provider,
            "base_url": self.base_url,
            "model": self.model,
            "messages": messages,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
        }
        answer = self.cache.get(request)
        if answer is not None:
            self.usage.cached += 1
            return answer["text"]
        answer = self._send(messages)
        self.cache.put(request, answer)
        self.usage.requests += 1
        self.usage.input_tokens += answer["input_tokens"]
        self.usage.output_tokens += answer["output_tokens"]
        return answer["text"]

    def _client(self):
        if self._sdk is None:
            key = os.environ.get(self.api_key_env)
            if not key:
                raise CurateError(
                    f"no API key: the environment variable {self.api_key_env} is not set",
                    hint="export it before the run; keys are never read from recipes",
                )
            kwargs = {"api_key": key, **({"base_url": self.base_url} if self.base_url else {})}
            if self.provider == "openai":
                import openai

                self._sdk = openai.OpenAI(**kwargs)
            else:
                import anthropic

                self._sdk = anthropic.Anthropic(**kwargs)
        return self._sdk

    def _send(self, messages: list[dict]) -> dict:
        sdk = self._client()
        try:
            if self.provider == "openai":
                reply = sdk.chat.completions.create(
                    model=self.model,
                    messages=messages,
                    max_tokens=self.max_tokens,
                    temperature=self.temperature,
                )
                usage = reply.usage
                return {
                    "text": reply.choices[0].message.content or "",
                    "input_tokens": getattr(usage, "prompt_tokens", 0) or 0,
                    "output_tokens": getattr(usage, "completion_tokens", 0) or 0,
                }
            system = "\n".join(m["content"] for m in messages if m["role"] == "system")
            chat = [m for m in messages if m["role"] != "system"]
            reply = sdk.messages.create(
                model=self.model,
                max_tokens=self.max_tokens,
                temperature=self.temperature,
                messages=chat,
                **({"system": system} if system else {}),
            )
            return {
                "text": "".join(getattr(block, "text", "") for block in reply.content),
                "input_tokens": reply.usage.input_tokens,
                "output_tokens": reply.usage.output_tokens,
            }
        except Exception as exc:  # the SDKs raise their own types; the message is what the user needs
            # an auth error may quote part of the key: never pass it on
            said = re.sub(
                r"\b(sk|key)-[\w*-]+", r"\1-***", str(exc).replace(os.environ[self.api_key_env], "***")
            )
            raise CurateError(
                f"{self.provider} request to model {self.model} failed: {type(exc).__name__}: {said}",
                hint="check the model name, base_url and the API key's environment variable",
            ) from None
