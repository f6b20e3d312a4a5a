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
from itertools import chain, islice
from pathlib import Path

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
from curate.records import RecordColumns

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
    """Records read from one file, as a canonical Arrow table, with the quarantine met reading them."""

    path: str  # the file these came from (relative to base_dir, posix)
    format: str  # the format the converter used (the file's format; rows of mixed files say their own)
    table: pa.Table  # of curate.records.RECORD_SCHEMA
    quarantined: list[dict]  # {"file", "line", "error", "raw"}

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


def read_input(spec: InputSpec, base_dir: Path, batch_size: int = 5000) -> Iterator[IngestBatch]:
    """Records of every file of the input, in batches of at most `batch_size` (at least one per file)."""
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
    options = FormatOptions.from_dict(spec.options, spec.fields)
    if spec.path.startswith("hf:"):
        name = spec.path[3:]
        dataset = load_hf(name, None, spec.split, spec.config)
        label = spec.path + "".join(f":{v}" for v in (spec.config, spec.split) if v)
        source_name = spec.name or name.rsplit("/", 1)[-1]
        rows = iter_hf(dataset, min(batch_size, 4096))
        yield from _read_rows(rows, label, source_name, spec, options, batch_size)
        return
    for path in input_files(spec, base_dir):
        rel = relative(path, base_dir)
        if is_hf_folder(path):
            rows = iter_hf(load_hf(None, path, spec.split, None), min(batch_size, 4096))
        else:
            rows = iter_file(path, min(batch_size, 4096))
        yield from _read_rows(rows, rel, spec.name or stem(path), spec, options, batch_size)


def inspect_input(spec: InputSpec, base_dir: Path) -> list[dict]:
    """Per file: its format, record and quarantine counts, whether it was detected (for `curate formats`)."""
    out: dict[str, dict] = {}
    for batch in read_input(spec, base_dir):
        item = out.setdefault(
            batch.path,
            {
                "path": batch.path,
                "format": batch.format,
                "records": 0,
                "quarantined": 0,
                "detected": spec.format == "auto",
                "formats": Counter(),
            },
        )
        item["records"] += batch.table.num_rows
        item["quarantined"] += len(batch.quarantined)
        item["formats"].update(batch.table["source"].combine_chunks().field("format").to_pylist())
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


def _read_rows(
    rows: Iterator[Row], path: str, source_name: str, spec: InputSpec, options: FormatOptions, batch_size: int
) -> Iterator[IngestBatch]:
    """Convert one file's rows, detecting the format first; batches of records plus their quarantine."""
    head = list(islice(rows, HEAD_ROWS))
    file_format, check_rows = _choose_format(head, path, spec)
    format_name = file_format.name if file_format else "empty"
    detect = file_format.detect if file_format else None
    records = RecordColumns()
    quarantined: list[dict] = []
    for number, value, raw in chain(head, rows):
        if type(value) is not dict:
            if isinstance(value, Unreadable):
                quarantined.append(_quarantine(path, number, value.error, value.raw))
            else:
                quarantined.append(
                    _quarantine(
                        path,
                        number,
                        f"row is {type(value).__name__}, expected an object",
                        raw if raw is not None else value,
                    )
                )
            continue
        fmt = file_format
        if check_rows and (detect is None or not detect(value)):
            fmt = detect_row(value)
            if fmt is None:
                error = f"unknown record shape; keys: {', '.join(value)}"
                quarantined.append(_quarantine(path, number, error, raw if raw is not None else value))
                continue
        try:
            converted = fmt.convert(value, options)
        except RecordError as exc:
            quarantined.append(
                _quarantine(path, number, f"{fmt.name}: {exc}", raw if raw is not None else value)
            )
            continue
        except (KeyError, TypeError, AttributeError, IndexError) as exc:
            error = f"{fmt.name}: missing or malformed field ({type(exc).__name__}: {exc})"
            quarantined.append(_quarantine(path, number, error, raw if raw is not None else value))
            continue
        source = {"name": source_name, "path": path, "row": number, "format": fmt.name}
        for item in converted:
            records.add(source=source, **item)
        if len(records) >= batch_size:
            yield IngestBatch(path, format_name, records.table(), quarantined)
            records, quarantined = RecordColumns(), []
    yield IngestBatch(path, format_name, records.table(), quarantined)


__all__ = [
    "FORMATS",
    "IngestBatch",
    "InputSpec",
    "format_names",
    "input_files",
    "inspect_input",
    "read_input",
]
