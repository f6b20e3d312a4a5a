"""Message lists in their common dialects (ShareGPT from/value, OpenAI role/content) -> canonical turns.

Both dialects share the hard parts: role names, content-part lists, function calls and their
results. Per-message fields that have no canonical place (e.g. `loss_weight`) are returned so the
converter can keep them in meta.
"""

from __future__ import annotations

import json
from typing import Any

from curate.formats.base import RecordError
from curate.records import message

ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "prompter": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "bot": "assistant",
    "chatgpt": "assistant",
    "model": "assistant",
    "tool": "tool",
    "function": "tool",
    "observation": "tool",
    "ipython": "tool",
}
CALL_ROLES = ("function_call", "tool_call", "tool_calls")
_CONVERTED = frozenset(("from", "value", "role", "content", "name", "tool_calls", "function_call"))


def content_text(content: Any) -> str:
    """Text of a content field: a string, or a list of parts whose text parts are joined by newlines."""
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict) and part.get("type", "text") == "text":
                text = part.get("text", part.get("value"))
                if not isinstance(text, str):
                    raise RecordError(f"text part without text: keys {sorted(part)}")
                texts.append(text)
            elif not isinstance(part, dict):
                raise RecordError(f"content part is {type(part).__name__}, expected an object")
            # Image and audio parts carry no text to curate; the record keeps its text parts.
        return "\n".join(texts)
    raise RecordError(f"content is {type(content).__name__}, expected text or a list of parts")


def _tool_calls(value: Any) -> list[dict]:
    """A function call in any common spelling -> OpenAI tool_calls [{type, function: {name, arguments}}]."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise RecordError(f"function call is not JSON: {exc}") from None
    calls = value if isinstance(value, list) else [value]
    out = []
    for call in calls:
        if not isinstance(call, dict):
            raise RecordError(f"function call is {type(call).__name__}, expected an object")
        fn = call.get("function", call)
        if not isinstance(fn, dict) or "name" not in fn:
            raise RecordError(f"function call without a name: keys {sorted(call)}")
        item = {"type": "function", "function": {"name": fn["name"], "arguments": fn.get("arguments", {})}}
        if "id" in call:
            item["id"] = call["id"]
        out.append(item)
    return out


def convert_turns(items: Any) -> tuple[list[dict], dict | None]:
    """Canonical messages and the per-message fields left over ({key: [value per message]})."""
    if not isinstance(items, list):
        raise RecordError(f"conversation is {type(items).__name__}, expected a list of messages")
    messages = []
    extras: dict[str, list] = {}
    last_call = None
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise RecordError(f"message {i} is {type(item).__name__}, expected an object")
        raw_role = item.get("from", item.get("role"))
        text = item["value"] if "value" in item else item.get("content")
        if not isinstance(raw_role, str):
            raise RecordError(f"message {i} has no role (keys {sorted(item)})")
        key = raw_role.lower()
        if key in CALL_ROLES:
            calls = _tool_calls(text)
            messages.append(message("assistant", "", tool_calls=calls))
            last_call = calls[-1]["function"]["name"]
        else:
            role = ROLES.get(key)
            if role is None:
                raise RecordError(f"message {i} has unknown role {raw_role!r}")
            calls = item.get("tool_calls") or item.get("function_call")
            calls = _tool_calls(calls) if calls else None
            if calls:
                last_call = calls[-1]["function"]["name"]
            name = item.get("name")
            if role == "tool" and name is None:
                name = last_call
            messages.append(message(role, content_text(text), tool_calls=calls, name=name))
        for k, v in item.items():
            if k not in _CONVERTED:
                extras.setdefault(k, [None] * len(items))[i] = v
    return messages, extras or None


LIST_KEYS = ("conversations", "messages", "conversation")


def list_key(row: dict) -> str | None:
    for key in LIST_KEYS:
        if isinstance(row.get(key), list):
            return key
    return None


def first_item(row: dict) -> dict | None:
    key = list_key(row)
    items = row[key] if key else None
    return items[0] if items and isinstance(items[0], dict) else None


def tools_of(value: Any) -> Any:
    """Tool definitions as given (JSON text or a list); an empty list means none."""
    if value is None or value == [] or (isinstance(value, str) and value.strip() in ("", "[]")):
        return None
    if isinstance(value, str):
        try:
            json.loads(value)
        except json.JSONDecodeError as exc:
            raise RecordError(f"tools is not JSON: {exc}") from None
    return value


def chat(row: dict, key: str) -> tuple[list[dict], Any, dict | None]:
    """A row holding a message list under `key`: messages (with a top-level `system` prepended),
    tool definitions, and the per-message leftovers for meta."""
    messages, extras = convert_turns(row[key])
    system = row.get("system")
    if system:
        messages.insert(0, message("system", content_text(system)))
        if extras:
            extras = {k: [None, *v] for k, v in extras.items()}
    return messages, tools_of(row.get("tools")), extras
