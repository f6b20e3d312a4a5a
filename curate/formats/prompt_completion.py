"""Prompt/completion and prompt/response pairs (T0 templates, MosaicML llm-foundry, TRL).

The prompt is the user turn as written (templates inside it are data, not framing). A trailing
end-of-text marker on the answer (`<|endoftext|>` in GPT-3-style completion data) is framing and is
removed (option `end_markers`). TRL's conversational form, with message lists, is accepted too.
"""

from __future__ import annotations

from curate.formats.base import FormatOptions, register, require_text, rest, text_of
from curate.formats.turns import convert_turns
from curate.records import message


def _turns(value: object, role: str, what: str) -> list[dict]:
    if isinstance(value, list):
        return convert_turns(value)[0]
    return [message(role, text_of(value, what))]


def _pair(row: dict, answer_key: str, options: FormatOptions) -> list[dict]:
    prompt, answer = row["prompt"], row[answer_key]
    if type(answer) is str:  # the common case, kept cheap: the T0 files alone are 55k rows
        for marker in options.end_markers:
            if answer.endswith(marker):
                answer = answer[: -len(marker)]
                break
        answer_turns = [message("assistant", answer)]
    else:
        answer_turns = _turns(answer, "assistant", answer_key)
    messages = _turns(prompt, "user", "prompt")
    if row.get("system"):
        messages.insert(0, message("system", text_of(row["system"], "system")))
    messages += answer_turns
    meta = None if len(row) == 2 else rest(row, ("prompt", answer_key, "system"))
    return [{"messages": require_text(messages), "meta": meta}]


def is_prompt_completion(row: dict) -> bool:
    return "prompt" in row and "completion" in row


def is_prompt_response(row: dict) -> bool:
    return "prompt" in row and "response" in row


@register("prompt_completion", "prompt / completion pairs", is_prompt_completion, 80)
def convert_completion(row: dict, options: FormatOptions) -> list[dict]:
    return _pair(row, "completion", options)


@register("prompt_response", "prompt / response pairs", is_prompt_response, 81)
def convert_response(row: dict, options: FormatOptions) -> list[dict]:
    return _pair(row, "response", options)
