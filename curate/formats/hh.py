"""Anthropic HH-RLHF transcripts: "\\n\\nHuman: ...\\n\\nAssistant: ..." text, chosen and rejected.

The transcript markers are the format's framing: they are removed with the one space that follows
them, and nothing else is stripped. Rows may also carry the shared part as `prompt` with `chosen` /
`rejected` continuations. Text before the first marker (old-style preambles) becomes a system turn.
"""

from __future__ import annotations

import re

from curate.formats.base import FormatOptions, RecordError, preference_pair, register, require_text, rest
from curate.records import message

MARKER = re.compile(r"(?:^|\n\n)(Human|Assistant):[ ]?")
ROLE = {"Human": "user", "Assistant": "assistant"}


def _is_transcript(value: object) -> bool:
    return isinstance(value, str) and ("\n\nHuman:" in value or value.startswith("Human:"))


def is_hh(row: dict) -> bool:
    return "chosen" in row and (_is_transcript(row["chosen"]) or _is_transcript(row.get("prompt")))


def split_transcript(text: str) -> list[dict]:
    parts = MARKER.split(text)
    messages = [message("system", parts[0])] if parts[0].strip() else []
    for i in range(1, len(parts), 2):
        messages.append(message(ROLE[parts[i]], parts[i + 1]))
    if not any(m["role"] == "user" for m in messages):
        raise RecordError("no '\\n\\nHuman:' turn in the transcript")
    return messages


def _transcript(row: dict, key: str) -> str:
    value = row.get(key)
    if not isinstance(value, str):
        raise RecordError(f"{key} is {type(value).__name__}, expected transcript text")
    prompt = row.get("prompt")
    return prompt + value if isinstance(prompt, str) and not value.startswith(prompt) else value


@register("hh", "Anthropic HH transcripts (\\n\\nHuman: / \\n\\nAssistant:), chosen and rejected", is_hh, 20)
def convert(row: dict, options: FormatOptions) -> list[dict]:
    chosen = split_transcript(_transcript(row, "chosen"))
    rejected = split_transcript(_transcript(row, "rejected")) if "rejected" in row else None
    if rejected is not None:
        chosen, rejected = preference_pair(chosen, rejected)
    meta = rest(row, ("prompt", "chosen", "rejected"))
    return [{"messages": require_text(chosen), "rejected": rejected, "meta": meta}]
