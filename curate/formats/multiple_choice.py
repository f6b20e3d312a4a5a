"""Multiple-choice rows (MosaicML llm-foundry: query, choices, gold): the query answered by the gold choice.

The choices and the gold index stay in meta, so an evaluation can still score every choice.
"""

from __future__ import annotations

from curate.formats.base import (
    FormatOptions,
    RecordError,
    register,
    require_text,
    rest,
    text_of,
    user_assistant,
)


def is_multiple_choice(row: dict) -> bool:
    return "query" in row and isinstance(row.get("choices"), list) and "gold" in row


@register("multiple_choice", "query / choices / gold index", is_multiple_choice, 83)
def convert(row: dict, options: FormatOptions) -> list[dict]:
    choices, gold = row["choices"], row["gold"]
    if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < len(choices):
        raise RecordError(f"gold is {gold!r}, expected an index into {len(choices)} choices")
    messages = user_assistant(text_of(row["query"], "query"), text_of(choices[gold], "gold choice"))
    return [{"messages": require_text(messages), "meta": rest(row, ("query",))}]
