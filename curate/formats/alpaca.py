"""Alpaca rows: instruction, optional input, and the answer under `output` (or `response`).

The user turn is the instruction, then a blank line and the input when the input is non-empty.
LLaMA-Factory's `system` and `history` ([[user, assistant], ...] before the instruction) are kept
as turns. When a row has both `output` and `response` (new_codealpaca), `output` is the answer and
`response` stays in meta only if it differs.
"""

from __future__ import annotations

from curate.formats.base import FormatOptions, RecordError, join_input, register, require_text, rest, text_of
from curate.records import message

USED = ("instruction", "input", "output", "response", "system", "history")


def is_alpaca(row: dict) -> bool:
    return "instruction" in row and ("output" in row or "response" in row)


@register("alpaca", "instruction / input / output (or response)", is_alpaca, 70)
def convert(row: dict, options: FormatOptions) -> list[dict]:
    user = join_input(text_of(row["instruction"], "instruction"), row.get("input"))
    answer_key = "output" if "output" in row else "response"
    answer = text_of(row[answer_key], answer_key)
    messages = []
    if row.get("system"):
        messages.append(message("system", text_of(row["system"], "system")))
    for pair in row.get("history") or ():
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise RecordError("history must be a list of [user, assistant] pairs")
        messages.append(message("user", text_of(pair[0], "history user turn")))
        messages.append(message("assistant", text_of(pair[1], "history assistant turn")))
    messages.append(message("user", user))
    messages.append(message("assistant", answer))
    extra = None
    if answer_key == "output" and "response" in row and row["response"] != answer:
        extra = {"response": row["response"]}
    return [{"messages": require_text(messages), "meta": rest(row, USED, extra)}]
