"""Preference pairs: a prompt with a chosen and a rejected answer (DPO / reward-model data).

The prompt is a ShareGPT or OpenAI message list (LLaMA-Factory `conversations`) or a `prompt` (text
or messages, TRL style); each answer is one message, a message list, or text. Answers that repeat the
prompt (full conversations, as in UltraFeedback) are recognised by their shared prefix.
"""

from __future__ import annotations

from typing import Any

from curate.formats.base import FormatOptions, RecordError, preference_pair, register, require_text, rest
from curate.formats.turns import chat, content_text, convert_turns, list_key, tools_of
from curate.records import message


def is_preference(row: dict) -> bool:
    return "chosen" in row and "rejected" in row


def answer_turns(value: Any, what: str) -> list[dict]:
    if isinstance(value, str):
        return [message("assistant", value)]
    if isinstance(value, dict):
        return convert_turns([value])[0]
    if isinstance(value, list):
        return convert_turns(value)[0]
    raise RecordError(f"{what} is {type(value).__name__}, expected text, a message or a message list")


def prompt_turns(row: dict) -> tuple[list[dict], Any, dict | None, tuple[str, ...]]:
    """The prompt's messages, tools, per-message leftovers and the keys it used."""
    prompt = row.get("prompt")
    if prompt is not None:
        if isinstance(prompt, list):
            messages, extras = convert_turns(prompt)
        else:
            messages, extras = [message("user", content_text(prompt))], None
        system = row.get("system")
        if system:
            messages.insert(0, message("system", content_text(system)))
        used = ("prompt", "system", "tools")
        key = list_key(row)
        if key and row[key] == row["chosen"]:  # UltraFeedback repeats the chosen conversation
            used += (key,)
        return messages, tools_of(row.get("tools")), extras, used
    key = list_key(row)
    if key is None:
        return [], tools_of(row.get("tools")), None, ("system", "tools")
    messages, tools, extras = chat(row, key)
    return messages, tools, extras, (key, "system", "tools")


def full(prompt: list[dict], answer: list[dict]) -> list[dict]:
    return answer if prompt and answer[: len(prompt)] == prompt else prompt + answer


@register("preference", "prompt or conversation with chosen and rejected answers (DPO)", is_preference, 30)
def convert(row: dict, options: FormatOptions) -> list[dict]:
    prompt, tools, extras, used = prompt_turns(row)
    chosen = full(prompt, answer_turns(row["chosen"], "chosen"))
    rejected_full = full(prompt, answer_turns(row["rejected"], "rejected"))
    messages, rejected = preference_pair(chosen, rejected_full)
    meta = rest(row, (*used, "chosen", "rejected"), extras)
    return [{"messages": require_text(messages), "rejected": rejected, "tools": tools, "meta": meta}]
