"""KTO (unpaired preference) data: a conversation or prompt/completion with a desirability label.

The label is `label` (TRL, LLaMA-Factory) or `kto_tag` (LLaMA-Factory ShareGPT); it must be a bool.
"""

from __future__ import annotations

from curate.formats.base import FormatOptions, RecordError, register, require_text, rest, text_of
from curate.formats.preference import answer_turns, full, prompt_turns
from curate.formats.turns import chat, list_key

LABEL_KEYS = ("label", "kto_tag")


def label_key(row: dict) -> str | None:
    for key in LABEL_KEYS:
        if key in row:
            return key
    return None


def is_kto(row: dict) -> bool:
    key = label_key(row)
    if key is None or not isinstance(row[key], bool):
        return False
    return list_key(row) is not None or ("prompt" in row and "completion" in row)


@register("kto", "conversation or prompt/completion with a bool label / kto_tag (KTO)", is_kto, 31)
def convert(row: dict, options: FormatOptions) -> list[dict]:
    key = label_key(row)
    label = row.get(key) if key else None
    if not isinstance(label, bool):
        raise RecordError(f"KTO label is {label!r}, expected true or false")
    if "completion" in row and "prompt" in row:
        prompt, tools, extras, used = prompt_turns(row)
        completion = row["completion"]
        answer = answer_turns(
            completion if isinstance(completion, list) else text_of(completion, "completion"), "completion"
        )
        messages = full(prompt, answer)
        used += ("completion",)
    else:
        lkey = list_key(row)
        messages, tools, extras = chat(row, lkey)
        used = (lkey, "system", "tools")
    meta = rest(row, (*used, key), extras)
    return [{"messages": require_text(messages), "label": label, "tools": tools, "meta": meta}]
