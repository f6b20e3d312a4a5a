"""What training will see: a record rendered as the trainer renders it (the template's text, the
trainer's token-level loss mask, the cut at the sequence length), and the same over a version.

Silent loss-mask failures are the bug fine-tuners report most (a template without generation
markers trains on everything or nothing, only the last turn trained, tool calls dropped by the
template); this makes them visible before a GPU hour is spent. The mask is the trainer's own
(`curate.templates.render` spans mapped onto tokenizer offsets by `curate.train.data.token_labels`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from curate.records import train_messages
from curate.templates import TEMPLATE_NAMES, UnrenderableError, render


def tokenizer_for(template: str, tokenizer: str | None) -> Any:
    """The tokenizer that counts tokens: `tokenizer` when given, else the template when it is a
    tokenizer folder; None for a named template without one (characters only)."""
    from curate.templates import load_tokenizer

    if tokenizer:
        return load_tokenizer(tokenizer)
    return None if template in TEMPLATE_NAMES else load_tokenizer(template)


def view(messages: list[dict], template: str, tokenizer: Any = None, max_len: int | None = None) -> dict:
    """{"text", "segments": [{"text", "trained", "cut"}], "tokens", "trained_tokens", "cut",
    "problems"} for canonical `messages`; tokens are null without a tokenizer."""
    from curate.train.data import token_labels

    wire = train_messages(messages)
    rendered = render(wire, template if template in TEMPLATE_NAMES else tokenizer or template)
    problems = _tool_call_problems(wire, rendered.text)
    trained_chars = sum(b - a for a, b in rendered.spans)
    if tokenizer is None:
        return {
            "text": rendered.text,
            "segments": _span_segments(rendered.text, rendered.spans),
            "tokens": None,
            "trained_tokens": None,
            "trained_chars": trained_chars,
            "cut": False,
            "problems": problems,
        }
    enc = tokenizer(rendered.text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    labels = token_labels(offsets, rendered.spans)
    limit = len(offsets) if max_len is None else max_len
    return {
        "text": rendered.text,
        "segments": _segments(rendered.text, offsets, labels, limit),
        "tokens": len(offsets),
        "trained_tokens": sum(labels[:limit]),
        "trained_chars": trained_chars,
        "cut": len(offsets) > limit,
        "max_len": limit,
        "problems": problems,
    }


def _span_segments(text: str, spans: list[tuple[int, int]]) -> list[dict]:
    """Trained spans and the text between them (no tokenizer: characters, no cut)."""
    out, end = [], 0
    for a, b in spans:
        if a > end:
            out.append({"text": text[end:a], "trained": False, "cut": False})
        out.append({"text": text[a:b], "trained": True, "cut": False})
        end = b
    if end < len(text):
        out.append({"text": text[end:], "trained": False, "cut": False})
    return out


def _segments(text: str, offsets, labels: list[bool], limit: int | None) -> list[dict]:
    """Runs of text that are alike (trained or not, inside the limit or cut)."""
    out: list[dict] = []
    end = 0
    for i, ((_, b), trained) in enumerate(zip(offsets, labels, strict=True)):
        cut = limit is not None and i >= limit
        piece = text[end:b] if b > end else ""
        end = max(end, b)
        if not piece:
            continue
        if out and out[-1]["trained"] == trained and out[-1]["cut"] == cut:
            out[-1]["text"] += piece
        else:
            out.append({"text": piece, "trained": trained, "cut": cut})
    if end < len(text):
        out.append({"text": text[end:], "trained": False, "cut": limit is not None})
    return out


def _tool_call_problems(wire: list[dict], text: str) -> list[str]:
    """Tool calls the rendered text lost: each call's function name and arguments must appear."""
    problems = []
    for turn, m in enumerate(wire):
        for call in m.get("tool_calls") or []:
            fn = call["function"]
            arguments = json.loads(fn["arguments"]) if fn.get("arguments") else {}
            if fn["name"] not in text:
                problems.append(f"turn {turn}: tool call {fn['name']!r} is not in the rendered text")
            elif any(str(v) not in text for v in _leaves(arguments)):
                problems.append(f"turn {turn}: arguments of {fn['name']!r} are not all in the rendered text")
    return problems


def _leaves(value) -> list:
    if isinstance(value, dict):
        return [x for v in value.values() for x in _leaves(v)]
    if isinstance(value, list):
        return [x for v in value for x in _leaves(v)]
    return [] if value is None or isinstance(value, bool) else [value]


def version_stats(
    folder: Path, template: str, tokenizer: Any, max_len: int, sample: int = 2000, seed: int = 0
) -> dict:
    """Over a seeded sample of a version's records: trained tokens per record, how many train on
    nothing, how many the sequence length cuts, which cannot be rendered, and tool calls lost."""
    import numpy as np
    import polars as pl

    scan = pl.scan_parquet(folder / "data.parquet")
    n = scan.select(pl.len()).collect().item()
    rows = np.random.default_rng(seed).choice(n, min(n, sample), replace=False)  # read only these
    table = scan.with_row_index("at").filter(pl.col("at").is_in(rows)).select("id", "messages").collect()
    trained, nothing, cut, unrenderable, problems = [], [], [], [], []
    for rid, messages in table.iter_rows():
        try:
            seen = view(messages, template, tokenizer, max_len)
        except UnrenderableError as exc:
            unrenderable.append({"id": rid, "reason": str(exc)})
            continue
        count = seen["trained_tokens"] if tokenizer is not None else seen["trained_chars"]
        trained.append(count)
        if count == 0:
            nothing.append(rid)
        if seen["cut"]:
            cut.append(rid)
        problems += [{"id": rid, "problem": p} for p in seen["problems"]]
    return {
        "template": template,
        "unit": "tokens" if tokenizer is not None else "characters",
        "max_len": max_len if tokenizer is not None else None,
        "records": table.height,
        "trained": trained,
        "nothing_trained": nothing,
        "cut": cut,
        "unrenderable": unrenderable,
        "tool_call_problems": problems,
    }


def render_view(seen: dict, console) -> None:
    """The rendered text with trained text highlighted and cut text struck through."""
    from rich.text import Text

    line = Text()
    for s in seen["segments"]:
        style = "bold black on green" if s["trained"] else "dim"
        if s["cut"]:
            style = "strike red"
        line.append(s["text"], style=style)
    console.print(line)
    if seen["tokens"] is not None:
        cut = (
            f", {seen['tokens'] - seen['max_len']:,} past max_len {seen['max_len']:,} cut"
            if seen["cut"]
            else ""
        )
        console.print(f"[dim]{seen['tokens']:,} tokens, {seen['trained_tokens']:,} trained{cut}[/dim]")
    else:
        console.print(
            f"[dim]{seen['trained_chars']:,} characters trained (give --tokenizer to count tokens)[/dim]"
        )
    console.print(
        "[dim]legend:[/dim] [bold black on green]trained[/] [dim]not trained[/dim] [strike red]cut[/]"
    )
    for p in seen["problems"]:
        console.print(f"[red]tool call rendering: {p}[/red]")
