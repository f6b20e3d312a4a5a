"""What a stage changed in a record, kept per version (edits.parquet) so `curate show` can tell."""

from __future__ import annotations

import pyarrow as pa

EDITS_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string()),
        pa.field("path", pa.string()),
        pa.field("row", pa.int64()),
        pa.field("stage", pa.string()),
        pa.field("change", pa.string()),
    ]
)


def edit_entry(stage: str, old: dict | None, new: dict) -> dict | None:
    """One edits.parquet row for a rewritten (or, with old=None, added) record; None if nothing changed."""
    change = "added (synthetic)" if old is None else describe_change(old, new)
    if not change:
        return None
    src = (new.get("source") or {}) if old is not None else {}
    return {"id": new["id"], "path": src.get("path"), "row": src.get("row"), "stage": stage, "change": change}


def describe_change(old: dict, new: dict) -> str:
    """A short human account of what a stage changed in a record."""
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
