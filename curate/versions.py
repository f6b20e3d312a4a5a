"""Dataset versions: the folder a run writes, its manifest, the `latest` pointer, and reading them back.

A version is written into a hidden temporary folder and renamed into place in one step, so a crash
never leaves a half version visible and never touches an earlier one.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import curate
from curate.errors import CurateError
from curate.records import train_messages

if TYPE_CHECKING:  # the trainer reads versions on machines without polars
    import polars as pl

LATEST = "latest"
# Written with fixed settings so the same records give byte-identical files.
PARQUET_OPTIONS = {"compression": "zstd", "compression_level": 3, "statistics": True}


def version_id(recipe_raw: dict, input_hashes: list[str], kept_ids: list[str], dropped: list[tuple]) -> str:
    """Content-derived id: the recipe as run, the input bytes, and what was kept and dropped, in order."""
    recipe = {k: v for k, v in recipe_raw.items() if k != "output"}
    h = hashlib.blake2b(digest_size=6)
    h.update(json.dumps(recipe, sort_keys=True, default=str).encode())
    h.update(json.dumps(input_hashes).encode())
    h.update("\n".join(kept_ids).encode())
    h.update(json.dumps(dropped).encode())
    return "v" + h.hexdigest()


def code_version() -> str:
    """curate's version plus the git commit when running from a checkout (for the manifest only)."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{curate.__version__}+{commit}" if commit else curate.__version__


def write_version(
    out_dir: Path,
    vid: str,
    manifest: dict,
    kept: pl.DataFrame,
    dropped: pl.DataFrame,
    edits: pl.DataFrame,
    quarantine: list[dict],
) -> Path:
    """Write all files of a version atomically and point `latest` at it. Returns the version folder."""
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / vid
    if final.exists():
        # Same id means same recipe, inputs and results: the data files are already there, byte for
        # byte. Only the manifest is renewed, so it tells how this run got there (which stages were
        # cached); the version keeps its first creation time and parent.
        first = read_manifest(final)
        manifest = {**manifest, "created": first["created"], "parent": first["parent"], "rerun": now_iso()}
        _write_atomic(final / "manifest.json", json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
        _point_latest(out_dir, vid)
        return final
    tmp = out_dir / f".tmp-{vid}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        kept.write_parquet(tmp / "data.parquet", **PARQUET_OPTIONS)
        dropped.write_parquet(tmp / "dropped.parquet", **PARQUET_OPTIONS)
        edits.write_parquet(tmp / "edits.parquet", **PARQUET_OPTIONS)
        _write_train_jsonl(kept, tmp / "train.jsonl")
        with open(tmp / "quarantine.jsonl", "w", encoding="utf-8") as f:
            for entry in quarantine:
                f.write(json.dumps(entry, ensure_ascii=False) + "\n")
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _point_latest(out_dir, vid)
    return final


def _write_train_jsonl(kept: pl.DataFrame, path: Path) -> None:
    """One {"messages": [...], "tools": [...]} line per record, as TRL and Axolotl read them.

    Records that are only roles and text (nearly all) are written by a compiled kernel that gives
    json.dumps' bytes; those with tool calls, tool names or tool definitions go through
    `train_messages`, which parses the JSON text they carry back into lists.
    """
    import polars as pl

    from curate.text.jsonl import chat_lines

    turn = pl.element().struct
    rich = (
        pl.col("messages")
        .list.eval(turn.field("tool_calls").is_not_null() | turn.field("name").is_not_null())
        .list.any()
        .fill_null(False)
        | pl.col("tools").is_not_null()
    )
    rows = kept.with_row_index("row").filter(rich).select("row", "messages", "tools").iter_rows(named=True)
    given = {}
    for row in rows:
        line = {"messages": train_messages(row["messages"])}
        if row["tools"]:
            line["tools"] = json.loads(row["tools"])  # a list of definitions, as TRL expects
        given[row["row"]] = json.dumps(line, ensure_ascii=False)
    path.write_bytes(chat_lines(kept["messages"].to_arrow(), given))


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _point_latest(out_dir: Path, vid: str) -> None:
    link = out_dir / LATEST
    tmp = out_dir / f".{LATEST}-{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(vid, tmp)
    os.replace(tmp, link)


def resolve_version(path: str | Path) -> Path:
    """A version folder from a version folder, an output dir (its latest) or a `latest` pointer."""
    path = Path(path)
    if (path / "manifest.json").is_file():
        return path
    latest = path / LATEST
    if latest.is_symlink() or latest.is_dir():
        target = latest.resolve()
    elif latest.is_file():
        target = path / latest.read_text().strip()
    else:
        raise CurateError(
            f"{path} is not a dataset version", hint="give a version folder or the output dir of `curate run`"
        )
    if not (target / "manifest.json").is_file():
        raise CurateError(f"{path}: latest points at {target.name}, which has no manifest.json")
    return target


def read_manifest(version: Path) -> dict:
    return json.loads((version / "manifest.json").read_text())


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat()
