"""`curate report VERSION`: one self-contained HTML page about a version: the stage funnel, drops by
reason with examples and their evidence, lengths, sources, contamination, diversity and LLM usage."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl

from curate.report import html
from curate.text.conversation import conversation_text
from curate.versions import read_manifest, resolve_version

EXAMPLES = 2  # records shown per drop reason


def report_html(version: str | Path, seed: int = 0, training: dict | None = None) -> str:
    """The page; `training` (from curate.training_view.version_stats) adds what training will see."""
    folder = resolve_version(version)
    manifest = read_manifest(folder)
    records = _lengths(folder)
    title = f"{(manifest.get('recipe') or {}).get('name') or 'dataset'} {manifest['version']}"
    body = [_summary(manifest), _funnel(manifest), _drops(folder, seed), _length_section(records)]
    body += [
        _sources(records),
        _contamination(folder, manifest),
        _diversity(folder, manifest),
        _llm(manifest),
    ]
    if training is not None:
        body.append(_training(training))
    return html.page(title, [b for b in body if b])


def _lengths(folder: Path) -> pl.DataFrame:
    content = pl.element().struct.field("content").str.len_chars().fill_null(0)
    source = pl.col("source").struct
    return (
        pl.scan_parquet(folder / "data.parquet")
        .select(
            source.field("name").fill_null(source.field("path")).fill_null("").alias("source"),
            source.field("format").fill_null("").alias("format"),
            pl.col("messages").list.len().alias("turns"),
            pl.col("messages").list.eval(content).list.sum().alias("chars"),
        )
        .collect(engine="streaming")
    )


def _summary(m: dict) -> str:
    c = m["counts"]
    facts = [
        ("version", m["version"]),
        ("parent", m.get("parent") or "none"),
        ("created", m.get("created")),
        ("code", m.get("code_version")),
        (
            "records",
            f"input {c['input']:,} = kept {c['kept']:,} + dropped {c['dropped']:,} + "
            f"quarantined {c['quarantined']:,} - synthetic {c['synthetic']:,}",
        ),
    ]
    return html.table(["", ""], facts)


def _funnel(m: dict) -> str:
    stages = m.get("stages") or []
    rows = [
        (
            s["name"],
            s["in"],
            s["out"],
            ", ".join(f"{r}: {n:,}" for r, n in s["dropped"].items()) or "-",
            s["seconds"],
        )
        for s in stages
    ]
    out = [
        "<h2>Stage funnel</h2>",
        html.table(["stage", "in", "out", "dropped (reason: n)", "seconds"], rows, (1, 2, 4)),
    ]
    if stages:
        names = ["input"] + [s["name"] for s in stages]
        counts = [stages[0]["in"]] + [s["out"] for s in stages]

        def draw(ax):
            ax.barh(names[::-1], counts[::-1], color="#4a7fb5")
            ax.set_xlabel("records")

        out.append(
            html.image(html.figure_png(draw, (6.4, 0.4 * len(names) + 0.8)), "records after each stage")
        )
    return "\n".join(out)


def _drops(folder: Path, seed: int) -> str:
    path = folder / "dropped.parquet"
    dropped = pl.scan_parquet(path).select(
        "stage",
        "reason",
        "evidence",
        pl.format("{}:{}", pl.col("source").struct.field("path"), pl.col("source").struct.field("row")).alias(
            "ref"
        ),
        "messages",
    )
    counts = dropped.group_by("stage", "reason").len().sort("len", descending=True).collect()
    if counts.is_empty():
        return "<h2>Dropped records</h2><p>None.</p>"
    out = ["<h2>Dropped records, by reason, with examples</h2>"]
    examples = (
        dropped.with_columns(pl.int_range(pl.len()).shuffle(seed).over("stage", "reason").alias("pick"))
        .filter(pl.col("pick") < EXAMPLES)
        .collect()
    )
    examples = examples.with_columns(conversation_text(examples, "first_user").alias("text"))
    for stage, reason, n in counts.iter_rows():
        out.append(f"<h3>{html.esc(stage)}: {html.esc(reason)} ({n:,})</h3>")
        for row in examples.filter((pl.col("stage") == stage) & (pl.col("reason") == reason)).iter_rows(
            named=True
        ):
            out.append(f'<p class="dim">{html.esc(row["ref"])}</p>' + html.text_block(row["text"], 400))
            evidence = json.loads(row["evidence"] or "{}")
            if evidence:
                text = json.dumps(evidence, ensure_ascii=False)
                out.append(f'<p class="dim">evidence</p>{html.text_block(text, 400)}')
    return "\n".join(out)


def _length_section(records: pl.DataFrame) -> str:
    if records.is_empty():
        return ""
    quantiles = [
        (label, *(_q(records[c], q) for c in ("chars", "turns")))
        for label, q in (("p10", 0.1), ("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1.0))
    ]

    def draw(ax):
        chars = records["chars"].to_numpy().clip(1)
        import numpy as np

        ax.hist(chars, bins=np.logspace(0, np.log10(chars.max() + 1), 50), color="#4a7fb5")
        ax.set_xscale("log")
        ax.set_xlabel("characters per record (all turns)")
        ax.set_ylabel("records")

    def turns(ax):
        counts = records["turns"].value_counts().sort("turns")
        ax.bar(counts["turns"].to_list(), counts["count"].to_list(), color="#4a7fb5")
        ax.set_xlabel("turns per record")
        ax.set_ylabel("records")

    return "\n".join(
        [
            "<h2>Lengths</h2>",
            html.table(["", "characters", "turns"], quantiles, (1, 2)),
            html.image(html.figure_png(draw), "histogram of characters per record"),
            html.image(html.figure_png(turns), "histogram of turns per record"),
        ]
    )


def _q(series: pl.Series, q: float) -> int:
    return int(series.quantile(q, "nearest") or 0)


def _sources(records: pl.DataFrame) -> str:
    mix = records.group_by("source", "format").len().sort("len", descending=True)
    rows = [(s or "-", f or "-", n) for s, f, n in mix.iter_rows()]
    return "<h2>Sources of the kept records</h2>" + html.table(["source", "format", "records"], rows, (2,))


def _contamination(folder: Path, m: dict) -> str:
    if not any(s["name"] == "decontaminate" for s in m.get("stages") or []):
        return ""
    from curate.report.decontam import decontam_report

    report = decontam_report(folder)
    rows = [
        (
            s["name"],
            "?" if s["items"] is None else s["items"],
            s["items_found"],
            s["records_dropped"],
            ", ".join(f"{k} {v:,}" for k, v in s["by_method"].items()) or "-",
        )
        for s in report["eval_sets"]
    ]
    headers = ["eval set", "items", "items found", "records dropped", "found by method"]
    return "<h2>Eval-set contamination</h2>" + html.table(headers, rows, (1, 2, 3))


def _diversity(folder: Path, m: dict) -> str:
    entry = next((s for s in m.get("stages") or [] if s["name"] == "diversity" and s.get("report")), None)
    if entry is None:
        return ""
    out = ["<h2>Diversity</h2>", html.table(["", ""], sorted(entry["report"].items()))]
    picture = folder / "diversity-map.png"
    if picture.is_file():
        out.append(html.image(picture.read_bytes(), "kept and dropped records on the embeddings' main axes"))
    return "\n".join(out)


def _llm(m: dict) -> str:
    usage = m.get("llm") or {}
    if not usage.get("requests") and not usage.get("cached"):
        return ""
    return "<h2>LLM usage</h2>" + html.table(["", ""], sorted(usage.items()))


def _training(stats: dict) -> str:
    unit = stats["unit"]
    limit = f", max_len {stats['max_len']:,}" if stats["max_len"] else ""
    out = [
        f"<h2>What training will see: {html.esc(stats['template'])}{html.esc(limit)}</h2>",
        html.table(
            ["records checked", "nothing trained", "cut by max_len", "cannot be rendered", "tool calls lost"],
            [(stats["records"], len(stats["nothing_trained"]), len(stats["cut"]), len(stats["unrenderable"]),
              len(stats["tool_call_problems"]))],
            (0, 1, 2, 3, 4),
        ),
    ]  # fmt: skip
    if stats["trained"]:

        def draw(ax):
            ax.hist(stats["trained"], bins=50, color="#4a7fb5")
            ax.set_xlabel(f"trained {unit} per record")
            ax.set_ylabel("records")

        out.append(html.image(html.figure_png(draw), f"histogram of trained {unit} per record"))
    for key, title in (
        ("nothing_trained", "Records with nothing trained"),
        ("cut", "Records cut by max_len"),
    ):
        if stats[key]:
            out.append(f"<p>{title}: {html.esc(', '.join(stats[key][:20]))}</p>")
    problems = [(u["id"], u["reason"]) for u in stats["unrenderable"]]
    problems += [(p["id"], p["problem"]) for p in stats["tool_call_problems"]]
    if problems:
        out.append(html.table(["record", "problem"], problems[:50]))
    return "\n".join(out)
