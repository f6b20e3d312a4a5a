"""Explain one record of a version: its text, where it came from, what each stage did, or why it left."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
from rich.console import Console
from rich.markup import escape
from rich.panel import Panel

from curate.errors import CurateError

# Evidence keys that name another record of the same run (e.g. the kept copy of a duplicate).
_POINTERS = ("duplicate_of",)


def explain(version: Path, record_id: str | None = None, source_ref: str | None = None) -> dict:
    """Find a record by id (or by `path:row` of its input) in a version's kept and dropped tables."""
    if source_ref:
        path, _, row = source_ref.rpartition(":")
        if not path or not row.isdigit():
            raise CurateError(
                f"--source {source_ref!r}: expected PATH:ROW", hint="e.g. --source data/a.jsonl:12"
            )
        condition = (pl.col("source").struct.field("row") == int(row)) & pl.col("source").struct.field(
            "path"
        ).str.ends_with(path)
    else:
        condition = pl.col("id") == record_id
    kept = _find(version / "data.parquet", condition)
    dropped = _find(version / "dropped.parquet", condition)
    ids = set(kept["id"]) | set(dropped["id"])
    edits = _find(version / "edits.parquet", pl.col("id").is_in(list(ids)))
    if not ids:
        where = record_id or source_ref
        raise CurateError(
            f"no record {where} in {version.name}",
            hint="ids are in data.parquet and dropped.parquet; unreadable lines are in quarantine.jsonl",
        )
    result = {"kept": kept.to_dicts(), "dropped": [], "edits": edits.to_dicts()}
    for row in result["kept"]:
        if row.get("parent_id"):
            row["parent_record"] = _summary(version, row["parent_id"])
    for row in dropped.to_dicts():
        row["evidence"] = json.loads(row["evidence"] or "{}")
        for key in _POINTERS:
            target = row["evidence"].get(key)
            if target:
                row[key + "_record"] = _summary(version, target)
        if row.get("parent_id"):
            row["parent_record"] = _summary(version, row["parent_id"])
        result["dropped"].append(row)
    return result


def _find(path: Path, condition: pl.Expr) -> pl.DataFrame:
    # a lazy scan reads only what the filter needs, not the whole version into memory
    return pl.scan_parquet(path).filter(condition).collect()


def _summary(version: Path, record_id: str) -> dict | None:
    for name in ("data.parquet", "dropped.parquet"):
        hit = _find(version / name, pl.col("id") == record_id).head(1).to_dicts()
        if hit:
            return {
                "id": record_id,
                "source": hit[0]["source"],
                "where": name,
                "first_turn": _first_user(hit[0]),
            }
    return None


def _first_user(record: dict) -> str:
    return next((m["content"] for m in record["messages"] if m["role"] == "user"), "")[:300]


SHOWN_CHARS = 600  # of each turn, unless --full


def render_explanation(found: dict, console: Console, full: bool = False) -> None:
    for rec in found["kept"]:
        _render_record(rec, "kept", "green", console, full)
    for rec in found["dropped"]:
        _render_record(rec, f"dropped by {rec['stage']}: {rec['reason']}", "red", console, full)
        console.print("  evidence: " + escape(json.dumps(rec["evidence"], ensure_ascii=False)))
        target = rec.get("duplicate_of_record")
        if target:
            console.print(escape(f"  duplicate of {_pointer(target)}"))
    for edit in found["edits"]:
        where = f"{edit['path']}:{edit['row']}" if edit["path"] else edit["id"]
        console.print(f"  [dim]{escape(edit['stage'])}[/dim]: {escape(edit['change'])}  ({escape(where)})")


def _render_record(rec: dict, status: str, colour: str, console: Console, full: bool) -> None:
    """One record in a panel: its source on a line of its own (a title would be cut at the width
    of the terminal), each turn's text, cut at SHOWN_CHARS with what is left said, unless `full`."""
    src = rec["source"]
    lines = [f"[dim]from {escape(str(src['path']))}:{src['row']} ({escape(str(src['format']))})[/dim]"]
    cut = False
    for m in rec["messages"]:
        text, more = m["content"] or "", ""
        if not full and len(text) > SHOWN_CHARS:
            text, more = text[:SHOWN_CHARS], f" [dim]... (+{len(text) - SHOWN_CHARS:,} more characters)[/dim]"
            cut = True
        lines.append(f"[bold]{escape(m['role'])}[/bold]: {escape(text)}{more}")
    if cut:
        lines.append("[dim]texts were cut: curate show --full shows them whole[/dim]")
    title = f"{rec['id']}  [{colour}]{escape(status)}[/{colour}]"
    console.print(Panel("\n".join(lines), title=title, title_align="left", expand=True))
    if rec.get("origin") == "synthetic":
        _render_lineage(rec, console)


def _render_lineage(rec: dict, console: Console) -> None:
    """Where a synthetic record comes from: its parent (and that parent's first turn), and how it
    was made (the generating stage's op, round, provider and model from meta)."""
    made = json.loads(rec.get("meta") or "{}")
    how = "; ".join(
        f"{stage}: " + ", ".join(f"{k} {v}" for k, v in sorted(info.items()) if k != "root_id")
        for stage, info in made.items()
        if isinstance(info, dict)
    )
    console.print(escape(f"  synthetic, made by {how or 'a generating stage'}"))
    parent = rec.get("parent_record")
    if parent:
        console.print(escape(f"  parent {_pointer(parent)}  (curate show --id {parent['id']})"))
    elif rec.get("parent_id"):
        console.print(escape(f"  parent {rec['parent_id']} (not in this version)"))


def _pointer(target: dict) -> str:
    """Another record named by a drop or a lineage: its id, where it came from, its first turn."""
    src = target["source"]
    return f"{target['id']} ({src['path']}:{src['row']}, {target['where']}): {target['first_turn'][:120]!r}"
