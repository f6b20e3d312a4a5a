"""The `curate` command line: thin click commands over the pipeline, versions and reports."""

from __future__ import annotations

import errno
import functools
import json
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.padding import Padding
from rich.table import Table

from curate.errors import CurateError, RecipeError

out = Console()
err = Console(stderr=True, soft_wrap=True)


def _friendly_errors(fn):
    """Print a CurateError as a message with its hint, without a traceback, and exit 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RecipeError as exc:
            if len(exc.issues) > 1:
                err.print(
                    f"[bold red]error:[/bold red] {len(exc.issues)} problems in the recipe", highlight=False
                )
            for issue in exc.issues:
                prefix = "[bold red]error:[/bold red] " if len(exc.issues) == 1 else "  [red]-[/red] "
                err.print(f"{prefix}{escape(str(issue))}", highlight=False)
                if issue.hint:
                    indent = "" if len(exc.issues) == 1 else "    "
                    err.print(f"{indent}[yellow]hint:[/yellow] {escape(issue.hint)}", highlight=False)
            sys.exit(1)
        except CurateError as exc:
            err.print(f"[bold red]error:[/bold red] {escape(exc.message)}", highlight=False)
            if exc.hint:
                err.print(f"[yellow]hint:[/yellow] {escape(exc.hint)}", highlight=False)
            sys.exit(1)
        except OSError as exc:
            if exc.errno not in _STORAGE_ERRORS:
                raise
            where = f" ({exc.filename})" if exc.filename else ""
            err.print(
                f"[bold red]error:[/bold red] {escape(exc.strerror or str(exc))}{escape(where)}",
                highlight=False,
            )
            err.print(
                "[yellow]hint:[/yellow] free some space or choose another folder (--out)", highlight=False
            )
            sys.exit(1)

    return wrapper


# The disk refused: full, read-only, or not ours. Said in one line, like any other user error.
_STORAGE_ERRORS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT}


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
    "--workers",
    type=click.IntRange(min=1),
    help="Processes for reading files and row stages (default: CURATE_WORKERS or every core). "
    "The result does not depend on it.",
)
@click.option(
    "--engine",
    type=click.Choice(["local", "serial", "ray"]),
    help="local (default, unless the recipe's `engine` says otherwise): every core for large work; "
    "serial: one process, one batch at a time (for debugging); ray: a Ray cluster (pip install "
    "'curate[ray]'). All write the same version.",
)
@click.option(
    "--address",
    help="With --engine ray: the Ray cluster to join (host:port, or auto); default: a local one of "
    "--workers CPUs, stopped after the run.",
)
@click.option(
    "--generation-workers",
    type=click.IntRange(min=1),
    help="With --engine ray: processes that send evol's and respond's LLM requests, each with the "
    "stage's concurrency in flight (at most workers x concurrency in all); default: the recipe's, "
    "else one per node.",
)
@click.option(
    "--strict",
    is_flag=True,
    help="Fail when an input file yields no records or mostly unreadable rows (else: a warning).",
)
@click.option(
    "--parent",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="The version this one is derived from (a version folder, or an output folder for its latest); "
    "default: the recipe's output.parent, else the output folder's latest. `curate log` shows it.",
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Send no LLM request: run the stages before the first generating one and print what the "
    "generating stages are expected to send and spend (as `curate estimate`).",
)
@click.option(
    "--json", "as_json", is_flag=True, help="Print the manifest as JSON on stdout; no progress bars."
)
@_friendly_errors
def run(
    recipe: Path,
    out_dir: Path | None,
    workers: int | None,
    engine: str | None,
    address: str | None,
    generation_workers: int | None,
    strict: bool,
    parent: Path | None,
    dry_run: bool,
    as_json: bool,
) -> None:
    """Run RECIPE and write a new dataset version.

    Stages whose inputs, options and code did not change since an earlier run are taken from
    the cache (the manifest marks them cached). The version id is derived from the recipe, the
    input bytes and the result, so the same run gives the same id and byte-identical data.
    """
    from curate.pipeline import run_recipe
    from curate.progress import Progress
    from curate.recipe import load_recipe

    loaded = load_recipe(recipe)
    loaded.strict = loaded.strict or strict
    if dry_run:
        _estimate(loaded, out_dir, workers, engine, as_json, address)
        return
    with Progress(enabled=not as_json) as progress:
        result = run_recipe(loaded, out_dir, progress, workers, engine, parent, address, generation_workers)
    if as_json:
        _print_json({**result.manifest, "path": str(result.folder), "this_run": result.run})
        return
    _print_summary(result.manifest, result.folder, result.run)


@main.command()
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Output folder whose stage cache the stages before generation use (default: the recipe's).",
)
@click.option("--workers", type=click.IntRange(min=1), help="Processes for the stages before generation.")
@click.option("--json", "as_json", is_flag=True, help="Print the estimate as JSON on stdout.")
@_friendly_errors
def estimate(recipe: Path, out_dir: Path | None, workers: int | None, as_json: bool) -> None:
    """Print the requests, tokens and cost RECIPE's generating stages (evol, respond) are expected to
    take, before any paid call, and check them against each stage's budget.

    The stages before the first generating one run (they are free, and cached for the real run);
    generating stages are estimated at their worst: every answer as long as max_tokens, every
    evolution surviving, tokens at about four characters each. Cost needs `prices` in the stage.
    """
    from curate.recipe import load_recipe

    _estimate(load_recipe(recipe), out_dir, workers, None, as_json)


def _estimate(
    recipe,
    out_dir: Path | None,
    workers: int | None,
    engine: str | None,
    as_json: bool,
    address: str | None = None,
) -> None:
    from curate.pipeline import estimate_recipe
    from curate.progress import Progress

    with Progress(enabled=not as_json) as progress:
        figures = estimate_recipe(recipe, out_dir, progress, workers, engine, address)
    if as_json:
        _print_json(figures)
        return
    if not figures["stages"]:
        out.print("no generating stage in this recipe: a run sends no LLM request")
        return
    out.print(f"\n{figures['records']:,} records reach the first generating stage; at most:")
    table = Table(show_edge=False, header_style="bold")
    for col in ("stage", "model", "requests", "input tokens", "output tokens", "cost", "budget"):
        table.add_column(col, justify="right" if col not in ("stage", "model", "budget") else "left")
    for s in figures["stages"]:
        cost = "-" if s["cost"] is None else f"{s['cost']:.4f}"
        if s["budget"] is None:
            verdict = "none"
        elif s["over_budget"]:
            verdict = f"[yellow]passed: {'; '.join(s['over_budget'])}[/yellow]"
        else:
            verdict = "[green]fits[/green]"
        table.add_row(
            s["stage"],
            f"{s['provider']}:{s['model']}",
            f"{s['requests']:,}",
            f"{s['input_tokens']:,}",
            f"{s['output_tokens']:,}",
            cost,
            verdict,
        )
    out.print(table)
    if any(s["over_budget"] and not s["budget"]["allow_partial"] for s in figures["stages"]):
        out.print(
            "[yellow]a run would stop before its first request: raise the budget or allow_partial[/yellow]"
        )


def _print_summary(manifest: dict, folder: Path, run: dict | None = None) -> None:
    """The version's counts and stage table; for a run, which stages it computed and which it reused."""
    c = manifest["counts"]
    out.print(f"\n[bold]version[/bold] {manifest['version']}  ->  {folder}")
    if run is not None and not run["new"]:
        out.print("[dim]this version existed already: its files are untouched[/dim]")
    out.print(
        f"input {c['input']:,} = kept {c['kept']:,} + dropped {c['dropped']:,} + quarantined "
        f"{c['quarantined']:,} - synthetic {c['synthetic']:,}"
    )
    stages = run["stages"] if run is not None else manifest["stages"]
    table = Table(show_edge=False, header_style="bold")
    for col in ("stage", "in", "out", "dropped (reason: n)", "seconds", "computed by"):
        table.add_column(col, justify="right" if col in ("in", "out", "seconds") else "left", overflow="fold")
    for s, this in zip(manifest["stages"], stages, strict=True):
        reasons = ", ".join(f"{k}: {v:,}" for k, v in s["dropped"].items()) or "-"
        if s.get("added"):
            reasons += f"  (+{s['added']:,} added)"
        by = "this run" if not this["cached"] else f"cache: {this.get('run', 'earlier run')}"
        table.add_row(s["name"], f"{s['in']:,}", f"{s['out']:,}", reasons, f"{this['seconds']:.2f}", by)
    out.print(table)
    if c["quarantined"]:
        out.print(
            f"[yellow]{c['quarantined']} unreadable input line(s): see {folder / 'quarantine.jsonl'}[/yellow]"
        )
    for w in manifest.get("warnings", []):
        out.print(f"[yellow]warning: {escape(w['file'])}: {escape(w['problem'])}[/yellow]")


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON (problems included).")
@_friendly_errors
def validate(recipe: Path, as_json: bool) -> None:
    """Check RECIPE without running it: every key and option, stage names, eval sets, input files.

    It makes exactly the checks `curate run` makes before the first record moves, and reports
    every problem at once, each with the key it is at and a hint. Exit status 1 if any.
    """
    from curate.recipe import load_recipe

    try:
        loaded = load_recipe(recipe)
    except RecipeError as exc:
        if not as_json:
            raise
        _print_json({"valid": False, "problems": [vars(i) for i in exc.issues]})
        sys.exit(1)
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
    """The stages a recipe can use, one line each; with NAME, every option of that stage: its type,
    default and what it does."""
    from curate.configs import describe_config
    from curate.stages import STAGES

    chosen = {k: v for k, v in STAGES.items() if name in (None, k)}
    if name and not chosen:
        raise click.BadParameter(f"no stage '{name}'; known: {', '.join(STAGES)}", param_hint="NAME")
    info = {
        k: {"doc": (v.__doc__ or "").strip(), "options": describe_config(v.Config)} for k, v in chosen.items()
    }
    if as_json:
        _print_json(info)
        return
    if name is None:
        table = Table(show_edge=False, show_header=False, pad_edge=False)
        table.add_column("stage", style="bold cyan", no_wrap=True)
        table.add_column("what it does", overflow="fold")
        for stage_name, stage in info.items():
            table.add_row(stage_name, stage["doc"])
        out.print(table)
        out.print("\n[dim]curate stages NAME: every option of one stage, with its default[/dim]")
        return
    stage = info[name]
    out.print(f"[bold cyan]{name}[/bold cyan]  {escape(stage['doc'])}\n")
    for opt in stage["options"]:
        default = opt["default"]
        out.print(f"[bold]{escape(opt['name'])}[/bold]  [dim]{escape(opt['type'])}[/dim]")
        if isinstance(default, list) and default:
            out.print("  default:")
            for item in default:
                out.print(
                    "    - " + escape(json.dumps(item, ensure_ascii=False)), soft_wrap=False, overflow="fold"
                )
        else:
            out.print(
                "  default: " + escape(json.dumps(default, ensure_ascii=False, default=str)), overflow="fold"
            )
        if opt["help"]:
            out.print(Padding(escape(opt["help"]), (0, 0, 0, 2)))
        out.print()


@main.command()
@click.argument("version", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--id", "record_id", help="Show one record: its text, source, edits, or why it was dropped.")
@click.option(
    "--source", "source_ref", metavar="PATH:ROW", help="Find records by input file and row instead."
)
@click.option("--full", is_flag=True, help="Show every turn's text whole (it is cut at 600 characters).")
@click.option(
    "--template",
    metavar="NAME_OR_TOKENIZER",
    help="With --id/--source: render the record as the trainer will (chatml, llama-3, or a tokenizer folder "
    "with a chat template), trained text highlighted.",
)
@click.option(
    "--tokenizer", metavar="PATH", help="Count tokens with this tokenizer (for a named --template)."
)
@click.option(
    "--max-len",
    default=2048,
    show_default=True,
    help="The trainer's sequence length: tokens past it are cut.",
)
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@_friendly_errors
def show(
    version: Path,
    record_id: str | None,
    source_ref: str | None,
    full: bool,
    template: str | None,
    tokenizer: str | None,
    max_len: int,
    as_json: bool,
) -> None:
    """Summarise a dataset VERSION (a version folder, or an output dir: its latest), or explain a record.

    \b
    A record's id is in the `id` column of data.parquet (kept) and dropped.parquet (dropped, with
    the reason); `--source FILE:ROW` finds it by where it came from instead: the input file (its
    name, or its path as the manifest lists it) and the row (JSONL and CSV: the line number;
    JSON arrays and Parquet: the 0-based index).
    """
    from curate import explain as explain_mod
    from curate.versions import read_manifest, resolve_version

    folder = resolve_version(version)
    if template and not (record_id or source_ref):
        raise CurateError("--template shows one record", hint="add --id ID or --source PATH:ROW")
    if record_id or source_ref:
        found = explain_mod.explain(folder, record_id=record_id, source_ref=source_ref)
        if template:
            _show_training_view(found, template, tokenizer, max_len, as_json)
            return
        if as_json:
            _print_json(found)
        else:
            explain_mod.render_explanation(found, out, full)
        return
    manifest = read_manifest(folder)
    if as_json:
        _print_json(manifest)
    else:
        _print_summary(manifest, folder)


def _show_training_view(
    found: dict, template: str, tokenizer: str | None, max_len: int, as_json: bool
) -> None:
    from curate.training_view import render_view, tokenizer_for, view

    if not found["kept"]:
        raise CurateError(
            "the record was dropped, so training never sees it",
            hint="curate show without --template says why",
        )
    tok = tokenizer_for(template, tokenizer)
    views = [{"id": rec["id"], **view(rec["messages"], template, tok, max_len)} for rec in found["kept"]]
    if as_json:
        _print_json(views)
        return
    for seen in views:
        out.print(f"[bold]{seen['id']}[/bold] as the trainer sees it with {escape(template)}:")
        render_view(seen, out)


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
    from curate.recipe import load_recipe

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
        table.add_column(
            col, justify="right" if col in ("records", "quarantined") else "left", overflow="fold"
        )
    for r in rows:
        table.add_row(
            r["path"], r["format"], f"{r['records']:,}", f"{r['quarantined']:,}", str(r.get("detected", ""))
        )
    out.print(table)
    total = sum(r["records"] for r in rows)
    out.print(f"{len(rows)} file(s), {total:,} records, {sum(r['quarantined'] for r in rows):,} quarantined")


@main.command("decontam-report")
@click.argument("version", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@_friendly_errors
def decontam_report(version: Path, as_json: bool) -> None:
    """Per eval set of a VERSION: how many of its items the training data contained, found by which method."""
    from curate.report.decontam import decontam_report as build
    from curate.report.decontam import render
    from curate.versions import resolve_version

    report = build(resolve_version(version))
    if as_json:
        _print_json(report)
    else:
        render(report, out)


@main.command()
@click.argument("a", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("b", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--sample", default=3, show_default=True, help="Records shown from each bucket.")
@click.option("--seed", default=0, show_default=True, help="Seed of the sample.")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@click.option(
    "--html",
    "html_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write the comparison as a self-contained HTML page to this file.",
)
@click.option("--tokenizer", metavar="PATH", help="A tokenizer folder: lengths in tokens too.")
@_friendly_errors
def diff(
    a: Path, b: Path, sample: int, seed: int, as_json: bool, html_file: Path | None, tokenizer: str | None
) -> None:
    """Compare two versions A and B (version folders, or output dirs meaning their latest).

    \b
    Records are matched by id and content, copies counted, then by source row: the
    same input row with other content is "changed". For each removed record, the stage
    and reason that dropped it in B; for each added one, what had dropped it in A.
    Then each stage's counts side by side, the recipe options that differ, shifts
    in source, format and origin mix and in lengths, and a seeded sample of each
    bucket.

    \b
      curate diff runs/sft/3f2a09c1 runs/sft/9c1d4e77
      curate diff runs/sft-strict runs/sft --json | jq .removed_by
    """
    from curate.report.diff import diff_versions, render, render_html

    report = diff_versions(a, b, sample=sample, seed=seed, tokenizer=tokenizer)
    if html_file is not None:
        html_file.write_text(render_html(report))
    if as_json:
        _print_json(report)
    else:
        render(report, out)


@main.command()
@click.argument("version", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--out",
    "out_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="HTML file to write (default: <version folder>.html beside the version; the version itself is "
    "never changed).",
)
@click.option("--seed", default=0, show_default=True, help="Seed of the examples shown per drop reason.")
@click.option(
    "--template",
    metavar="NAME_OR_TOKENIZER",
    help="Add what training will see with this template (chatml, llama-3 or a tokenizer folder): trained "
    "tokens per record, records with nothing trained or cut by --max-len, tool calls the template loses.",
)
@click.option(
    "--tokenizer", metavar="PATH", help="Count tokens with this tokenizer (for a named --template)."
)
@click.option("--max-len", default=2048, show_default=True, help="The trainer's sequence length.")
@click.option("--sample", default=2000, show_default=True, help="Records checked with --template (seeded).")
@_friendly_errors
def report(
    version: Path,
    out_file: Path | None,
    seed: int,
    template: str | None,
    tokenizer: str | None,
    max_len: int,
    sample: int,
) -> None:
    """Write a self-contained HTML report of VERSION (a version folder, or an output dir for its latest).

    \b
    The stage funnel, drops by reason with examples and their evidence, length and
    turn histograms, the source mix, eval-set contamination, the diversity map and
    LLM usage. It opens offline: plots are embedded, nothing is fetched, and no
    script runs (record texts are escaped, and the page forbids scripts). The
    version's README.md is its dataset card.
    """
    from curate.report.version import report_html
    from curate.versions import resolve_version

    folder = resolve_version(version)
    training = None
    if template:
        from curate.training_view import tokenizer_for, version_stats

        tok = tokenizer_for(template, tokenizer)
        training = version_stats(folder, template, tok, max_len, sample, seed)
    target = out_file or folder.with_name(f"{folder.name}.html")
    target.write_text(report_html(folder, seed, training))
    out.print(f"report -> {target}")


@main.command()
@click.argument("version", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--out",
    "out_file",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The frozen eval file to write (JSONL; its sha256 and origin go to <file>.json).",
)
@click.option("-n", "--n", "count", type=click.IntRange(min=1), default=200, show_default=True,
              help="Records to freeze, stratified by source.")  # fmt: skip
@click.option(
    "--seed", type=int, default=0, show_default=True, help="Which records: a seeded hash of their ids."
)
@click.option("--json", "as_json", is_flag=True, help="Print the sidecar (hash, counts) as JSON.")
@_friendly_errors
def freeze(version: Path, out_file: Path, count: int, seed: int, as_json: bool) -> None:
    """Set aside N records of VERSION (a version or output folder) as a frozen eval set.

    Freeze it first, before any change you want to measure: every later version is decontaminated
    against it and every arm of an ablation is judged on the same frozen items. Add it to the
    recipe's eval_sets (the line to add is printed); the next run drops those records and the runner
    refuses a version that still holds one. The same version, N and seed always freeze the same
    records; a frozen file is never overwritten with other records.
    """
    from curate.freeze import freeze_records, write_frozen

    items, info = freeze_records(version, count, seed)
    sidecar = write_frozen(out_file, items, info)
    if as_json:
        _print_json(sidecar)
        return
    per = ", ".join(f"{k}: {v}" for k, v in sidecar["per_source"].items())
    out.print(
        f"froze {sidecar['n']} records of {sidecar['version']} -> {out_file} "
        f"(sha256 {sidecar['sha256'][:12]})"
    )
    out.print(f"per source: {per}")
    out.print(
        "add to the recipe's eval_sets:\n"
        f"  - {{name: frozen, path: {out_file}, fields: {{question: question, answer: answer, id: id}}}}"
    )


@main.command()
@click.argument("version", type=click.Path(exists=True, file_okay=False, path_type=Path))
@_friendly_errors
def verify(version: Path) -> None:
    """Check a VERSION's files against the sha256 its manifest recorded when it was written.

    Exit status 1 names each file changed or missing. `curate train` makes the same check on
    the file it reads.
    """
    from curate.versions import resolve_version, verify_version

    folder = resolve_version(version)
    problems = verify_version(folder)
    if problems:
        raise CurateError(
            f"{folder.name}: " + "; ".join(problems), hint="rebuild the version with curate run"
        )
    out.print(f"{folder.name}: every file is as written")


@main.command()
@click.argument("out_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@_friendly_errors
def log(out_dir: Path, as_json: bool) -> None:
    """The versions in OUT_DIR, oldest first: parent, kept records and what changed against the parent.

    \b
    A version's parent is the one `curate run --parent` or the recipe's output.parent
    named, else the folder's latest before the run.
    """
    from curate.report.log import render, version_log

    entries = version_log(out_dir)
    if as_json:
        _print_json(entries)
    else:
        render(entries, out)


@main.group()
def cache() -> None:
    """The stage cache of an output folder, and the shared cache of LLM answers and embeddings.

    \b
    Each stage's output is kept under OUT/.cache, keyed by everything it depends on, so a re-run
    recomputes only what changed. Past a size limit (the recipe's cache.max_size, 20GB unless
    set) the least recently used outputs are removed after each run. Paid LLM answers and
    embeddings live in a shared cache per user, which prune never touches.
    """


def _stage_cache(folder: Path, max_size: str | None):
    from curate.cache import DEFAULT_MAX_BYTES, StageCache, parse_size

    return StageCache(folder / ".cache", parse_size(max_size) if max_size else DEFAULT_MAX_BYTES)


@cache.command("info")
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@_friendly_errors
def cache_info(folder: Path, as_json: bool) -> None:
    """Entries and size of the stage cache of FOLDER (an output folder), by stage; where the
    shared cache is, and its size."""
    import datetime as dt

    from curate.cache import folder_bytes, human_size, shared_cache_dir

    info = _stage_cache(folder, None).info()
    shared = shared_cache_dir()
    info["shared"] = {
        "path": str(shared),
        "llm_bytes": folder_bytes(shared / "llm"),
        "embedding_bytes": folder_bytes(shared / "embeddings"),
    }
    if as_json:
        _print_json(info)
        return

    def when(t: float | None) -> str:
        return dt.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M") if t else "-"

    out.print(f"[bold]stage cache[/bold] {info['path']}")
    out.print(
        f"{info['entries']} entries, {human_size(info['bytes'])} of {human_size(info['max_bytes'])}; "
        f"last used {when(info['newest'])}, least recently {when(info['oldest'])}"
    )
    table = Table(show_edge=False, header_style="bold")
    table.add_column("stage")
    table.add_column("entries", justify="right")
    table.add_column("size", justify="right")
    for name, item in sorted(info["stages"].items()):
        table.add_row(name, str(item["entries"]), human_size(item["bytes"]))
    if info["stages"]:
        out.print(table)
    sh = info["shared"]
    out.print(
        f"[bold]shared cache[/bold] {sh['path']}: LLM answers {human_size(sh['llm_bytes'])}, "
        f"embeddings {human_size(sh['embedding_bytes'])} (never pruned with a stage cache)"
    )


@cache.command("prune")
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--max-size", help="Keep at most this much (e.g. 5GB); default: 20GB.")
@click.option("--all", "everything", is_flag=True, help="Remove every stage output (as --max-size 0).")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@_friendly_errors
def cache_prune(folder: Path, max_size: str | None, everything: bool, as_json: bool) -> None:
    """Remove the least recently used stage outputs of FOLDER (an output folder) until the rest
    fit in --max-size.

    Versions are self-contained and never touched; the shared cache of LLM answers and
    embeddings is never touched either.
    """
    from curate.cache import human_size

    store = _stage_cache(folder, "0" if everything else max_size)
    done = store.prune()
    if as_json:
        _print_json(done)
        return
    out.print(
        f"removed {done['removed']} entries ({human_size(done['freed_bytes'])}); "
        f"{human_size(done['bytes'])} left, limit {human_size(done['max_bytes'])}"
    )


def _overrides(pairs: tuple[str, ...]) -> dict:
    """`--set key=value` pairs; values are read as YAML, so numbers and booleans keep their type."""
    import yaml

    result = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r}: expected KEY=VALUE", param_hint="--set")
        parsed = yaml.safe_load(value)
        if isinstance(parsed, str):  # YAML 1.1 reads 2e-4 as text; a learning rate is a number
            try:
                parsed = float(parsed)
            except ValueError:
                pass
        result[key.strip()] = parsed
    return result


@main.command()
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--data",
    "data",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Dataset version to train on (a version folder, or an output dir for its latest).",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("runs/train"),
    show_default=True,
    help="Where adapter/, metrics.json and loss.png go.",
)
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a training recipe key, e.g. --set max_steps=20 --set lora.r=8 (repeatable).",
)
@click.option("--json", "as_json", is_flag=True, help="Print metrics.json on stdout (and nothing else).")
@click.option("-v", "--verbose", is_flag=True, help="Also show the libraries' own logs, bars and warnings.")
@_friendly_errors
def train(
    recipe: Path, data: Path, out_dir: Path, overrides: tuple[str, ...], as_json: bool, verbose: bool
) -> None:
    """Fine-tune a base model on a dataset version with QLoRA (train/*.yaml), then run the eval gates.

    \b
    curate train train/tiny-cpu.yaml --data runs/demo              # CPU, tiny model, ~1 minute
    curate train train/qlora-default.yaml --data runs/sft-mix      # 7-8B on one 24 GB GPU
    """
    from curate.train import require_training_extra
    from curate.versions import resolve_version

    require_training_extra()  # before torch and friends load
    from curate.train.trainer import run_training

    metrics = run_training(
        recipe, resolve_version(data), out_dir, _overrides(overrides), not as_json, verbose
    )
    if as_json:
        _print_json(metrics)
        return
    out.print(f"adapter and metrics in {out_dir}")
    if metrics.get("gates"):
        _print_gates(metrics["gates"])


@main.command()
@click.argument("spec", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where the runs and the report go (default: the spec's out, else runs/ablations/<spec name>).",
)
@click.option(
    "--devices",
    help="CUDA devices to spread the runs over, one run per device at a time, e.g. 0,1 (default: every "
    "GPU when there are several, else one run after another in this process).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON; no progress display.")
@_friendly_errors
def ablate(spec: Path, out_dir: Path | None, devices: str | None, as_json: bool) -> None:
    """Train one recipe on several dataset versions (arms) and seeds on an equal token budget, and
    say which arm is better, with the noise shown.

    \b
    name: dedup-ablation
    train: ../train/tiny-cpu.yaml
    arms: [{name: raw, version: ../runs/raw}, {name: dedup, version: ../runs/dedup}]
    baseline: raw            # default: the first arm
    seeds: 3
    eval_sets: [{name: frozen, path: frozen.jsonl, fields: {question: question, answer: answer, id: id}}]

    Every arm is judged on the same items (each item's loss, averaged over seeds, against the
    baseline's: a paired bootstrap interval and a verdict), and checked for eval items in its
    training data: such an arm is flagged and the items named. Writes report.md, report.html, report.json and
    ablation.png; finished runs are not run again, so an interrupted ablation resumes.
    """
    from curate.train import require_training_extra

    require_training_extra()
    from curate.train.ablation import load_spec, run_ablation

    loaded = load_spec(spec, out_dir)
    say = (lambda text: None) if as_json else (lambda text: out.print(f"[dim]{escape(text)}[/dim]"))
    chosen = [d.strip() for d in devices.split(",") if d.strip()] if devices else None
    report = run_ablation(loaded, show_progress=not as_json, say=say, devices=chosen)
    if as_json:
        _print_json(report)
        return
    for line in report["verdicts"]:
        out.print(escape(line))
    out.print(f"report: {loaded.out / 'report.md'} (and report.html, report.json, ablation.png)")


@main.command("eval")
@click.option(
    "--adapter",
    "adapter",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Adapter folder written by `curate train`.",
)
@click.option(
    "--recipe",
    "recipe",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Training recipe whose gate thresholds to use (default: the one it was trained with).",
)
@click.option(
    "--data",
    "data",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Dataset version for the held-out split (default: the one it was trained on).",
)
@click.option(
    "--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), help="Write gates.json here."
)
@click.option("--json", "as_json", is_flag=True, help="Print the gate report as JSON (and nothing else).")
@click.option("-v", "--verbose", is_flag=True, help="Also show the libraries' own logs, bars and warnings.")
@_friendly_errors
def evaluate(
    adapter: Path,
    recipe: Path | None,
    data: Path | None,
    out_dir: Path | None,
    as_json: bool,
    verbose: bool,
) -> None:
    """Run the evaluation gates on an adapter, each figure beside the base model's; exit 1 if a gate fails."""
    from curate.train import require_training_extra
    from curate.versions import resolve_version

    require_training_extra()  # before torch and friends load
    from curate.train.evaluation import run_eval

    report = run_eval(recipe, adapter, resolve_version(data) if data else None, out_dir, not as_json, verbose)
    if as_json:
        _print_json(report)
    else:
        _print_gates(report)
    if report.get("passed") is False:
        sys.exit(1)


def _print_gates(report: dict) -> None:
    table = Table(show_edge=False, header_style="bold", title="evaluation gates")
    for col in ("gate", "tuned", "base model", "threshold", "result"):
        table.add_column(col, justify="left" if col in ("gate", "result") else "right")

    def fmt(x) -> str:
        return "-" if x is None else (f"{x:.4g}" if isinstance(x, float) else str(x))

    for g in report.get("gates", []):
        if g.get("value") is None:
            result = "[dim]n/a[/dim]"
        else:
            result = {True: "[green]pass[/green]", False: "[red]FAIL[/red]", None: "reported"}[
                g.get("passed")
            ]
        table.add_row(g["name"], fmt(g.get("value")), fmt(g.get("base")), fmt(g.get("threshold")), result)
    out.print(table)
    verdict = report.get("passed")
    if verdict is None:
        out.print("[dim]no gate has a threshold here: the figures are reported, not judged[/dim]")
    else:
        out.print(
            "[green]all gates with a threshold pass[/green]" if verdict else "[red]some gates fail[/red]"
        )


if __name__ == "__main__":  # pragma: no cover
    main()
