"""The decontamination report: per eval set, how many of its items the training data held, and how found.

Computed from a version folder alone: `dropped.parquet` carries every decontaminate drop with its
evidence (each drop lists the best hit of every method that fired), and `manifest.json` carries
the recipe, whose eval sets are loaded again to know each set's size.
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl

from curate.contamination import METHODS
from curate.errors import CurateError
from curate.evalsets import EvalSetSpec, load_eval_set
from curate.versions import read_manifest, resolve_version


def decontam_report(version: str | Path, base_dir: Path | None = None) -> dict:
    """{"version", "records_dropped", "eval_sets": [{name, items, items_found, records_dropped, by_method}]}.

    `items_found` counts distinct eval items hit by any method; `by_method[m]` the items hit by m
    (an item found by two methods counts under both). `items` is null when the eval set's file
    can no longer be read from the recipe's folder (or `base_dir`, when given).
    """
    folder = resolve_version(version)
    manifest = read_manifest(folder)
    recipe = manifest.get("recipe") or {}
    if base_dir is None:
        base_dir = Path(manifest["recipe_path"]).parent if manifest.get("recipe_path") else Path.cwd()
    hits, dropped_by_set = _hits(folder)
    sets = []
    for i, entry in enumerate(recipe.get("eval_sets") or []):
        name = entry.get("name")
        mine = hits.filter(pl.col("eval_set") == name)
        sets.append(
            {
                "name": name,
                "items": _size(entry, i, base_dir),
                "items_found": mine["eval_id"].n_unique(),
                "records_dropped": dropped_by_set.get(name, 0),
                "by_method": {
                    m: mine.filter(pl.col("method") == m)["eval_id"].n_unique()
                    for m in METHODS
                    if m in set(mine["method"].to_list())
                },
            }
        )
    return {"version": folder.name, "records_dropped": sum(dropped_by_set.values()), "eval_sets": sets}


def _hits(folder: Path) -> tuple[pl.DataFrame, dict[str, int]]:
    path = folder / "dropped.parquet"
    empty = pl.DataFrame(schema={"eval_set": pl.String, "eval_id": pl.String, "method": pl.String})
    if not path.is_file():
        raise CurateError(
            f"{folder} has no dropped.parquet", hint="give a version folder written by `curate run`"
        )
    dropped = pl.read_parquet(path, columns=["stage", "reason", "evidence"]).filter(
        (pl.col("stage") == "decontaminate") & (pl.col("reason") == "eval_overlap")
    )
    rows, by_set = [], {}
    for text in dropped["evidence"].to_list():
        evidence = json.loads(text)
        by_set[evidence["eval_set"]] = by_set.get(evidence["eval_set"], 0) + 1
        for hit in evidence.get("hits") or [evidence]:
            rows.append(
                {"eval_set": hit["eval_set"], "eval_id": str(hit["eval_id"]), "method": hit["method"]}
            )
    return (pl.DataFrame(rows, schema=empty.schema) if rows else empty), by_set


def _size(entry: dict, index: int, base_dir: Path) -> int | None:
    try:
        return len(load_eval_set(EvalSetSpec.from_recipe(entry, f"eval_sets[{index}]"), base_dir))
    except CurateError:
        return None


def render(report: dict, console=None) -> None:
    """Print the report: a table of what each eval set lost to the training data, then, per set,
    how many of its items each method found (a narrow terminal folds names, it never cuts them)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=f"eval-set contamination in {report['version']}", show_edge=False)
    table.add_column("eval set", overflow="fold")
    table.add_column("items", justify="right")
    table.add_column("items found", justify="right")
    table.add_column("records dropped", justify="right")
    table.add_column("found by method", overflow="fold")
    for s in report["eval_sets"]:
        items = "?" if s["items"] is None else f"{s['items']:,}"
        share = f" ({s['items_found'] / s['items']:.1%})" if s["items"] else ""
        methods = ", ".join(f"{m} {s['by_method'][m]:,}" for m in METHODS if s["by_method"].get(m)) or "-"
        table.add_row(s["name"], items, f"{s['items_found']:,}{share}", f"{s['records_dropped']:,}", methods)
    console.print(table)
