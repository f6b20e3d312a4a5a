"""The `curate` command line: thin click commands over the pipeline, versions and reports."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from curate.errors import CurateError

out = Console()
err = Console(stderr=True, soft_wrap=True)


def _friendly_errors(fn):
    """Print a CurateError as a message with its hint, without a traceback, and exit 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except CurateError as exc:
            err.print(f"[bold red]error:[/bold red] {exc.message}", highlight=False)
            if exc.hint:
                err.print(f"[yellow]hint:[/yellow] {exc.hint}", highlight=False)
            sys.exit(1)

    return wrapper


def _print_json(data) -> None:
    click.echo(json.dumps(data, indent=2, ensure_ascii=False, default=str))


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="curate")
def main() -> None:
    """Curate instruction datasets for LLM fine-tuning.

    \b
    A recipe (YAML) lists inputs in any common format and an ordered chain of stages
    (normalize, filter, dedup, decontaminate, ...). `curate run` turns raw files into a
    versioned dataset folder: data.parquet, train.jsonl, dropped.parquet with the reason
    and evidence for every removed record, quarantine.jsonl and manifest.json.

    \b
    Start here:
      curate run pipelines/demo.yaml     run the demo recipe on the sample data
      curate show runs/demo              what the latest version kept and dropped, and why
      curate stages                      every stage with its options and defaults
    """


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Output folder (default: the recipe's output.dir, else runs/<name> beside the recipe).",
)
@click.option(
    "--json", "as_json", is_flag=True, help="Print the manifest as JSON on stdout; no progress bars."
)
@_friendly_errors
def run(recipe: Path, out_dir: Path | None, as_json: bool) -> None:
    """Run RECIPE and write a new dataset version.

    Stages whose inputs, options and code did not change since an earlier run are taken from
    the cache (the manifest marks them cached). The version id is derived from the recipe, the
    input bytes and the result, so the same run gives the same id and byte-identical data.
    """
    from curate.pipeline import load_recipe, run_recipe
    from curate.progress import Progress

    loaded = load_recipe(recipe)
    with Progress(enabled=not as_json) as progress:
        folder, manifest = run_recipe(loaded, out_dir, progress)
    if as_json:
        _print_json({**manifest, "path": str(folder)})
        return
    _print_summary(manifest, folder)


def _print_summary(manifest: dict, folder: Path) -> None:
    c = manifest["counts"]
    out.print(f"\n[bold]version[/bold] {manifest['version']}  ->  {folder}")
    out.print(
        f"input {c['input']:,} = kept {c['kept']:,} + dropped {c['dropped']:,} + quarantined "
        f"{c['quarantined']:,} - synthetic {c['synthetic']:,}"
    )
    table = Table(show_edge=False, header_style="bold")
    for col in ("stage", "in", "out", "dropped (reason: n)", "seconds", "cached"):
        table.add_column(col, justify="right" if col in ("in", "out", "seconds") else "left")
    for s in manifest["stages"]:
        reasons = ", ".join(f"{k}: {v:,}" for k, v in s["dropped"].items()) or "-"
        if s.get("added"):
            reasons += f"  (+{s['added']:,} added)"
        table.add_row(
            s["name"],
            f"{s['in']:,}",
            f"{s['out']:,}",
            reasons,
            f"{s['seconds']:.2f}",
            "yes" if s["cached"] else "",
        )
    out.print(table)
    if c["quarantined"]:
        out.print(
            f"[yellow]{c['quarantined']} unreadable input line(s): see {folder / 'quarantine.jsonl'}[/yellow]"
        )


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the checked recipe as JSON.")
@_friendly_errors
def validate(recipe: Path, as_json: bool) -> None:
    """Check RECIPE without running it: shape, stage names, every option, inputs that exist."""
    from curate.formats import input_files
    from curate.pipeline import load_recipe

    loaded = load_recipe(recipe)
    for spec in loaded.inputs:
        input_files(spec, loaded.base_dir)  # raises, naming the input, when nothing matches
    if as_json:
        _print_json({"name": loaded.name, "valid": True, "stages": [s.name for s in loaded.stages]})
        return
    stages = " -> ".join(s.name for s in loaded.stages) or "(no stages)"
    out.print(
        f"[green]ok[/green] {recipe}: {len(loaded.inputs)} input(s), "
        f"{len(loaded.eval_sets)} eval set(s), {stages}"
    )


@main.command()
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print every stage and option as JSON.")
def stages(name: str | None, as_json: bool) -> None:
    """List every stage with its options, defaults and what they do (or one stage: NAME)."""
    from curate.stages import STAGES
    from curate.stages.base import describe_config

    chosen = {k: v for k, v in STAGES.items() if name in (None, k)}
    if name and not chosen:
        raise click.BadParameter(f"no stage '{name}'; known: {', '.join(STAGES)}", param_hint="NAME")
    info = {
        k: {"doc": (v.__doc__ or "").strip(), "options": describe_config(v.Config)} for k, v in chosen.items()
    }
    if as_json:
        _print_json(info)
        return
    for stage_name, stage in info.items():
        out.print(f"\n[bold cyan]{stage_name}[/bold cyan]  {stage['doc']}")
        table = Table(show_edge=False, header_style="bold", pad_edge=False)
        table.add_column("option")
        table.add_column("type")
        table.add_column("default")
        table.add_column("what it does", overflow="fold")
        for opt in stage["options"]:
            table.add_row(opt["name"], opt["type"], json.dumps(opt["default"], default=str)[:40], opt["help"])
        out.print(table)


@main.command()
@click.argument("version", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--id", "record_id", help="Show one record: its text, source, edits, or why it was dropped.")
@click.option(
    "--source", "source_ref", metavar="PATH:ROW", help="Find records by input file and row instead."
)
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@_friendly_errors
def show(version: Path, record_id: str | None, source_ref: str | None, as_json: bool) -> None:
    """Summarise a dataset VERSION (a version folder, or an output dir: its latest), or explain a record."""
    from curate import explain as explain_mod
    from curate.versions import read_manifest, resolve_version

    folder = resolve_version(version)
    if record_id or source_ref:
        found = explain_mod.explain(folder, record_id=record_id, source_ref=source_ref)
        if as_json:
            _print_json(found)
        else:
            explain_mod.render_explanation(found, out)
        return
    manifest = read_manifest(folder)
    if as_json:
        _print_json(manifest)
    else:
        _print_summary(manifest, folder)


@main.command()
@click.argument("target", type=click.Path(exists=True, path_type=Path))
@click.option(
    "--format", "fmt", default="auto", show_default=True, help="Force a format instead of detecting."
)
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@_friendly_errors
def formats(target: Path, fmt: str, as_json: bool) -> None:
    """Detected format and record counts per input file, without running anything.

    TARGET is a recipe (its inputs are inspected) or a data file or folder.
    """
    from curate.formats import InputSpec, inspect_input
    from curate.pipeline import load_recipe

    if target.suffix in (".yaml", ".yml"):
        recipe = load_recipe(target)
        specs, base = recipe.inputs, recipe.base_dir
    else:
        specs, base = [InputSpec(path=str(target.resolve()), format=fmt)], Path.cwd()
    rows = [row for spec in specs for row in inspect_input(spec, base)]
    if as_json:
        _print_json(rows)
        return
    table = Table(show_edge=False, header_style="bold")
    for col in ("file", "format", "records", "quarantined", "detected"):
        table.add_column(col, justify="right" if col in ("records", "quarantined") else "left")
    for r in rows:
        table.add_row(
            r["path"], r["format"], f"{r['records']:,}", f"{r['quarantined']:,}", str(r.get("detected", ""))
        )
    out.print(table)
    total = sum(r["records"] for r in rows)
    out.print(f"{len(rows)} file(s), {total:,} records, {sum(r['quarantined'] for r in rows):,} quarantined")


if __name__ == "__main__":  # pragma: no cover
    main()
