"""Chat templates that say which characters are trained: the rendered text plus its trained spans.

Loss masks come from here, not from `{% generation %}` markers: `render` returns the conversation as
the model sees it and the character spans of every assistant turn's content plus its end-of-turn
marker. The trainer maps those spans onto token offsets, so any tokenizer, with or without markers
in its own template, gets assistant-only loss that also teaches the model to stop.

Two named templates are built in (`chatml`, `llama-3`). Any other value names a Hugging Face
tokenizer (a folder or hub id, or a loaded tokenizer): its own `apply_chat_template` renders, and
the spans come from rendering each prefix of the conversation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from curate.errors import CurateError

TEMPLATE_NAMES = ("chatml", "llama-3")
ROLES = ("system", "user", "assistant", "tool")


class UnrenderableError(ValueError):
    """This conversation cannot be rendered for training (the normalize stage drops it with the reason)."""


@dataclass(frozen=True)
class TemplateTokens:
    """The special tokens a named template writes, and the one that ends an assistant turn."""

    special: tuple[str, ...]
    end_of_turn: str
    begin: str = ""  # written once at the start of every conversation


TOKENS = {
    "chatml": TemplateTokens(special=("<|im_start|>", "<|im_end|>"), end_of_turn="<|im_end|>"),
    "llama-3": TemplateTokens(
        special=("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        end_of_turn="<|eot_id|>",
        begin="<|begin_of_text|>",
    ),
}


@dataclass
class Rendered:
    """A rendered conversation and the [start, end) character spans that carry loss."""

    text: str
    spans: list[tuple[int, int]] = field(default_factory=list)

    def trained_text(self) -> list[str]:
        return [self.text[a:b] for a, b in self.spans]


def render(messages: list[dict], template: str | Any, *, add_generation_prompt: bool = False) -> Rendered:
    """Render `messages` with a named template or a tokenizer's own; spans mark the trained text.

    With `add_generation_prompt` the text ends where the model's next assistant turn begins (for
    generation), and spans still mark earlier assistant turns.
    """
    if not messages:
        raise UnrenderableError("empty conversation")
    for m in messages:
        if m.get("role") not in ROLES:
            raise UnrenderableError(f"unknown role {m.get('role')!r}")
    if not add_generation_prompt and not any(m["role"] == "assistant" for m in messages):
        raise UnrenderableError("no assistant turn: nothing to train on")
    if isinstance(template, str) and template in TEMPLATE_NAMES:
        return _render_named(messages, template, add_generation_prompt)
    return _render_tokenizer(messages, _tokenizer(template), add_generation_prompt)


def end_of_turn(template: str | Any) -> str:
    """The token that closes an assistant turn (a named template's marker, else the tokenizer's EOS)."""
    if isinstance(template, str) and template in TEMPLATE_NAMES:
        return TOKENS[template].end_of_turn
    tok = _tokenizer(template)
    if tok.eos_token is None:
        raise CurateError("the tokenizer has no EOS token", hint="set eos_token in its tokenizer_config.json")
    return tok.eos_token


def special_tokens(template: str | Any) -> tuple[str, ...]:
    """Special tokens the template writes (the tokenizer must know them as single tokens)."""
    if isinstance(template, str) and template in TEMPLATE_NAMES:
        return TOKENS[template].special
    return ()


def _tool_calls_text(calls: Any, style: str) -> str:
    if isinstance(calls, str):
        calls = json.loads(calls)
    parts = []
    for call in calls or []:
        fn = call.get("function", call)
        args = fn.get("arguments", fn.get("parameters", {}))
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                pass
        payload = {"name": fn.get("name"), "arguments" if style == "chatml" else "parameters": args}
        text = json.dumps(payload, ensure_ascii=False)
        parts.append(f"<tool_call>\n{text}\n</tool_call>" if style == "chatml" else text)
    return "\n".join(parts)


def _assistant_body(m: dict, style: str) -> str:
    content = m.get("content") or ""
    if style == "llama-3":
        content = content.strip()
    calls = m.get("tool_calls")
    if calls:
        call_text = _tool_calls_text(calls, style)
        content = f"{content}\n{call_text}" if content else call_text
    return content


def _render_named(messages: list[dict], name: str, add_generation_prompt: bool) -> Rendered:
    chunks: list[str] = [TOKENS[name].begin]
    spans: list[tuple[int, int]] = []
    pos = len(chunks[0])
    for m in messages:
        role = m["role"]
        if name == "chatml":
            head, eot, tail = f"<|im_start|>{role}\n", "<|im_end|>", "\n"
            body = _assistant_body(m, name) if role == "assistant" else m.get("content") or ""
            if role == "tool":
                body = f"<tool_response>\n{body}\n</tool_response>"
        else:
            header_role = "ipython" if role == "tool" else role
            head, eot, tail = f"<|start_header_id|>{header_role}<|end_header_id|>\n\n", "<|eot_id|>", ""
            body = _assistant_body(m, name) if role == "assistant" else (m.get("content") or "").strip()
        start = pos + len(head)
        chunk = head + body + eot + tail
        if role == "assistant":
            spans.append((start, start + len(body) + len(eot)))
        chunks.append(chunk)
        pos += len(chunk)
    if add_generation_prompt:
        chunks.append(
            "<|im_start|>assistant\n"
            if name == "chatml"
            else "<|start_header_id|>assistant<|end_header_id|>\n\n"
        )
    return Rendered("".join(chunks), spans)


@lru_cache(maxsize=8)
def load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise CurateError(
            f"template {path!r} is neither a named template nor a loadable tokenizer: {exc}",
            hint=f"use one of {', '.join(TEMPLATE_NAMES)} or a tokenizer folder with a chat template",
        ) from None


def _tokenizer(template: Any) -> Any:
    tok = load_tokenizer(str(template)) if isinstance(template, str) else template
    if not getattr(tok, "chat_template", None):
        raise CurateError(
            "the tokenizer has no chat template",
            hint=f"name a template instead: {', '.join(TEMPLATE_NAMES)}",
        )
    return tok


def _apply(tok: Any, messages: list[dict], add_generation_prompt: bool) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _render_tokenizer(messages: list[dict], tok: Any, add_generation_prompt: bool) -> Rendered:
    """Spans from prefixes: an assistant turn is what rendering it adds after its generation prompt."""
    messages = [_hf_message(m) for m in messages]
    full = _apply(tok, messages, add_generation_prompt)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = _apply(tok, messages[:i], True) if i else ""
        upto = _apply(tok, messages[: i + 1], False).rstrip()
        if not upto.startswith(prompt) or not full.startswith(upto):
            raise CurateError(
                "this tokenizer's chat template does not render conversations prefix by prefix, "
                "so trained spans cannot be derived from it",
                hint=f"use a named template ({', '.join(TEMPLATE_NAMES)}) in the training recipe",
            )
        if len(upto) > len(prompt):
            spans.append((len(prompt), len(upto)))
    return Rendered(full, spans)


def _hf_message(m: dict) -> dict:
    out = {"role": m["role"], "content": m.get("content") or ""}
    calls = m.get("tool_calls")
    if calls:
        out["tool_calls"] = json.loads(calls) if isinstance(calls, str) else calls
    if m.get("name"):
        out["name"] = m["name"]
    return out
