"""Reading the recipe's inputs: files, globs, folders and HF datasets -> canonical records, in batches.

`read_input(spec, base_dir)` is what the runner calls: it lists the input's files, reads each as a
stream of rows, detects the shape once per file (per row where a file mixes shapes), converts rows
to records and yields them in batches together with the quarantine (unparseable lines and rows
whose content cannot become a conversation). One input row gives one record, except OASST trees
with `oasst_paths: all`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import chain, islice, pairwise
from pathlib import Path

import numpy as np
import pyarrow as pa

from curate.configs import config_schema, make_config, option, schema_issues
from curate.errors import FormatError, Issue, RecipeError
from curate.formats import (  # noqa: F401 - each module registers its format on import
    alpaca,
    fields,
    hh,
    instructions,
    kto,
    multiple_choice,
    oasst,
    openai,
    preference,
    prompt_completion,
    question_answer,
    self_instruct,
    sharegpt,
)
from curate.formats.base import FORMATS, Format, FormatOptions, RecordError
from curate.formats.detect import HEAD_ROWS, detect_file, detect_row, format_names, unknown_shape
from curate.formats.readers import (
    RAW_LIMIT,
    Row,
    Unreadable,
    expand,
    is_hf_folder,
    iter_file,
    iter_hf,
    load_hf,
    stem,
)
from curate.records import RecordColumns, source_column


@dataclass
class InputSpec:
    """One entry of the recipe's `inputs:` list."""

    path: str = option(
        help="A file, a glob, a folder (every data file under it), hf:NAME, or a save_to_disk folder.",
        minLength=1,
    )
    name: str | None = option(None, help="Source name of its records (default: the file's stem).")
    format: str = option("auto", help="A format name, or auto to detect the shape of each file.")
    fields: dict | None = option(
        None,
        help="Roles mapped to source keys, for any other shape: {user: KEY or [KEY, ...], assistant: KEY, "
        "system: KEY, rejected: KEY, label: KEY, tools: KEY}; a list joins several keys into one turn.",
    )
    split: str | None = option(None, help="hf: split (default train).")
    config: str | None = option(None, help="hf: config name.")
    options: dict = option({}, help="Per-format options (oasst_paths, end_markers).")

    def check(self) -> None:
        if self.fields is not None and self.format not in ("auto", "fields"):
            raise ValueError(
                f"`fields:` maps roles itself and cannot be combined with format {self.format!r}",
                "leave `format:` out (or write `format: fields`) when you give a mapping",
            )
        if self.format == "fields" and not self.fields:
            raise ValueError(
                "format 'fields' needs a `fields:` mapping", "e.g. fields: {user: q, assistant: a}"
            )

    @classmethod
    def parse(cls, entry: object, where: str) -> tuple[InputSpec | None, list[Issue]]:
        """The spec of a recipe entry (a mapping, or just its path), or the issues that keep it from
        being one."""
        if isinstance(entry, str):
            entry = {"path": entry}
        issues = schema_issues(input_schema(), entry, where)
        if issues:
            return None, issues
        spec, issues = make_config(cls, entry, where)
        if spec is not None and spec.fields:
            spec.format = "fields"
        return (None if issues else spec), issues

    @classmethod
    def from_recipe(cls, entry: object, where: str) -> InputSpec:
        spec, issues = cls.parse(entry, where)
        if issues:
            raise RecipeError(issues)
        return spec


def input_schema() -> dict:
    """The JSON Schema of one input: InputSpec's options, with the registered formats and the
    per-format options filled in."""
    schema = config_schema(InputSpec)
    props = schema["properties"]
    props["format"].update({"title": "format", "enum": ["auto", *format_names()]})
    key = {"type": "string", "minLength": 1}
    keys = {"anyOf": [key, {"type": "array", "minItems": 1, "items": key}]}
    parts = {part: key if part in ("label", "tools") else keys for part in fields.PARTS}
    props["fields"].update(
        {
            "type": ["object", "null"],
            "propertyNames": {"title": "part", "enum": list(fields.PARTS)},
            "properties": parts,
            "required": ["user"],
        }
    )
    props["options"].update(config_schema(FormatOptions))
    return schema


@dataclass
class IngestBatch:
    """Records read from one or more files, as one canonical Arrow table, with the quarantine met
    reading them and what each file contributed (a large file's counts spread over several batches)."""

    table: pa.Table  # of curate.records.RECORD_SCHEMA
    quarantined: list[dict]  # {"file", "line", "error", "raw"}
    # {"path", "format", "records", "quarantined"} for every file begun or read in this batch; the
    # format is the file's (rows of mixed files name their own in source.format)
    files: list[dict]

    @property
    def records(self) -> list[dict]:
        """The records as dicts (a conversion: for inspection and tests, not for bulk work)."""
        return self.table.to_pylist()


def input_files(spec: InputSpec, base_dir: Path) -> list[Path]:
    """The files (and save_to_disk folders) an input names, sorted; [] for hf:NAME."""
    if spec.path.startswith("hf:"):
        return []
    return expand(spec.path, Path(base_dir))


def relative(path: Path, base_dir: Path) -> str:
    """The path as the record's source.path: relative to the recipe's folder, posix, never absolute."""
    return Path(os.path.relpath(path, base_dir)).as_posix()


def read_input(
    spec: InputSpec, base_dir: Path, batch_size: int = 5000, paths: list[Path] | None = None
) -> Iterator[IngestBatch]:
    """Records of every file of the input (or of `paths`, some of its files), in batches of about
    `batch_size`; small files share a batch, so thousands of them cost little more than one."""
    base_dir = Path(base_dir)
    InputSpec.from_recipe(
        dataclasses.asdict(spec), spec.path
    )  # a spec made in code meets the recipe's checks
    reader = _Reader(spec, FormatOptions.from_dict(spec.options, spec.fields), batch_size)
    step = min(batch_size, CHUNK_ROWS)
    if spec.path.startswith("hf:"):
        name = spec.path[3:]
        dataset = load_hf(name, None, spec.split, spec.config)
        label = spec.path + "".join(f":{v}" for v in (spec.config, spec.split) if v)
        yield from reader.read(label, spec.name or name.rsplit("/", 1)[-1], iter_hf(dataset, step))
    else:
        for path in input_files(spec, base_dir) if paths is None else paths:
            if is_hf_folder(path):
                rows = iter_hf(load_hf(None, path, spec.split, None), step)
            else:
                rows = _readable(iter_file(path, step), path)
            yield from reader.read(relative(path, base_dir), spec.name or stem(path), rows)
    yield from reader.flush()


def _readable(rows: Iterator, path: Path) -> Iterator:
    """The rows of a file, with what can go wrong below the row level said as one error naming it:
    it vanished or lost its permissions meanwhile, or a JSON document or CSV file is not UTF-8
    (JSONL quarantines such a line on its own)."""
    try:
        yield from rows
    except UnicodeDecodeError as exc:
        raise FormatError(
            f"{path}: not UTF-8 text ({exc.reason}, byte {exc.object[exc.start : exc.end]!r})",
            hint="save it as UTF-8 (e.g. iconv -f latin1 -t utf-8), or as JSONL, where a bad line is "
            "quarantined alone",
        ) from None
    except OSError as exc:
        raise FormatError(
            f"{path}: could not be read ({exc.strerror or exc})",
            hint="it was there when the run started: was it moved, deleted or made unreadable meanwhile?",
        ) from None


def inspect_input(spec: InputSpec, base_dir: Path) -> list[dict]:
    """Per file: its format, record and quarantine counts, whether it was detected (for `curate formats`)."""
    out: dict[str, dict] = {}
    for batch in read_input(spec, base_dir):
        for entry in batch.files:
            item = out.setdefault(
                entry["path"],
                {
                    **entry,
                    "records": 0,
                    "quarantined": 0,
                    "detected": spec.format == "auto",
                    "formats": Counter(),
                },
            )
            item["records"] += entry["records"]
            item["quarantined"] += entry["quarantined"]
        source = batch.table["source"].combine_chunks()
        for path, fmt in zip(
            source.field("path").to_pylist(), source.field("format").to_pylist(), strict=True
        ):
            out[path]["formats"][fmt] += 1
    for item in out.values():
        item["formats"] = dict(sorted(item["formats"].items()))
    return list(out.values())


def _quarantine(path: str, line: int, error: str, raw: object) -> dict:
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", errors="replace").rstrip("\r\n")
    elif not isinstance(raw, str):
        raw = json.dumps(raw, ensure_ascii=False, default=str)
    return {"file": path, "line": line, "error": error, "raw": raw[:RAW_LIMIT]}


def _choose_format(head: list, path: str, spec: InputSpec) -> tuple[Format | None, bool]:
    """The file's format and whether rows must each be checked against it (auto-detection)."""
    rows = [value for _, value, _ in head if isinstance(value, dict)]
    if spec.format == "fields":
        mapped = [k for part, keys in spec.fields.items() for k in fields.keys_of(keys)]
        if rows and not any(all(k in row for k in mapped) for row in rows):
            raise FormatError(
                f"{path}: the `fields:` mapping names keys the rows do not have: "
                f"{', '.join(k for k in mapped if k not in rows[0])}",
                hint=f"keys seen: {', '.join(dict.fromkeys(k for row in rows for k in row))}",
            )
        return FORMATS["fields"], False
    if spec.format != "auto":
        fmt = FORMATS[spec.format]
        if rows and not any(fmt.detect(row) for row in rows):
            found, _ = detect_file(rows)
            seen = ", ".join(dict.fromkeys(k for row in rows for k in row))
            raise FormatError(
                f"{path}: `format: {fmt.name}` does not fit its rows (keys seen: {seen})",
                hint=f"these rows look like {found.name!r}; use `format: auto`"
                if found
                else "map the keys with `fields: {user: KEY, assistant: KEY}`",
            )
        return fmt, False
    if not rows:
        return None, True
    fmt, _ = detect_file(rows)
    if fmt is None:
        raise unknown_shape(path, rows)
    return fmt, True


CHUNK_ROWS = 4096  # rows a batch converter takes at once


@dataclass
class _File:
    """One file being read: where its rows come from and how they are converted."""

    path: str  # as source.path and the quarantine name it
    name: str  # source.name
    format: Format | None  # the file's format; None for a file with no object rows to detect from
    check_rows: bool  # auto-detection: rows that do not fit the file's format are detected one by one


class _Reader:
    """Rows of one file after another -> batches of records.

    Files whose format has a batch converter queue their rows (across files, as long as the format
    stays the same) and are converted CHUNK_ROWS at a time; the rows it leaves, and every row of
    other formats, are converted one by one. Records keep file order and row order throughout.
    """

    def __init__(self, spec: InputSpec, options: FormatOptions, batch_size: int) -> None:
        self.spec, self.options, self.batch_size = spec, options, batch_size
        self.chunk_rows = min(batch_size, CHUNK_ROWS)
        self.records = RecordColumns()
        self.quarantined: list[dict] = []
        self.formats: dict[str, str] = {}  # path -> the file's format name, for the batches' file lists
        self.begun: list[str] = []  # files begun since the last batch
        self.queue: list[Row] = []
        self.queue_files: list[tuple[_File, int]] = []  # the queue's files, with their number of rows

    def read(self, path: str, name: str, rows: Iterator[Row]) -> Iterator[IngestBatch]:
        head = list(islice(rows, HEAD_ROWS))
        fmt, check_rows = _choose_format(head, path, self.spec)
        file = _File(path, name, fmt, check_rows)
        self.formats[path] = fmt.name if fmt else "empty"
        self.begun.append(path)
        stream = chain(head, rows)
        batched = fmt is not None and fmt.convert_batch is not None
        if not batched or (self.queue and self.queue_files[-1][0].format is not fmt):
            self._convert_queue()
        while True:
            chunk = list(islice(stream, self.chunk_rows - len(self.queue)))
            if not chunk:
                break
            if not batched:
                for row in chunk:
                    self._convert_row(file, row)
            else:
                self.queue += chunk
                self.queue_files.append((file, len(chunk)))
                if len(self.queue) >= self.chunk_rows:
                    self._convert_queue()
            if len(self.records) >= self.batch_size:
                yield self._batch()

    def flush(self) -> Iterator[IngestBatch]:
        """The last batch (there is always one, possibly empty)."""
        self._convert_queue()
        yield self._batch()

    def _convert_queue(self) -> None:
        """The queued rows through their format's batch converter; the rows it leaves one by one."""
        if not self.queue:
            return
        fmt = self.queue_files[0][0].format
        batch = fmt.convert_batch([value for _, value, _ in self.queue], self.options)
        files = [file for file, count in self.queue_files for _ in range(count)]
        handled = batch.handled
        # runs of rows the batch converter took or left, in queue order
        edges = [0, *(np.flatnonzero(np.diff(handled.astype(np.int8))) + 1).tolist(), len(handled)]
        done = 0  # converted rows of the batch used so far
        for start, end in pairwise(edges):
            if not handled[start]:
                for file, row in zip(files[start:end], self.queue[start:end], strict=True):
                    self._convert_row(file, row)
                continue
            n = end - start
            sources = source_column(
                [file.name for file in files[start:end]],
                [file.path for file in files[start:end]],
                [number for number, _, _ in self.queue[start:end]],
                [fmt.name] * n,
            )
            self.records.add_columns(batch.messages.slice(done, n), sources, batch.meta[done : done + n])
            done += n
        self.queue, self.queue_files = [], []

    def _convert_row(self, file: _File, row: Row) -> None:
        """One row: detection where the file mixes shapes, conversion, or the quarantine."""
        number, value, raw = row
        if type(value) is not dict:
            if isinstance(value, Unreadable):
                self.quarantined.append(_quarantine(file.path, number, value.error, value.raw))
            else:
                error = f"row is {type(value).__name__}, expected an object"
                self.quarantined.append(
                    _quarantine(file.path, number, error, raw if raw is not None else value)
                )
            return
        fmt = file.format
        if file.check_rows and (fmt is None or not fmt.detect(value)):
            fmt = detect_row(value)
            if fmt is None:
                error = f"unknown record shape; keys: {', '.join(value)}"
                self.quarantined.append(
                    _quarantine(file.path, number, error, raw if raw is not None else value)
                )
                return
        try:
            converted = fmt.convert(value, self.options)
        except RecordError as exc:
            error = f"{fmt.name}: {exc}"
            self.quarantined.append(_quarantine(file.path, number, error, raw if raw is not None else value))
            return
        except (KeyError, TypeError, AttributeError, IndexError) as exc:
            error = f"{fmt.name}: missing or malformed field ({type(exc).__name__}: {exc})"
            self.quarantined.append(_quarantine(file.path, number, error, raw if raw is not None else value))
            return
        source = {"name": file.name, "path": file.path, "row": number, "format": fmt.name}
        for item in converted:
            self.records.add(source=source, **item)

    def _batch(self) -> IngestBatch:
        table = self.records.table()
        counts = Counter(table["source"].combine_chunks().field("path").to_pylist())
        held = Counter(q["file"] for q in self.quarantined)
        paths = dict.fromkeys([*self.begun, *counts, *held])
        files = [
            {"path": p, "format": self.formats[p], "records": counts[p], "quarantined": held[p]}
            for p in paths
        ]
        batch = IngestBatch(table, self.quarantined, files)
        self.records, self.quarantined, self.begun = RecordColumns(), [], []
        return batch


__all__ = [
    "FORMATS",
    "IngestBatch",
    "InputSpec",
    "format_names",
    "input_files",
    "inspect_input",
    "read_input",
]
