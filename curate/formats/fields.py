"""The user's field mapping for shapes no built-in format knows: roles -> source keys.

Recipe: `fields: {user: question, assistant: answer, system: sys}`. A role may name a list of keys,
joined by a blank line (empty ones skipped): `user: [instruction, context]`. `rejected` (text of a
dispreferred answer), `label` (KTO bool) and `tools` map the optional parts. Without `assistant` the
record is prompt-only (meta needs_response). Every unmapped key goes to meta.
"""

from __future__ import annotations

from typing import Any

from curate.formats.base import FormatOptions, RecordError, register, require_text, rest, text_of
from curate.formats.turns import tools_of
from curate.records import message

ROLES = ("system", "user", "assistant")
PARTS = (*ROLES, "rejected", "label", "tools")


def keys_of(value: Any) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def _text(row: dict, keys: list[str], part: str) -> str:
    texts = []
    for key in keys:
        if key not in row:
            raise RecordError(f"fields.{part}: key {key!r} is missing (row has {sorted(row)})")
        value = row[key]
        if value is not None:
            value = text_of(value, key)
            if value.strip():
                texts.append(value)
    return "\n\n".join(texts)


def _never(row: dict) -> bool:
    return False  # a mapping is only used when the recipe gives one


@register("fields", "your own mapping: fields: {user: KEY, assistant: KEY, system: KEY, ...}", _never, 1000)
def convert(row: dict, options: FormatOptions) -> list[dict]:
    mapping = options.fields or {}
    used: list[str] = []
    messages = []
    for role in ROLES:
        if role in mapping:
            keys = keys_of(mapping[role])
            used += keys
            text = _text(row, keys, role)
            if text or role != "system":
                messages.append(message(role, text))
    out: dict = {}
    if "rejected" in mapping:
        keys = keys_of(mapping["rejected"])
        used += keys
        out["rejected"] = [message("assistant", _text(row, keys, "rejected"))]
    if "label" in mapping:
        used.append(mapping["label"])
        label = row.get(mapping["label"])
        if not isinstance(label, bool):
            raise RecordError(f"fields.label: {mapping['label']!r} is {label!r}, expected true or false")
        out["label"] = label
    if "tools" in mapping:
        used.append(mapping["tools"])
        out["tools"] = tools_of(row.get(mapping["tools"]))
    extra = None if "assistant" in mapping else {"needs_response": True}
    out["messages"] = require_text(messages)
    out["meta"] = rest(row, frozenset(used), extra)
    return [out]
