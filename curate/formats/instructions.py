"""Bare instruction lists (InstructionWild, WizardLM test set): prompts without answers.

They are kept as prompt-only records, a single user turn with meta {"needs_response": true}, for
the generation stage to answer. The instruction is the first of INSTRUCTION_KEYS the row has (any
letter case); every other field (ids, categories, difficulty) goes to meta.
"""

from __future__ import annotations

from curate.formats.base import ANSWER_KEYS, FormatOptions, register, require_text, rest, text_of
from curate.records import message

INSTRUCTION_KEYS = ("instruction", "prompt", "question", "query")


def instruction_key(row: dict) -> str | None:
    for key in row:
        if key.lower() in INSTRUCTION_KEYS and isinstance(row[key], str):
            return key
    return None


def is_instructions(row: dict) -> bool:
    if any(key.lower() in ANSWER_KEYS for key in row):
        return False
    return instruction_key(row) is not None and list_free(row)


def list_free(row: dict) -> bool:
    # A row holding a conversation or task instances is some other shape, not a bare prompt.
    return not any(key in row for key in ("instances", "conversations", "messages", "choices"))


@register(
    "instructions", "bare instruction lists: one prompt per row, no answer (prompt-only)", is_instructions, 90
)
def convert(row: dict, options: FormatOptions) -> list[dict]:
    key = instruction_key(row)
    messages = [message("user", text_of(row[key], key))]
    return [{"messages": require_text(messages), "meta": rest(row, (key,), {"needs_response": True})}]
