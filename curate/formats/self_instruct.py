"""Self-instruct tasks (self-instruct user-oriented set, Alpaca seed tasks): an instruction with instances.

Such a task is a prompt, not a conversation: it becomes a prompt-only record whose user turn is the
instruction plus, after a blank line, the first instance's input when that is non-empty (the
instance the task was written around). All instances (input/output pairs) stay in meta with
`needs_response: true`, so the generation stage can answer and nothing is lost.
"""

from __future__ import annotations

from curate.formats.base import FormatOptions, RecordError, join_input, register, require_text, rest, text_of
from curate.records import message


def is_self_instruct(row: dict) -> bool:
    return "instruction" in row and isinstance(row.get("instances"), list)


@register("self_instruct", "self-instruct tasks: instruction + instances (prompt-only)", is_self_instruct, 60)
def convert(row: dict, options: FormatOptions) -> list[dict]:
    instances = row["instances"]
    first = instances[0] if instances else {}
    if not isinstance(first, dict):
        raise RecordError(f"instance is {type(first).__name__}, expected an object with input/output")
    user = join_input(text_of(row["instruction"], "instruction"), first.get("input"))
    meta = rest(row, ("instruction",), {"needs_response": True})
    return [{"messages": require_text([message("user", user)]), "meta": meta}]
