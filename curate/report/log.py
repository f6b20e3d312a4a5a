"""The versions of an output folder with their lineage: `curate log DIR`.

Each version's parent is the one its manifest names (`curate run --parent`, the recipe's
`output.parent`, else the folder's latest before the run); the one-line summary says what changed
against that parent: the recipe options that differ and the change in kept records.
"""

from __future__ import annotations

import json
from pathlib import Path

from curate.errors import CurateError
from curate.report.diff import recipe_changes
from curate.versions import read_manifest, resolve_version


def version_log(out_dir: str | Path) -> list[dict]:
    """Every version in `out_dir`, oldest first, with its parent, counts and a summary."""
    out_dir = Path(out_dir)
    folders = [p for p in sorted(out_dir.iterdir()) if not p.is_symlink() and (p / "manifest.json").is_file()]
    manifests = [read_manifest(p) for p in folders]
    if not manifests:
        raise CurateError(
            f"{out_dir} holds no dataset versions", hint="give the output folder of `curate run`"
        )
    manifests.sort(key=lambda m: (m.get("created") or "", m["version"]))
    try:
        latest = resolve_version(out_dir).name
    except CurateError:
        latest = None
    known = {m["version"]: m for m in manifests}
    return [
        {
            "version": m["version"],
            "created": m.get("created"),
            "latest": m["version"] == latest,
            "parent": m.get("parent"),
            "parent_from": m.get("parent_from"),
            "counts": m["counts"],
            "summary": _summary(m, _parent_manifest(m, known)),
        }
        for m in manifests
    ]


def _parent_manifest(manifest: dict, known: dict[str, dict]) -> dict | None:
    parent = manifest.get("parent")
    if parent in known:
        return known[parent]
    path = manifest.get("parent_path")
    if path and (Path(path) / "manifest.json").is_file():
        return read_manifest(Path(path))
    return None


def _summary(manifest: dict, parent: dict | None) -> str:
    kept = manifest["counts"]["kept"]
    if not manifest.get("parent"):
        return f"first version: {kept:,} kept of {manifest['counts']['input']:,}"
    if parent is None:
        return f"{kept:,} kept; parent {manifest['parent']} not found"
    changes = recipe_changes(parent.get("recipe") or {}, manifest.get("recipe") or {})
    said = [f"{c['key']} {_value(c['a'])} -> {_value(c['b'])}" for c in changes[:2]]
    if len(changes) > 2:
        said.append(f"{len(changes) - 2} more option(s)")
    delta = kept - parent["counts"]["kept"]
    return f"{delta:+,} kept; " + ("; ".join(said) if said else "same recipe (other inputs or code)")


def _value(value) -> str:
    text = "-" if value is None else value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= 30 else text[:29] + "…"


def render(entries: list[dict], console=None) -> None:
    """One row per version, the latest marked *, folded to fit the terminal."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console()
    table = Table(show_edge=False, header_style="bold")
    for name in ("version", "created", "parent", "kept", "summary"):
        table.add_column(name, justify="right" if name == "kept" else "left", overflow="fold")
    for e in entries:
        mark = "*" if e["latest"] else " "
        created = (e["created"] or "")[:16].replace("T", " ")
        parent = e["parent"] or "-"
        if e["parent_from"] and e["parent_from"] != "latest":
            parent += f" ({e['parent_from']})"
        table.add_row(
            f"{mark}{e['version']}", created, parent, f"{e['counts']['kept']:,}", escape(e["summary"])
        )
    console.print(table)
    console.print("[dim]* latest[/dim]")
