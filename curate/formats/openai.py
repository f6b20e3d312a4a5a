"""OpenAI chat messages: {"messages": [{"role": ..., "content": str | [parts]}], "tools": ...}.

Content-part lists (OpenAI {"type": "text", "text"} or LLaMA-Factory v1 {"type": "text", "value"})
join their text parts; assistant `tool_calls` and `tool` results keep their OpenAI shape.
"""

from __future__ import annotations

from curate.formats.base import FormatOptions, register, require_text, rest
from curate.formats.turns import chat, first_item, list_key

USED = ("system", "tools")


def is_openai(row: dict) -> bool:
    item = first_item(row)
    return item is not None and "role" in item


@register("openai", "OpenAI chat messages {role, content} (text or content parts)", is_openai, 51)
def convert(row: dict, options: FormatOptions) -> list[dict]:
    key = list_key(row)
    messages, tools, extras = chat(row, key)
    return [{"messages": require_text(messages), "tools": tools, "meta": rest(row, (key, *USED), extras)}]
