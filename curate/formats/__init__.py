"""Reading the recipe's inputs: files, globs, folders and HF datasets -> canonical records, in batches.

`read_input(spec, base_dir)` is what the runner calls: it lists the input's files, reads each as a
stream of rows, detects the shape once per file (per row where a file mixes shapes), converts rows
to records and yields them in batches together with the quarantine (unparseable lines and rows
whose content cannot become a conversation). One input row gives one record, except OASST trees
with `oasst_paths: all`.
"""

from __future__ import annotations

import difflib
import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import chain, islice, pairwise
from pathlib import Path

import numpy as np
import pyarrow as pa

from curate.errors import FormatError, RecipeError
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

SPEC_KEYS = ("path", "name", "format", "fields", "split", "config", "options")


@dataclass
class InputSpec:
    """One entry of the recipe's `inputs:` list."""

    path: str  # file, glob, folder, "hf:NAME", or a save_to_disk folder
    name: str | None = None  # source name; default: the file stem
    format: str = "auto"  # a registered format name, or auto-detection
    fields: dict | None = None  # role -> source key(s), e.g. {user: question, assistant: answer}
    split: str | None = None  # hf: split (default "train")
    config: str | None = None  # hf: config name
    options: dict = field(default_factory=dict)  # per-format options, e.g. {"oasst_paths": "all"}

    @classmethod
    def from_recipe(cls, entry: dict | str, where: str) -> InputSpec:
        """Validate one recipe entry; errors name `where` (e.g. "inputs[2]") and the offending key."""
        if isinstance(entry, str):
            entry = {"path": entry}
        if not isinstance(entry, dict):
            raise RecipeError(f"{where}: expected a mapping with `path:`, got {entry!r}")
        for key in entry:
            if key not in SPEC_KEYS:
                close = difflib.get_close_matches(str(key), SPEC_KEYS, n=1)
                hint = f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(SPEC_KEYS)}"
                raise RecipeError(f"{where}: unknown key '{key}'", hint=hint)
        if not isinstance(entry.get("path"), str) or not entry["path"]:
            raise RecipeError(f"{where}.path: required, a file, glob, folder or hf:NAME")
        for key in ("name", "split", "config"):
            if entry.get(key) is not None and not isinstance(entry[key], str):
                raise RecipeError(f"{where}.{key}: expected text, got {entry[key]!r}")
        fmt = entry.get("format", "auto")
        if fmt != "auto" and fmt not in FORMATS:
            close = difflib.get_close_matches(str(fmt), list(FORMATS), n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"formats: auto, {', '.join(format_names())}"
            raise RecipeError(f"{where}.format: unknown format {fmt!r}", hint=hint)
        mapping = entry.get("fields")
        if mapping is not None:
            _check_fields(mapping, f"{where}.fields")
            if fmt not in ("auto", "fields"):
                raise RecipeError(
                    f"{where}: `fields:` maps roles itself and cannot be combined with format {fmt!r}",
                    hint="leave `format:` out (or write `format: fields`) when you give a mapping",
                )
            fmt = "fields"
        elif fmt == "fields":
            raise RecipeError(
                f"{where}: format 'fields' needs a `fields:` mapping",
                hint="e.g. fields: {user: q, assistant: a}",
            )
        options = entry.get("options") or {}
        if not isinstance(options, dict):
            raise RecipeError(f"{where}.options: expected a mapping, got {options!r}")
        for key, value in options.items():
            if key not in FormatOptions.KNOWN:
                known = "; ".join(f"{k}: {v}" for k, v in FormatOptions.KNOWN.items())
                raise RecipeError(f"{where}.options: unknown option '{key}'", hint=f"known options: {known}")
            if key == "oasst_paths" and value not in ("best", "all"):
                raise RecipeError(f"{where}.options.oasst_paths: expected 'best' or 'all', got {value!r}")
            if key == "end_markers" and not (
                isinstance(value, list) and all(isinstance(v, str) and v for v in value)
            ):
                raise RecipeError(f"{where}.options.end_markers: expected a list of non-empty strings")
        return cls(
            path=entry["path"],
            name=entry.get("name"),
            format=fmt,
            fields=mapping,
            split=entry.get("split"),
            config=entry.get("config"),
            options=dict(options),
        )


def _check_fields(mapping: object, where: str) -> None:
    if not isinstance(mapping, dict) or not mapping:
        raise RecipeError(f"{where}: expected a mapping of roles to source keys, got {mapping!r}")
    for part, keys in mapping.items():
        if part not in fields.PARTS:
            raise RecipeError(
                f"{where}: unknown part '{part}'", hint=f"map any of: {', '.join(fields.PARTS)}"
            )
        single = part in ("label", "tools")
        ok = isinstance(keys, str) or (
            not single and isinstance(keys, list) and keys and all(isinstance(k, str) for k in keys)
        )
        if not ok:
            raise RecipeError(
                f"{where}.{part}: expected a source key{'' if single else ' or a list of keys'}"
            )
    if "user" not in mapping:
        raise RecipeError(f"{where}: a mapping needs at least `user:`")


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
    if spec.format != "auto" and spec.format not in FORMATS:
        raise RecipeError(
            f"unknown format {spec.format!r}", hint=f"formats: auto, {', '.join(format_names())}"
        )
    if (spec.format == "fields") != bool(spec.fields):
        raise RecipeError(
            f"{spec.path}: a `fields:` mapping goes with format 'fields' (and only with it)",
            hint="e.g. fields: {user: question, assistant: answer}",
        )
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
                rows = iter_file(path, step)
            yield from reader.read(relative(path, base_dir), spec.name or stem(path), rows)
    yield from reader.flush()


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
