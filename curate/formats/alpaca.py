"""Alpaca rows: instruction, optional input, and the answer under `output` (or `response`).

The user turn is the instruction, then a blank line and the input when the input is non-empty.
LLaMA-Factory's `system` and `history` ([[user, assistant], ...] before the instruction) are kept
as turns. When a row has both `output` and `response` (new_codealpaca), `output` is the answer and
`response` stays in meta only if it differs.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from curate.formats.base import (
    BatchConversion,
    FormatOptions,
    RecordError,
    join_input,
    register,
    register_batch,
    require_text,
    rest,
    text_of,
    user_assistant_batch,
)
from curate.records import message
from curate.text.clean import blank_column

USED = ("instruction", "input", "output", "response", "system", "history")
_USED = frozenset(USED)


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
    return [{"messages": require_text(messages), "meta": _meta(row, answer_key, answer)}]


def _meta(row: dict, answer_key: str, answer: str) -> dict | None:
    extra = None
    if answer_key == "output" and "response" in row and row["response"] != answer:
        extra = {"response": row["response"]}
    elif _USED.issuperset(row):
        return None  # nothing left over: the common case, without building a dict
    return rest(row, USED, extra)


def _plain(row: object) -> bool:
    """A row with text fields only and no system prompt or history: the shape nearly all data has."""
    if (
        type(row) is not dict
        or type(row.get("instruction")) is not str
        or row.get("system")
        or row.get("history")
    ):
        return False
    inp = row.get("input")
    answer = row["output"] if "output" in row else row.get("response")
    return (inp is None or type(inp) is str) and type(answer) is str


@register_batch("alpaca")
def convert_batch(rows: list, options: FormatOptions) -> BatchConversion:
    candidates = [_plain(r) for r in rows]
    taken = [r for r, ok in zip(rows, candidates, strict=True) if ok]
    keys = ["output" if "output" in r else "response" for r in taken]
    answers = [r[k] for r, k in zip(taken, keys, strict=True)]
    instructions = pa.array([r["instruction"] for r in taken], pa.string())
    inputs = pa.array([r.get("input") for r in taken], pa.string())
    # join_input: the input follows after a blank line when it holds any text
    with_input = pc.binary_join_element_wise(instructions, inputs, "\n\n")
    users = pc.if_else(pa.array(~blank_column(inputs)), with_input, instructions)
    meta = [_meta(r, k, a) for r, k, a in zip(taken, keys, answers, strict=True)]
    return user_assistant_batch(candidates, users, pa.array(answers, pa.string()), meta)
