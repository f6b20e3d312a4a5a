"""Plain-Python references for the column-wise stages: one record at a time, dicts in and out.

These are the rules as a reader would write them. The stages do the same on whole Arrow columns;
tests/test_normalize_filter.py holds the two equal, record by record, on fuzzed records and on all
of ../shared/data/raw.
"""

from __future__ import annotations

import json
import re

from curate.decisions import Drop
from curate.records import ROLES, message
from curate.text.clean import clean_text

_WORDISH = re.compile(r"\w+|[^\w\s]")


def reference_normalize(cfg, record: dict) -> Drop | dict | None:
    """normalize on one record: a Drop, the rewritten record, or None when nothing changes."""

    def clean(text: str) -> str:
        return clean_text(text, cfg.unicode_form, cfg.strip_control_chars, cfg.strip_whitespace)

    aliases = {k.lower(): v for k, v in cfg.role_aliases.items()}
    turns, changed = [], False
    for m in record["messages"]:
        role = m["role"] if m["role"] in ROLES else aliases.get(m["role"].lower())
        if role is None:
            return Drop("unknown_role", {"role": m["role"], "hint": "map it with normalize.role_aliases"})
        content = m["content"] or ""
        cleaned = clean(content)
        if role == m["role"] and cleaned == content:
            turns.append(m)
        else:
            turns.append({**m, "role": role, "content": cleaned})
            changed = True
    if cfg.merge_consecutive:
        merged = _merge_consecutive(turns)
        changed = changed or len(merged) != len(turns)
        turns = merged
    if cfg.system_prompt is not None and cfg.system_prompt_mode != "keep":
        system = message("system", clean(cfg.system_prompt))
        if cfg.system_prompt_mode == "replace" and any(t["role"] == "system" for t in turns):
            turns = [t for t in turns if t["role"] != "system"]
            changed = True
        if not turns or turns[0]["role"] != "system":
            turns = [system, *turns]
            changed = True
    if not turns:
        return Drop("unrenderable", {"template": cfg.template, "problem": "empty conversation"})
    return {**record, "messages": turns} if changed else None


def _merge_consecutive(turns: list[dict]) -> list[dict]:
    merged: list[dict] = []
    for t in turns:
        prev = merged[-1] if merged else None
        if (
            prev is not None
            and t["role"] == prev["role"]
            and t["role"] in ("user", "assistant", "system")
            and not prev.get("tool_calls")
            and not t.get("tool_calls")
        ):
            joined = "\n\n".join(x for x in (prev["content"], t["content"]) if x)
            merged[-1] = {**prev, "content": joined}
        else:
            merged.append(t)
    return merged


def reference_filter(cfg, record: dict) -> Drop | None:
    """filter on one record: the first check it fails, in order, or None."""
    turns = [m for m in record["messages"] if m["role"] != "system"]
    roles = [m["role"] for m in turns]
    if cfg.drop_empty_turns:
        for i, m in enumerate(turns):
            if (
                m["role"] in ("user", "assistant")
                and not (m["content"] or "").strip()
                and not m.get("tool_calls")
            ):
                return Drop("empty_turn", {"turn": i, "role": roles[i]})
    if "assistant" not in roles:
        if json.loads(record["meta"]).get("needs_response") if record.get("meta") else False:
            return None if cfg.keep_prompt_only else Drop("prompt_only", {})
        if cfg.require_assistant:
            return Drop("no_assistant_answer", {"roles": roles})
    elif cfg.require_final_assistant and roles[-1] != "assistant":
        return Drop("not_ending_on_assistant", {"last_role": roles[-1]})
    for m in turns:
        chars = len(m["content"] or "")
        if m["role"] == "assistant" and not m.get("tool_calls") and chars < cfg.min_assistant_chars:
            return Drop("assistant_too_short", {"chars": chars, "min": cfg.min_assistant_chars})
        if m["role"] == "user" and chars < cfg.min_user_chars:
            return Drop("user_too_short", {"chars": chars, "min": cfg.min_user_chars})
    text = "\n".join(m["content"] or "" for m in turns)
    if len(text) < cfg.min_chars:
        return Drop("too_short", {"chars": len(text), "min": cfg.min_chars})
    if cfg.max_chars is not None and len(text) > cfg.max_chars:
        return Drop("too_long", {"chars": len(text), "max": cfg.max_chars})
    if cfg.min_tokens or cfg.max_tokens is not None:
        tokens = len(_WORDISH.findall(text))
        if tokens < cfg.min_tokens:
            return Drop("too_few_tokens", {"tokens": tokens, "min": cfg.min_tokens})
        if cfg.max_tokens is not None and tokens > cfg.max_tokens:
            return Drop("too_many_tokens", {"tokens": tokens, "max": cfg.max_tokens})
    if cfg.drop_refusals:
        pattern = re.compile("(" + "|".join(f"(?:{p})" for p in cfg.refusal_patterns) + ")", re.IGNORECASE)
        for i, m in enumerate(turns):
            found = pattern.search(m["content"] or "") if m["role"] == "assistant" else None
            if found:
                return Drop("refusal", {"turn": i, "match": found.group(1)})
    return None


def describe_change(old: dict, new: dict) -> str:
    """What the edits of a version say of a rewritten record."""
    notes = []
    old_m, new_m = old["messages"], new["messages"]
    old_sys = [m["content"] for m in old_m if m["role"] == "system"]
    new_sys = [m["content"] for m in new_m if m["role"] == "system"]
    if old_sys != new_sys:
        notes.append("system prompt set" if new_sys else "system prompt removed")
    old_turns = [m for m in old_m if m["role"] != "system"]
    new_turns = [m for m in new_m if m["role"] != "system"]
    if len(old_turns) != len(new_turns):
        notes.append(f"turns {len(old_turns)} -> {len(new_turns)}")
    else:
        changed = sum(
            a["content"] != b["content"] or a["role"] != b["role"]
            for a, b in zip(old_turns, new_turns, strict=True)
        )
        if changed:
            notes.append(f"text cleaned in {changed} turn{'s' if changed > 1 else ''}")
    for key in ("meta", "tools", "rejected", "label"):
        if old.get(key) != new.get(key):
            notes.append(f"{key} changed")
    return "; ".join(notes)
