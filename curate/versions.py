"""Dataset versions: the folder a run writes, its manifest, the `latest` pointer, and reading them back.

A version is written into a hidden temporary folder and renamed into place in one step, so a crash
never leaves a half version visible and never touches an earlier one.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa

import curate
from curate.errors import CurateError
from curate.records import train_messages, train_tools

if TYPE_CHECKING:  # the trainer reads versions on machines without polars
    from curate.dataset import Part, RecordFiles

LATEST = "latest"
# How a version's files are written. A version with the same id has the same bytes, so a change
# to the files' format (not only to their content) must change the id: bump this with it.
FILES_FORMAT = 2  # 2: every train.jsonl line and turn carries the same keys
# Written with fixed settings so the same records give byte-identical files.
PARQUET_OPTIONS = {"compression": "zstd", "compression_level": 3, "statistics": True}
IN_MEMORY_ROWS = 100_000  # tables up to this many records are written in one piece (up to IN_MEMORY_BYTES
IN_MEMORY_BYTES = (
    64 << 20
)  # of compressed parts: all of ../shared/data/raw fits, and its files are as before)
ROW_GROUP_ROWS = 1 << 14  # larger ones are streamed in row groups of this many records (16k keeps the
# writer near 250 MB over its input: 64k took 550 MB on the dropped records of 1M)


class VersionId:
    """The content-derived id of a version, fed as the run goes: the recipe as run, the input bytes,
    then the ids of the kept records and (id, stage, reason) of the dropped ones, in order. Streamed,
    so it never needs every id at once; the digest is that of one pass over all of it."""

    def __init__(self, recipe_raw: dict, input_hashes: list[str]) -> None:
        # where the version is written and which engine computed it change nothing in it
        recipe = {k: v for k, v in recipe_raw.items() if k not in ("output", "engine")}
        self._h = hashlib.blake2b(digest_size=6)
        if FILES_FORMAT > 1:  # format 1 (before train.jsonl's uniform keys) hashed no format
            self._h.update(f"files-format-{FILES_FORMAT}".encode())
        self._h.update(json.dumps(recipe, sort_keys=True, default=str).encode())
        self._h.update(json.dumps(input_hashes).encode())
        self._kept = self._dropped = 0

    def kept(self, ids: list[str]) -> None:
        if ids:
            self._h.update((("\n" if self._kept else "") + "\n".join(ids)).encode())
            self._kept += len(ids)

    def dropped(self, rows: list[tuple[str, str, str]]) -> None:
        if rows:
            self._h.update(
                ((", " if self._dropped else "[") + ", ".join(json.dumps(list(r)) for r in rows)).encode()
            )
            self._dropped += len(rows)

    def hexdigest(self) -> str:
        h = self._h.copy()
        h.update(b"]" if self._dropped else b"[]")
        return "v" + h.hexdigest()


def check_writable(out_dir: Path) -> None:
    """Fail at once, with the folder named, when the output folder cannot be written: a run writes
    its stage cache and its version there (a fully cached re-run too, to mark what it used)."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(dir=out_dir, prefix=".curate-write-test-")
        os.close(handle)
        os.unlink(probe)
    except OSError as exc:
        raise CurateError(
            f"cannot write to the output folder {out_dir}: {exc.strerror or exc}",
            hint="give a writable one with --out (or output.dir in the recipe), or make this one writable",
        ) from None


@contextlib.contextmanager
def output_lock(out_dir: Path) -> Iterator[None]:
    """Hold the output folder for one run: a second `curate run` into it refuses at once, naming
    the first, instead of racing it over the stage cache and `latest`. The kernel drops the lock
    when its process dies, however it dies, so a killed run never leaves the folder locked."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / ".lock", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            raise CurateError(
                f"{out_dir} is in use by another curate run ({holder})",
                hint="wait for it to finish, or give this run another --out",
            ) from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()}")
        lock.flush()
        for stale in [*out_dir.glob(".tmp-*"), *out_dir.glob(f".{LATEST}-*")]:  # left by killed runs
            if stale.is_symlink() or stale.is_file():
                stale.unlink()
            else:
                shutil.rmtree(stale, ignore_errors=True)
        yield


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
    records: RecordFiles,
    dropped: list[list[Part]],
    edits: list[list[Part]],
    quarantine: Path | None,
    artifacts: list[Path] = (),
) -> tuple[Path, bool]:
    """Write all files of a version atomically and point `latest` at it: the version folder, and
    whether it was written now (a version that exists already is left untouched, byte for byte:
    the same id means the same recipe, inputs and result)."""
    from curate.decisions import DROPPED_SCHEMA
    from curate.edits import EDITS_SCHEMA
    from curate.records import RECORD_SCHEMA
    from curate.report.card import dataset_card

    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / vid
    if (final / "manifest.json").is_file():
        _point_latest(out_dir, vid)
        return final, False
    tmp = out_dir / f".tmp-{vid}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        _write_table([records.parts], tmp / "data.parquet", RECORD_SCHEMA)
        _write_table(dropped, tmp / "dropped.parquet", DROPPED_SCHEMA)
        _write_table(edits, tmp / "edits.parquet", EDITS_SCHEMA)
        _write_train_jsonl(records, tmp / "train.jsonl")
        if quarantine is not None and quarantine.is_file():
            shutil.copyfile(quarantine, tmp / "quarantine.jsonl")
        else:
            (tmp / "quarantine.jsonl").write_bytes(b"")
        for artifact in artifacts:  # stages' own files, e.g. diversity-map.png
            shutil.copyfile(artifact, tmp / artifact.name)
        (tmp / "README.md").write_text(dataset_card(manifest))
        manifest = {**manifest, "files": {f.name: sha256_of(f) for f in sorted(tmp.iterdir())}}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _point_latest(out_dir, vid)
    return final, True


def _write_table(stages: list[list[Part]], path: Path, schema) -> None:
    """Parts of a table (grouped by the stage that wrote them), in order, as one Parquet file.

    A table of up to IN_MEMORY_ROWS records whose parts take at most IN_MEMORY_BYTES on disk is
    gathered, one chunk per stage, and written by polars in one go, as versions always were; a
    larger one is streamed in row groups of ROW_GROUP_ROWS records cut at fixed row numbers. Either
    way the bytes depend on the rows, not on how an engine cut them into parts.
    """
    import polars as pl
    import pyarrow as pa
    import pyarrow.parquet as pq

    from curate.dataset import RecordFiles, read_part, read_segments

    parts = [p for stage in stages for p in stage]
    rows = sum(p.rows for p in parts)
    if rows <= IN_MEMORY_ROWS and sum(os.path.getsize(p.path) for p in parts) <= IN_MEMORY_BYTES:
        frames = [
            pl.from_arrow(pa.concat_tables(read_part(p.path) for p in stage)).rechunk()
            for stage in stages
            if stage
        ]
        table = pl.concat(frames, rechunk=False) if frames else pl.from_arrow(schema.empty_table())
        table.write_parquet(path, **PARQUET_OPTIONS)
        return
    files = RecordFiles(parts, schema)
    with pq.ParquetWriter(
        path, schema, compression="zstd", compression_level=3, write_statistics=True
    ) as out:
        for lo in range(0, rows, ROW_GROUP_ROWS):
            batch = read_segments(files.segments(lo, min(lo + ROW_GROUP_ROWS, rows)))
            out.write_table(batch.cast(schema).combine_chunks(), row_group_size=ROW_GROUP_ROWS)


def _write_train_jsonl(records: RecordFiles, path: Path) -> None:
    """train.jsonl, batch by batch: first the records with tool calls, tool turns or tool
    definitions, then every other, each group in data order.

    Every line carries the same keys, but a plain record's are null, and `datasets` types each
    column from the first block of a file: had the first block only plain records, a later tool
    call could not be cast to their null type and the file would not load. Trainers shuffle; the
    order of lines means nothing else (data.parquet keeps the data order).
    """
    with open(path, "wb") as f:
        for rich_pass in (True, False):
            for batch in records.batches():
                rich = _rich(batch)
                if rich_pass and rich.any():
                    f.write(train_lines(batch.filter(pa.array(rich))))
                elif not rich_pass and not rich.all():
                    f.write(train_lines(batch.filter(pa.array(~rich))))


def _rich(batch: pa.Table):
    """Which records carry tool calls, tool names or tool definitions (as a numpy bool array)."""
    import polars as pl

    turn = pl.element().struct
    rich = (
        pl.col("messages")
        .list.eval(turn.field("tool_calls").is_not_null() | turn.field("name").is_not_null())
        .list.any()
        .fill_null(False)
        | pl.col("tools").is_not_null()
    )
    return pl.from_arrow(batch.select(["messages", "tools"])).select(rich).to_series().to_numpy()


def train_lines(batch: pa.Table) -> memoryview | bytes:
    """One {"messages": [...], "tools": ...} line per record, as TRL and Axolotl read them.

    Records that are only roles and text (nearly all) are written by a compiled kernel that gives
    json.dumps' bytes; those with tool calls, tool names or tool definitions go through
    `train_messages` and `train_tools`.
    """
    from curate.text.jsonl import chat_lines

    given = {}
    for row in _rich(batch).nonzero()[0].tolist():
        messages, tools = batch["messages"][row].as_py(), batch["tools"][row].as_py()
        line = {"messages": train_messages(messages), "tools": train_tools(tools)}
        given[row] = json.dumps(line, ensure_ascii=False)
    return chat_lines(batch["messages"], given)


def write_atomic(path: Path, text: str) -> None:
    """Write a text file whole or not at all (a temporary file beside it, then renamed over it)."""
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


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def verify_version(folder: Path, names: list[str] | None = None) -> list[str]:
    """What differs from the checksums the manifest recorded when the version was written: a file
    changed or missing (all files, or only `names`). Empty when all is as written."""
    recorded = read_manifest(folder).get("files")
    if recorded is None:
        return ["manifest.json records no checksums (the version predates them): nothing to check"]
    problems = []
    for name, expected in recorded.items():
        if names is not None and name not in names:
            continue
        path = folder / name
        if not path.is_file():
            problems.append(f"{name}: missing")
        elif sha256_of(path) != expected:
            problems.append(f"{name}: changed since the version was written (sha256 differs)")
    return problems


def read_manifest(version: Path) -> dict:
    return json.loads((version / "manifest.json").read_text())


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat()
