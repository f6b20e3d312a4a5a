"""Prompt/completion and prompt/response pairs (T0 templates, MosaicML llm-foundry, TRL).

The prompt is the user turn as written (templates inside it are data, not framing). A trailing
end-of-text marker on the answer (`<|endoftext|>` in GPT-3-style completion data) is framing and is
removed (option `end_markers`). TRL's conversational form, with message lists, is accepted too.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.formats.base import (
    BatchConversion,
    FormatOptions,
    register,
    register_batch,
    require_text,
    rest,
    text_of,
    user_assistant_batch,
)
from curate.formats.turns import convert_turns
from curate.records import message


def _turns(value: object, role: str, what: str) -> list[dict]:
    if isinstance(value, list):
        return convert_turns(value)[0]
    return [message(role, text_of(value, what))]


def _pair(row: dict, answer_key: str, options: FormatOptions) -> list[dict]:
    prompt, answer = row["prompt"], row[answer_key]
    if type(answer) is str:
        answer_turns = [message("assistant", _without_end_marker(answer, options.end_markers))]
    else:
        answer_turns = _turns(answer, "assistant", answer_key)
    messages = _turns(prompt, "user", "prompt")
    if row.get("system"):
        messages.insert(0, message("system", text_of(row["system"], "system")))
    messages += answer_turns
    return [{"messages": require_text(messages), "meta": _meta(row, answer_key)}]


def _without_end_marker(answer: str, markers: list[str]) -> str:
    for marker in markers:
        if answer.endswith(marker):
            return answer[: -len(marker)]
    return answer


def _meta(row: dict, answer_key: str) -> dict | None:
    return None if len(row) == 2 else rest(row, ("prompt", answer_key, "system"))


def _pairs(rows: list, answer_key: str, options: FormatOptions) -> BatchConversion:
    """The rows whose prompt and answer are plain text (the T0 files alone are 55k such rows)."""
    candidates = [
        type(r) is dict
        and type(r.get("prompt")) is str
        and type(r.get(answer_key)) is str
        and not r.get("system")
        for r in rows
    ]
    taken = [r for r, ok in zip(rows, candidates, strict=True) if ok]
    answers = pa.array([r[answer_key] for r in taken], pa.string())
    done = np.zeros(len(answers), np.bool_)
    for marker in options.end_markers:  # the first marker an answer ends with is cut, as in _pair
        cut = pc.ends_with(answers, marker).to_numpy(zero_copy_only=False) & ~done
        if cut.any():
            # utf8_slice_codeunits counts code points, as Python's slicing does
            answers = pc.if_else(pa.array(cut), pc.utf8_slice_codeunits(answers, 0, -len(marker)), answers)
            done |= cut
    prompts = pa.array([r["prompt"] for r in taken], pa.string())
    return user_assistant_batch(candidates, prompts, answers, [_meta(r, answer_key) for r in taken])


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


@register_batch("prompt_completion")
def convert_completions(rows: list, options: FormatOptions) -> BatchConversion:
    return _pairs(rows, "completion", options)


@register_batch("prompt_response")
def convert_responses(rows: list, options: FormatOptions) -> BatchConversion:
    return _pairs(rows, "response", options)
