"""Two dataset versions compared record by record: what was added, removed, changed and kept, why
each removed record left, how the distributions moved and which recipe options differ.

Records are paired in three passes, each with multiplicity (exact copies share an id, so every copy
counts): the same record (id and final messages) from the same source row, then the same record
from anywhere (a copy kept from another file), then what is left on both sides by source row alone:
the same input row with other content is "changed" (another normalize option, say). The id alone
is not enough: it names the conversation as normalize cleaned it, and a stage's later edit (a
system prompt, say) keeps it. The rest of A is removed, the rest of B added.

A removed record's reason comes from B's dropped.parquet (the stage, reason and evidence that
dropped it there, found by source row, else by id); an added record's from A's (why A lacked it).
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl

from curate.errors import CurateError
from curate.text.conversation import conversation_text
from curate.versions import read_manifest, resolve_version

SOURCE_ROW = ["path", "row"]
NOT_DROPPED = "(not among the other version's drops: its input was not read there)"


def diff_versions(
    a: str | Path, b: str | Path, sample: int = 3, seed: int = 0, tokenizer: str | None = None
) -> dict:
    """The comparison as plain data (what `curate diff --json` prints); with `tokenizer` (a
    tokenizer folder) the lengths include tokens."""
    folders = [resolve_version(a), resolve_version(b)]
    manifests = [read_manifest(f) for f in folders]
    old, new = (_records(f, tokenizer) for f in folders)
    kept, removed, added, changed = _pair_all(old, new)
    removed = _explain(removed, folders[1])
    added = _explain(added, folders[0])
    return {
        "a": {"version": folders[0].name, "folder": str(folders[0]), "records": old.height},
        "b": {"version": folders[1].name, "folder": str(folders[1]), "records": new.height},
        "counts": {
            "kept": kept.height,
            "removed": removed.height,
            "added": added.height,
            "changed": changed.height,
        },
        "removed_by": _by_reason(removed),
        "added_by": _by_reason(added),
        "distributions": {**_distributions(old, new), "language": _languages(manifests)},
        "stages": _stages(manifests),
        "recipe_changes": recipe_changes(manifests[0].get("recipe") or {}, manifests[1].get("recipe") or {}),
        "diversity": [_diversity(m) for m in manifests],
        "samples": _samples(folders, removed, added, changed, sample, seed),
    }


def _records(folder: Path, tokenizer: str | None = None) -> pl.DataFrame:
    """One row per kept record: id, source row and the figures the distributions need."""
    path = folder / "data.parquet"
    if not path.is_file():
        raise CurateError(
            f"{folder} has no data.parquet", hint="give a version folder written by `curate run`"
        )
    source = pl.col("source").struct
    content = pl.element().struct.field("content").str.len_chars().fill_null(0)
    table = (
        pl.scan_parquet(path)
        .select(
            "id",
            source.field("path").fill_null("").alias("path"),
            source.field("row").fill_null(-1).alias("row"),
            source.field("name").fill_null("").alias("source"),
            source.field("format").fill_null("").alias("format"),
            pl.col("origin").fill_null("real"),
            pl.col("messages").hash(seed=0).alias("content"),
            pl.col("messages").list.len().alias("turns"),
            pl.col("messages").list.eval(content).list.sum().alias("chars"),
        )
        .collect(engine="streaming")
    )
    if tokenizer is None:
        return table
    return table.with_columns(pl.Series("tokens", _token_counts(path, tokenizer), pl.Int64))


def _token_counts(path: Path, tokenizer: str) -> list[int]:
    """Tokens of every record's turns (contents joined by newlines), by the Rust tokenizer on all
    cores, a batch of rows at a time."""
    from curate.templates import load_tokenizer

    fast = load_tokenizer(tokenizer).backend_tokenizer
    counts: list[int] = []
    texts = pl.col("messages").list.eval(pl.element().struct.field("content").fill_null("")).list.join("\n")
    for batch in pl.scan_parquet(path).select(texts).collect_batches():
        counts += [
            len(e.ids) for e in fast.encode_batch(batch.to_series().to_list(), add_special_tokens=False)
        ]
    return counts


def _pair(left: pl.DataFrame, right: pl.DataFrame, keys: list[str]):
    """(pairs, left unpaired, right unpaired): the n-th row of a key on one side meets the n-th on the
    other, rows taken in source order. Pairs carry the left row's columns, `at_b` and `id_b`."""
    nth = pl.int_range(pl.len()).over(keys).alias("nth")
    left = left.sort([*keys, *SOURCE_ROW]).with_columns(nth)
    right = right.sort([*keys, *SOURCE_ROW]).with_columns(nth)
    on = [*keys, "nth"]
    pairs = left.join(right.select(*on, "at_b", pl.col("id").alias("id_b")), on=on, how="inner")
    return (
        pairs.drop("nth"),
        left.join(right, on=on, how="anti").drop("nth"),
        right.join(left, on=on, how="anti").drop("nth"),
    )


def _pair_all(old: pl.DataFrame, new: pl.DataFrame):
    """(kept, removed, added, changed): rows of A, of A, of B, and pairs of an A row with a B row."""
    left, right = old.with_row_index("at_a"), new.with_row_index("at_b")
    same_place, left, right = _pair(left, right, ["id", "content", *SOURCE_ROW])
    moved, left, right = _pair(left, right, ["id", "content"])
    changed, left, right = _pair(left, right, SOURCE_ROW)
    return pl.concat([same_place, moved]), left, right, changed


def _explain(rows: pl.DataFrame, other: Path) -> pl.DataFrame:
    """`rows` with the stage, reason and evidence that dropped each in the `other` version."""
    columns = ["stage", "reason", "evidence"]
    if rows.is_empty():
        return rows.with_columns(pl.lit(None, pl.String).alias(c) for c in columns)
    source = pl.col("source").struct
    drops = pl.read_parquet(other / "dropped.parquet", columns=["id", "source", *columns]).select(
        "id",
        source.field("path").fill_null("").alias("path"),
        source.field("row").fill_null(-1).alias("row"),
        *columns,
    )
    by_row = rows.join(drops.unique(SOURCE_ROW, keep="first").drop("id"), on=SOURCE_ROW, how="left")
    found, missing = by_row.filter(pl.col("stage").is_not_null()), by_row.filter(pl.col("stage").is_null())
    by_id = missing.drop(columns).join(
        drops.unique("id", keep="first").select("id", *columns), on="id", how="left"
    )
    return pl.concat([found, by_id]).with_columns(
        pl.col("stage").fill_null("-"), pl.col("reason").fill_null(NOT_DROPPED)
    )


def _by_reason(rows: pl.DataFrame) -> list[dict]:
    """Counts by (stage, reason), largest first."""
    if rows.is_empty():
        return []
    counts = (
        rows.group_by("stage", "reason")
        .len()
        .sort(["len", "stage", "reason"], descending=[True, False, False])
    )
    return [{"stage": s, "reason": r, "records": n} for s, r, n in counts.iter_rows()]


def _distributions(old: pl.DataFrame, new: pl.DataFrame) -> dict:
    """Per version: counts by source, format and origin; turns and characters (mean and quantiles)."""

    def shares(column: str) -> dict:
        keys = sorted(set(old[column].unique().to_list()) | set(new[column].unique().to_list()))
        counts = [dict(df.group_by(column).len().iter_rows()) for df in (old, new)]
        return {k: [counts[0].get(k, 0), counts[1].get(k, 0)] for k in keys}

    def spread(column: str) -> dict:
        out = {}
        for label, stat in (
            ("mean", lambda c: c.mean()),
            ("p50", lambda c: c.quantile(0.5, "nearest")),
            ("p90", lambda c: c.quantile(0.9, "nearest")),
            ("max", lambda c: c.max()),
        ):
            out[label] = [_round(stat(df[column])) for df in (old, new)]
        return out

    return {
        "source": shares("source"),
        "format": shares("format"),
        "origin": shares("origin"),
        "turns": spread("turns"),
        "chars": spread("chars"),
        **({"tokens": spread("tokens")} if "tokens" in old.columns else {}),
    }


def _languages(manifests: list[dict]) -> dict:
    """Each language's share in A and B, from the manifests' samples (null where a version has none)."""
    shares = [(m.get("languages") or {}).get("shares") for m in manifests]
    codes = list(dict.fromkeys(code for s in shares if s for code in s))
    return {code: [None if s is None else s.get(code, 0.0) for s in shares] for code in codes}


def _round(value) -> float | None:
    return None if value is None else round(float(value), 1)


def _stages(manifests: list[dict]) -> list[dict]:
    """Each stage's in, out and drops by reason in A and in B, in B's order (A's extra ones after)."""
    entries = [{s["name"]: s for s in m.get("stages") or []} for m in manifests]
    names = list(entries[1]) + [n for n in entries[0] if n not in entries[1]]
    out = []
    for name in names:
        sides = [e.get(name) for e in entries]
        out.append(
            {
                "name": name,
                "in": [s and s["in"] for s in sides],
                "out": [s and s["out"] for s in sides],
                "dropped": [s and s.get("dropped", {}) for s in sides],
            }
        )
    return out


def _flatten(value, prefix: str = "") -> dict[str, object]:
    """Dotted keys to leaf values; a stage list becomes `stages[i].name.option`."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        out = {}
        for i, item in enumerate(value):
            out.update(_flatten(item, f"{prefix}[{i}]"))
        return out
    return {prefix: value}


def recipe_changes(a: dict, b: dict) -> list[dict]:
    """Every recipe option whose value differs, with both values (absent: null); first the order of
    the stages when it differs."""
    order = [" > ".join(next(iter(s)) for s in r.get("stages") or [] if s) for r in (a, b)]
    head = [{"key": "stages", "a": order[0], "b": order[1]}] if order[0] != order[1] else []
    flat = [_flatten(a), _flatten(b)]
    keys = list(flat[0]) + [k for k in flat[1] if k not in flat[0]]
    return head + [
        {"key": k, "a": flat[0].get(k), "b": flat[1].get(k)} for k in keys if flat[0].get(k) != flat[1].get(k)
    ]


def _diversity(manifest: dict) -> dict | None:
    """The diversity stage's coverage report of a version, when it ran one."""
    for stage in manifest.get("stages") or []:
        if stage["name"] == "diversity" and stage.get("report"):
            return stage["report"]
    return None


def _samples(folders: list[Path], removed, added, changed, size: int, seed: int) -> dict:
    """Up to `size` records of each bucket, chosen with `seed`, with their first user turn."""

    def pick(rows: pl.DataFrame) -> pl.DataFrame:
        return rows.sample(min(size, rows.height), seed=seed).sort(
            "at_a" if "at_a" in rows.columns else "at_b"
        )

    removed, added, changed = pick(removed), pick(added), pick(changed)
    texts = [
        _first_user(folders[0], [*removed["at_a"], *changed["at_a"]]),
        _first_user(folders[1], [*added["at_b"], *changed["at_b"]]),
    ]
    out = {"removed": [], "added": [], "changed": []}
    for row in removed.iter_rows(named=True):
        out["removed"].append(
            {
                **_ref(row),
                "stage": row["stage"],
                "reason": row["reason"],
                "evidence": json.loads(row["evidence"] or "{}"),
                "text": texts[0][row["at_a"]],
            }
        )
    for row in added.iter_rows(named=True):
        out["added"].append(
            {
                **_ref(row),
                "dropped_in_a": {"stage": row["stage"], "reason": row["reason"]},
                "text": texts[1][row["at_b"]],
            }
        )
    for row in changed.iter_rows(named=True):
        out["changed"].append(
            {
                **_ref(row),
                "id_b": row["id_b"],
                "text_a": texts[0][row["at_a"]],
                "text_b": texts[1][row["at_b"]],
            }
        )
    return out


def _ref(row: dict) -> dict:
    return {"id": row["id"], "source": f"{row['path']}:{row['row']}"}


def _first_user(folder: Path, rows: list[int]) -> dict[int, str]:
    """The first user turn of the records at `rows` of a version, in one read."""
    table = (
        pl.scan_parquet(folder / "data.parquet")
        .with_row_index("at")
        .filter(pl.col("at").is_in(rows))
        .select("at", "messages")
        .collect()
    )
    return dict(zip(table["at"].to_list(), conversation_text(table, "first_user").to_list(), strict=True))


def render(report: dict, console=None) -> None:
    """Print the comparison as tables that fit 80 columns (long names fold, texts are cut)."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console()
    a, b, counts = report["a"], report["b"], report["counts"]
    console.print(f"A {a['version']}  {a['records']:,} records  [dim]{escape(a['folder'])}[/dim]")
    console.print(f"B {b['version']}  {b['records']:,} records  [dim]{escape(b['folder'])}[/dim]")
    console.print(
        f"kept {counts['kept']:,}   removed {counts['removed']:,}   added {counts['added']:,}"
        f"   changed {counts['changed']:,}\n"
    )

    def table(title: str, *columns: str) -> Table:
        t = Table(title=title, title_justify="left", show_edge=False)
        for i, name in enumerate(columns):
            t.add_column(name, justify="left" if i == 0 else "right", overflow="fold")
        return t

    for key, title in (
        ("removed_by", "removed: what dropped them in B"),
        ("added_by", "added: what had dropped them in A"),
    ):
        if report[key]:
            t = table(title, "stage", "reason", "records")
            t.columns[1].justify = "left"
            for entry in report[key]:
                t.add_row(entry["stage"], escape(entry["reason"]), f"{entry['records']:,}")
            console.print(t, "")
    t = table("stages", "stage", "in A", "in B", "out A", "out B")
    for s in report["stages"]:
        t.add_row(s["name"], *(_count(v) for v in (*s["in"], *s["out"])))
    console.print(t, "")
    if report["recipe_changes"]:
        t = table("recipe options that differ", "option", "A", "B")
        for c in report["recipe_changes"]:
            t.add_row(escape(c["key"]), *(escape(_short(c[side])) for side in ("a", "b")))
        console.print(t, "")
    dist = report["distributions"]
    for key in ("origin", "format", "source"):
        if len(dist[key]) > 1 or any(x != y for x, y in dist[key].values()):
            t = table(f"records by {key}", key, "A", "B", "change")
            for name, (x, y) in sorted(dist[key].items(), key=lambda kv: -kv[1][1])[:15]:
                t.add_row(escape(name or "-"), f"{x:,}", f"{y:,}", f"{y - x:+,}")
            console.print(t, "")
    if dist["language"]:
        t = table("language (share of a sample)", "language", "A", "B", "change")
        for code, (x, y) in list(dist["language"].items())[:10]:
            change = "-" if x is None or y is None else f"{(y - x) * 100:+.1f} pt"
            t.add_row(code, *(_share(v) for v in (x, y)), change)
        console.print(t, "")
    t = table("lengths", "", "mean A", "mean B", "p50 A", "p50 B", "p90 A", "p90 B")
    for key, label in (("turns", "turns"), ("chars", "characters"), ("tokens", "tokens")):
        if key in dist:
            t.add_row(label, *(_count(v) for k in ("mean", "p50", "p90") for v in dist[key][k]))
    console.print(t, "")
    if any(report["diversity"]):
        t = table("diversity coverage", "", "A", "B")
        for key in ("coverage_radius_mean", "coverage_radius_max", "clusters_covered"):
            t.add_row(key, *(_count((d or {}).get(key)) for d in report["diversity"]))
        console.print(t, "")
    for bucket, rows in report["samples"].items():
        for row in rows:
            why = f"  {row['stage']}: {row['reason']}" if bucket == "removed" else ""
            console.print(f"[bold]{bucket}[/bold] {row['id']}  {escape(row['source'])}{escape(why)}")
            if bucket == "changed":
                console.print(f"  A: {escape(_short(row['text_a']))}\n  B: {escape(_short(row['text_b']))}")
            else:
                console.print(f"  {escape(_short(row['text']))}")


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _count(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not value.is_integer():
        return f"{value:,.4g}" if value < 10 else f"{value:,.1f}"
    return f"{int(value):,}"


def _short(value, limit: int = 100) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def render_html(report: dict) -> str:
    """The comparison as a self-contained HTML page (see curate.report.html)."""
    from curate.report import html

    a, b, counts = report["a"], report["b"], report["counts"]
    body = [
        html.table(
            ["", "version", "records", "folder"],
            [("A", a["version"], a["records"], a["folder"]), ("B", b["version"], b["records"], b["folder"])],
            (2,),
        ),
        html.table(["kept", "removed", "added", "changed"], [tuple(counts.values())], (0, 1, 2, 3)),
    ]
    for key, title in (
        ("removed_by", "Removed: what dropped them in B"),
        ("added_by", "Added: what dropped them in A"),
    ):
        rows = [(r["stage"], r["reason"], r["records"]) for r in report[key]]
        if rows:
            body += [f"<h2>{title}</h2>", html.table(["stage", "reason", "records"], rows, (2,))]
    stages = [(s["name"], *s["in"], *s["out"]) for s in report["stages"]]
    body += ["<h2>Stages</h2>", html.table(["stage", "in A", "in B", "out A", "out B"], stages, (1, 2, 3, 4))]
    if report["recipe_changes"]:
        rows = [(c["key"], _short(c["a"], 300), _short(c["b"], 300)) for c in report["recipe_changes"]]
        body += ["<h2>Recipe options that differ</h2>", html.table(["option", "A", "B"], rows)]
    dist = report["distributions"]
    for key in ("origin", "format", "source"):
        rows = [
            (name or "-", x, y, f"{y - x:+,}")
            for name, (x, y) in sorted(dist[key].items(), key=lambda kv: -kv[1][1])
        ]
        body += [f"<h2>Records by {key}</h2>", html.table([key, "A", "B", "change"], rows, (1, 2, 3))]
    if dist["language"]:
        rows = [(code, *(_share(v) for v in pair)) for code, pair in dist["language"].items()]
        body += ["<h2>Language (share of a sample)</h2>", html.table(["language", "A", "B"], rows, (1, 2))]
    rows = [
        (f"{label} {stat}", *dist[key][stat])
        for key, label in (("turns", "turns"), ("chars", "characters"), ("tokens", "tokens"))
        if key in dist
        for stat in ("mean", "p50", "p90", "max")
    ]
    body += ["<h2>Lengths</h2>", html.table(["", "A", "B"], rows, (1, 2))]
    if any(report["diversity"]):
        keys = ("coverage_radius_mean", "coverage_radius_max", "clusters_covered")
        rows = [(k, *((d or {}).get(k) for d in report["diversity"])) for k in keys]
        body += ["<h2>Diversity coverage</h2>", html.table(["", "A", "B"], rows, (1, 2))]
    body.append("<h2>Samples</h2>")
    for bucket, rows in report["samples"].items():
        for row in rows:
            why = f" ({row['stage']}: {row['reason']})" if bucket == "removed" else ""
            body.append(
                f"<p><b>{bucket}</b> {html.esc(row['id'])} {html.esc(row['source'])}{html.esc(why)}</p>"
            )
            if bucket == "changed":
                body += [html.text_block(row["text_a"]), html.text_block(row["text_b"])]
            else:
                body.append(html.text_block(row["text"]))
    return html.page(f"curate diff {a['version']} -> {b['version']}", body)
