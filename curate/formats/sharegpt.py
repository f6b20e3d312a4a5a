"""ShareGPT conversations: {"conversations": [{"from": "human"|"gpt"|..., "value": ...}], ...}.

Covers the LLaMA-Factory extensions too: a top-level `system` and `tools`, and `function_call` /
`observation` turns (glaive tool use), which become an assistant turn with `tool_calls` and a
`tool` turn named after the call it answers.
"""

from __future__ import annotations

from curate.formats.base import FormatOptions, register, require_text, rest
from curate.formats.turns import chat, first_item, list_key

USED = ("system", "tools")


def is_sharegpt(row: dict) -> bool:
    item = first_item(row)
    return item is not None and "from" in item and "value" in item


@register("sharegpt", "ShareGPT turns {from, value} under conversations/messages", is_sharegpt, 50)
def convert(row: dict, options: FormatOptions) -> list[dict]:
    key = list_key(row)
    messages, tools, extras = chat(row, key)
    return [{"messages": require_text(messages), "tools": tools, "meta": rest(row, (key, *USED), extras)}]
