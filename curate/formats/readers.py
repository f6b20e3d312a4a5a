"""Readers: files (JSONL, JSON, CSV, Parquet; gz/zst/xz/bz2), globs, folders, and Hugging Face datasets.

Every reader streams rows as (row number, value, raw text) so memory stays bounded by one batch:
JSONL line by line through the decompressor, JSON arrays element by element with an incremental
decoder, CSV through the csv module, Parquet and Arrow datasets by record batch. A line that does
not parse is yielded as `Unreadable` for the quarantine, never dropped.
"""

from __future__ import annotations

import bz2
import contextlib
import csv
import glob
import io
import json
import lzma
import os
import re
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import orjson

try:  # ISA-L's inflate: the same gzip results at 2-3x zlib's speed
    from isal import isal_zlib as inflate_lib
except ImportError:  # a platform without an isal wheel
    import zlib as inflate_lib

from curate.errors import FormatError

DATA_SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".parquet")
COMPRESSION_SUFFIXES = (".gz", ".zst", ".zstd", ".xz", ".bz2")
RAW_LIMIT = 2000
WHOLE_ARRAY_BYTES = 64 << 20  # JSON arrays up to this size (decompressed) are parsed in one call
_CHUNK = 1 << 22  # characters read per step of the incremental JSON-array decoder
_BLOCK = 1 << 20  # bytes read per step of JSONL and whole JSON files
_SPACE = re.compile(r"[ \t\n\r]*")
HF_FILES = ("dataset_info.json", "state.json")  # what Dataset.save_to_disk writes
HF_DICT_FILE = "dataset_dict.json"  # what DatasetDict.save_to_disk writes


class Unreadable:
    """A row that could not be parsed: the reason and the raw text, for the quarantine."""

    __slots__ = ("error", "raw")

    def __init__(self, error: str, raw: str) -> None:
        self.error = error
        self.raw = raw[:RAW_LIMIT]


Row = tuple[int, Any, "str | bytes | None"]  # (line or index, parsed value or Unreadable, raw text if cheap)


def suffixes(path: Path) -> tuple[str, str]:
    """(data suffix, compression suffix) of a file name, e.g. ('.jsonl', '.gz'); '' when absent."""
    name = path.name.lower()
    compression = next((s for s in COMPRESSION_SUFFIXES if name.endswith(s)), "")
    name = name[: len(name) - len(compression)]
    data = next((s for s in DATA_SUFFIXES if name.endswith(s)), "")
    return data, compression


def stem(path: Path) -> str:
    """The file name without its data and compression suffixes: the default source name."""
    data, compression = suffixes(path)
    return path.name[: len(path.name) - len(data) - len(compression)] or path.name


def is_hf_folder(path: Path) -> bool:
    return path.is_dir() and (all((path / f).is_file() for f in HF_FILES) or (path / HF_DICT_FILE).is_file())


def is_data_file(path: Path) -> bool:
    return path.is_file() and bool(suffixes(path)[0]) and not path.name.startswith(".")


def open_binary(path: Path) -> IO[bytes]:
    """The decompressed bytes of a file as a file object; compressed streams are checked to their
    end, so a file cut short is an error, never a short read."""
    if suffixes(path)[1]:
        return io.BufferedReader(_BlockReader(read_blocks(path)), buffer_size=_BLOCK)
    return open(path, "rb")  # noqa: SIM115


class _BlockReader(io.RawIOBase):
    """A read-only file over an iterator of byte blocks."""

    def __init__(self, blocks: Iterator[bytes]) -> None:
        self._blocks, self._pending = blocks, b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._pending:
            self._pending = next(self._blocks, b"")
            if not self._pending:
                return 0
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n


def open_text(path: Path) -> IO[str]:
    return io.TextIOWrapper(open_binary(path), encoding="utf-8-sig", newline="")


def read_blocks(path: Path) -> Iterator[bytes]:
    """The decompressed bytes of a file, about a megabyte at a time."""
    compression = suffixes(path)[1]
    with open(path, "rb") as raw:
        if compression:
            yield from _unpack(raw, path, ".zst" if compression == ".zstd" else compression)
        else:
            while block := raw.read(_BLOCK):
                yield block


def _gzip():
    return inflate_lib.decompressobj(wbits=31)  # gzip mode: each member's CRC and length checked


def _zstd():
    import zstandard

    return zstandard.ZstdDecompressor().decompressobj()


def _zstd_error() -> type[Exception]:
    import zstandard

    return zstandard.ZstdError


def _capped(unpacker, data: bytes) -> Iterator[bytes]:
    """zlib: at most a few megabytes per call; the rest waits in unconsumed_tail."""
    if out := unpacker.decompress(data, _BLOCK * 4):
        yield out


def _buffered(unpacker, data: bytes) -> Iterator[bytes]:
    """lzma and bz2: at most a few megabytes per call; the rest waits inside the decompressor."""
    out = unpacker.decompress(data, _BLOCK * 4)
    while True:
        if out:
            yield out
        if unpacker.eof or unpacker.needs_input:
            return
        out = unpacker.decompress(b"", _BLOCK * 4)


def _whole(unpacker, data: bytes) -> Iterator[bytes]:
    if out := unpacker.decompress(data):
        yield out


# compression suffix -> (name, a new decompressor, the errors it raises on bad data, how its output
# is drawn, the command that tests a file)
_STREAMS = {
    ".gz": ("gzip", _gzip, lambda: inflate_lib.error, _capped, "gzip -t"),
    ".zst": ("zstd", _zstd, _zstd_error, _whole, "zstd -t"),
    ".xz": ("xz", lzma.LZMADecompressor, lambda: lzma.LZMAError, _buffered, "xz -t"),
    ".bz2": ("bzip2", bz2.BZ2Decompressor, lambda: OSError, _buffered, "bzip2 -t"),
}


def _unpack(raw: IO[bytes], path: Path, compression: str) -> Iterator[bytes]:
    """Every stream (gzip member, zstd frame) of a compressed file, a megabyte of input at a time,
    output per call capped where the library allows (a zip bomb stays bounded). Damaged or cut data
    is an error naming the file: the library readers stop short without a word, or raise EOFError
    deep inside a parser. For gzip, ISA-L (or zlib) checks CRCs and lengths itself: 94 ms for raw/
    against gzip.GzipFile's 210 ms."""
    name, new, errors, drain, tool = _STREAMS[compression]
    hint = f"check the file with `{tool} FILE`; a damaged file must be fetched or written again"
    unpacker, started = new(), False
    try:
        while data := raw.read(_BLOCK):
            while data:
                if unpacker.eof:  # another stream follows (after optional zero padding)
                    data = data.lstrip(b"\x00")
                    if not data:
                        break
                    unpacker = new()
                started = True
                yield from drain(unpacker, data)
                data = unpacker.unused_data if unpacker.eof else getattr(unpacker, "unconsumed_tail", b"")
    except errors() as exc:
        raise FormatError(f"{path}: damaged {name} data ({exc})", hint=hint) from None
    if started and not unpacker.eof:
        raise FormatError(f"{path}: the {name} data ends early (file cut short?)", hint=hint)


def _lines(blocks: Iterable[bytes]) -> Iterator[bytes]:
    """Lines without their line break; splitting big blocks is several times faster than readline."""
    tail = b""
    for block in blocks:
        lines = (tail + block).split(b"\n")
        tail = lines.pop()
        yield from lines
    if tail:
        yield tail


def iter_jsonl(blocks: Iterable[bytes]) -> Iterator[Row]:
    """One row per non-blank line; row number = 1-based line number.

    orjson parses the usual line (strict RFC 8259, 2-3x faster than the json module). A line it
    refuses goes to `json.loads`, which also accepts NaN, Infinity, lone surrogates and huge
    integers, and words the error of a line that is really broken; so what a line yields is
    exactly what the json module makes of it.
    """
    for number, line in enumerate(_lines(blocks), 1):
        try:
            value = orjson.loads(line)
        except orjson.JSONDecodeError:
            try:
                value = json.loads(line)
                _check_unicode(value)
            except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, depth
                if not line.strip():
                    continue
                text = line.decode("utf-8", errors="replace").rstrip("\r")
                yield number, Unreadable(_why_unreadable(exc), text), None
                continue
        yield number, value, line


def _check_unicode(value: Any) -> None:
    """Raise UnicodeError for text no file can hold: a lone surrogate escape such as \\ud800, which
    the json module accepts (orjson refuses it, so only its fallback paths need this)."""
    json.dumps(value, ensure_ascii=False).encode("utf-8")


def _unicode_checked(rows: Iterator[Row]) -> Iterator[Row]:
    """Rows parsed by the json module, each checked: a row of broken text is quarantined."""
    for index, value, raw in rows:
        try:
            if not isinstance(value, Unreadable):
                _check_unicode(value)
        except UnicodeError as exc:
            yield index, Unreadable(_why_unreadable(exc), json.dumps(value)[:2000]), None
        else:
            yield index, value, raw


def _why_unreadable(exc: Exception) -> str:
    if isinstance(exc, UnicodeEncodeError):
        return f"invalid text: {exc.object[exc.start : exc.end]!a} is a lone surrogate, not a character"
    if isinstance(exc, RecursionError):
        return f"invalid JSON: nested more than {sys.getrecursionlimit()} levels deep"
    return f"invalid JSON: {exc}"


def _value_end(text: str, pos: int) -> int:
    """Where the JSON value starting at `pos` ends (its closing bracket + 1), by counting brackets
    outside strings; -1 if the text ends first. Only for values too deep for the decoder."""
    depth, in_string, escaped = 0, False, False
    for i in range(pos, len(text)):
        c = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "[{":
            depth += 1
        elif c in "]}":
            depth -= 1
            if depth == 0:
                return i + 1
    return -1


def _json_array(text: IO[str], path: Path) -> Iterator[Row]:
    """Elements of a top-level JSON array, decoded one at a time (row number = 0-based index).

    A multi-GB array never becomes one Python list: the buffer holds one chunk plus the element
    being decoded. An element cut by the chunk boundary fails to decode and is retried with more text.
    """
    decode = json.JSONDecoder().raw_decode
    space = _SPACE.match
    buf = text.read(_CHUNK)
    pos = space(buf, 0).end() + 1  # after '['
    eof = False
    index = 0
    expect_value = True
    while True:
        pos = space(buf, pos).end()
        if pos >= len(buf):
            if eof:
                raise FormatError(f"{path}: the JSON array is not closed (file cut short?)")
            chunk = text.read(_CHUNK)
            eof = not chunk
            buf, pos = buf[pos:] + chunk, 0
            continue
        if not expect_value:
            if buf[pos] == "]":
                return
            if buf[pos] != ",":
                raise FormatError(f"{path}: invalid JSON after element {index - 1}: expected ',' or ']'")
            pos += 1
            expect_value = True
            continue
        if index == 0 and buf[pos] == "]":
            return
        try:
            value, end = decode(buf, pos)
        except RecursionError:  # too deep to decode: skip the element, quarantine it
            end = _value_end(buf, pos)
            if end < 0 and not eof:
                chunk = text.read(_CHUNK)
                eof = not chunk
                buf, pos = buf[pos:] + chunk, 0
                continue
            if end < 0:
                raise FormatError(f"{path}: the JSON array is not closed (file cut short?)") from None
            reason = f"invalid JSON: nested more than {sys.getrecursionlimit()} levels deep"
            yield index, Unreadable(reason, buf[pos:end]), None
            index += 1
            pos = end
            expect_value = False
            continue
        except json.JSONDecodeError as exc:
            if eof:
                raise FormatError(
                    f"{path}: invalid JSON in array element {index}: {exc.msg}",
                    hint="a JSON array that does not parse cannot be split into rows; fix the file or "
                    "convert it to JSONL, where one bad line is quarantined on its own",
                ) from None
            chunk = text.read(_CHUNK)
            eof = not chunk
            buf, pos = buf[pos:] + chunk, 0
            continue
        if end >= len(buf) and not eof:  # a number or literal may continue in the next chunk
            chunk = text.read(_CHUNK)
            eof = not chunk
            buf, pos = buf[pos:] + chunk, 0
            continue
        yield index, value, None
        index += 1
        pos = end
        expect_value = False


def iter_json(path: Path) -> Iterator[Row]:
    """A .json file: an array of rows, JSON Lines under a .json name, or one document.

    An array up to WHOLE_ARRAY_BYTES is parsed at once by orjson; a larger one (or one orjson
    refuses) streams through the incremental decoder, so memory stays bounded.
    """
    whole = _read_at_most(read_blocks(path), WHOLE_ARRAY_BYTES)
    if whole is not None and whole.lstrip()[:1] == b"[":
        try:
            rows = orjson.loads(whole)
        except orjson.JSONDecodeError:
            rows = None
        if rows is not None:
            del whole
            for index, value in enumerate(rows):
                yield index, value, None
            return
    del whole
    with open_text(path) as text:
        head = text.read(1 << 16)
        first = head.lstrip()[:1]
        if first == "[":
            yield from _unicode_checked(_json_array(_Prepend(head, text), path))
            return
    if not first:  # an empty file: no rows (the run warns about a file that yields none)
        return
    if first == "{":
        first_line = head.split("\n", 1)[0]
        try:
            json.loads(first_line)
            is_lines = True
        except ValueError:
            is_lines = False
        if is_lines:
            yield from iter_jsonl(read_blocks(path))
            return
        with open_text(path) as text:
            try:
                doc = json.load(text)
            except RecursionError:
                raise FormatError(
                    f"{path}: the JSON document is nested more than {sys.getrecursionlimit()} levels deep",
                    hint="a document that does not parse cannot be split into rows; JSONL quarantines "
                    "such a line on its own",
                ) from None
            except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
                raise FormatError(
                    f"{path}: not valid JSON ({exc})",
                    hint="a .json input is one array or object, or one object per line (JSONL); a "
                    "document that does not parse cannot be split into rows",
                ) from None
        if not isinstance(doc, dict):  # e.g. {..., ...} that parsed as something else: not rows
            raise FormatError(f"{path}: not a JSON array or object", hint="see docs/formats.md")
        lists = [v for v in doc.values() if isinstance(v, list) and v and isinstance(v[0], dict)]
        rows = lists[0] if len(lists) == 1 else [doc]  # {"data": [...]} wrappers hold the rows
        yield from _unicode_checked((index, value, None) for index, value in enumerate(rows))
        return
    raise FormatError(
        f"{path}: not a JSON array or object (starts with {head.lstrip()[:20]!r})",
        hint="JSON inputs hold an array of objects, or one object per line (JSONL)",
    )


def _read_at_most(blocks: Iterator[bytes], limit: int) -> bytes | None:
    """All of the blocks if they hold at most `limit` bytes, else None (the rest left unread)."""
    parts, size = [], 0
    with contextlib.closing(blocks):
        for block in blocks:
            parts.append(block)
            size += len(block)
            if size > limit:
                return None
    return b"".join(parts)


class _Prepend(io.TextIOBase):
    """A text stream with already-read text put back in front (for peeking at the first bytes)."""

    def __init__(self, head: str, rest: IO[str]) -> None:
        self._head = head
        self._rest = rest

    def read(self, size: int = -1) -> str:
        if self._head:
            out, self._head = self._head, ""
            return out
        return self._rest.read(size)


def iter_csv(path: Path, delimiter: str) -> Iterator[Row]:
    """One row per CSV record (header = keys); row number = the file line the record starts on
    (1-based, the header is line 1), as an editor shows it; a record may span lines."""
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # instruction texts exceed the 128 KB default
    with open_text(path) as text:
        reader = csv.DictReader(text, delimiter=delimiter)
        reader.fieldnames  # noqa: B018 - reads the header, so line_num counts from it
        start = reader.line_num + 1
        for row in reader:
            if None in row:
                raw = json.dumps(row, ensure_ascii=False, default=str)
                yield start, Unreadable("more cells than header columns", raw), None
            else:
                yield start, row, None
            start = reader.line_num + 1


def iter_parquet(path: Path, batch_size: int) -> Iterator[Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    index = 0
    try:
        with pq.ParquetFile(path) as pf:
            for batch in pf.iter_batches(batch_size=batch_size):
                for value in batch.to_pylist():
                    yield index, value, None
                    index += 1
    except (OSError, pa.ArrowException) as exc:  # a broken footer, a cut file, a damaged page
        where = f" after row {index - 1}" if index else ""
        raise FormatError(
            f"{path}: unreadable Parquet data{where} ({str(exc).strip()})",
            hint="check it with pyarrow.parquet.read_metadata(FILE); a damaged file must be written again",
        ) from None


@contextlib.contextmanager
def _hf_offline() -> Iterator[None]:
    """Resolve hf: names from the local cache only: a run must never download data silently."""
    import datasets
    import huggingface_hub.constants as hub

    saved = datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE = saved


def load_hf(name: str | None, folder: Path | None, split: str | None, config: str | None) -> Any:
    """A `datasets.Dataset` from the local HF cache (`hf:NAME`) or a save_to_disk folder."""
    import datasets

    if folder is not None:
        try:
            loaded = datasets.load_from_disk(str(folder))
        except Exception as exc:  # datasets raises several types for a damaged folder
            raise FormatError(f"{folder}: cannot load the saved dataset: {exc}") from None
    else:
        try:
            with _hf_offline():
                loaded = datasets.load_dataset(name, config, split=split or "train")
        except Exception as exc:  # not cached, unknown config or split: all the same to the user
            raise FormatError(
                f"hf:{name}: not found in the local Hugging Face cache ({type(exc).__name__}: {exc})",
                hint=f"curate does not download at run time; fetch it once with "
                f"datasets.load_dataset({name!r}).save_to_disk('DIR') and use `path: DIR`",
            ) from None
    if isinstance(loaded, datasets.DatasetDict):
        want = split or "train"
        if want not in loaded:
            raise FormatError(
                f"{folder or name}: no split {want!r}", hint=f"set `split:` to one of {sorted(loaded)}"
            )
        loaded = loaded[want]
    return loaded


def iter_hf(dataset: Any, batch_size: int) -> Iterator[Row]:
    index = 0
    for table in dataset.with_format("arrow").iter(batch_size=batch_size):
        for value in table.to_pylist():
            yield index, value, None
            index += 1


def _json_array_inside(path: Path) -> bool:
    """Whether a file holds one JSON array rather than lines: it starts with "[" and its first line
    is not JSON by itself (a JSONL file whose rows are arrays parses line by line)."""
    with contextlib.closing(read_blocks(path)) as blocks:
        head = next(blocks, b"")[: 1 << 16]
    if head.lstrip()[:1] != b"[":
        return False
    first_line = head.lstrip().split(b"\n", 1)[0]
    try:
        json.loads(first_line)
    except ValueError:
        return True
    return False


def iter_file(path: Path, batch_size: int = 4096) -> Iterator[Row]:
    """Rows of one input file, by its suffix."""
    data, compression = suffixes(path)
    if data in (".jsonl", ".ndjson") and not _json_array_inside(path):
        yield from iter_jsonl(read_blocks(path))
    elif data in (".jsonl", ".ndjson"):  # a JSON array saved under a JSONL name
        yield from iter_json(path)
    elif data == ".json":
        yield from iter_json(path)
    elif data in (".csv", ".tsv"):
        yield from iter_csv(path, "\t" if data == ".tsv" else ",")
    elif data == ".parquet" and not compression:
        yield from iter_parquet(path, batch_size)
    else:
        raise FormatError(
            f"{path}: unknown file type",
            hint=f"inputs are {', '.join(DATA_SUFFIXES)} (optionally {', '.join(COMPRESSION_SUFFIXES)}; "
            "Parquet compresses inside the file), save_to_disk folders, or hf:NAME",
        )


def _walk(folder: Path) -> list[Path]:
    """Data files and save_to_disk folders below a folder; hidden entries and dataset internals skipped."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        here = Path(dirpath)
        visible = [d for d in dirnames if not d.startswith(".")]
        saved = [d for d in visible if is_hf_folder(here / d)]
        found += [here / d for d in saved]
        dirnames[:] = [d for d in visible if d not in saved]
        found += [here / f for f in filenames if is_data_file(here / f)]
    return found


def _in_hf_folder(path: Path) -> bool:
    # save_to_disk writes dataset_info.json, state.json (per split for a DatasetDict): not inputs.
    return is_hf_folder(path.parent) or is_hf_folder(path.parent.parent)


def expand(path_text: str, base_dir: Path) -> list[Path]:
    """Files named by a path, glob or folder, sorted by path so every run reads in the same order."""
    if any(c in path_text for c in "*?["):
        # The recipe folder's own name may hold glob characters; only the recipe's pattern is a glob.
        pattern = path_text if Path(path_text).is_absolute() else f"{glob.escape(str(base_dir))}/{path_text}"
        matched = [Path(p) for p in glob.glob(pattern, recursive=True)]
        if not matched:
            raise FormatError(
                f"input {path_text!r}: the pattern matched nothing",
                hint=f"it was looked for as {pattern} (paths resolve against the recipe's folder)",
            )
        found = [p for p in matched if (is_data_file(p) and not _in_hf_folder(p)) or is_hf_folder(p)]
        if not found:
            shown = ", ".join(p.name for p in sorted(matched)[:3]) + (", ..." if len(matched) > 3 else "")
            raise FormatError(
                f"input {path_text!r}: matched {len(matched)} path(s) ({shown}), none of them a data file",
                hint=f"data files end in {', '.join(DATA_SUFFIXES)}",
            )
    else:
        path = Path(path_text)
        path = path if path.is_absolute() else base_dir / path
        if not path.exists():
            raise FormatError(f"input {path_text!r}: no such file or folder (looked in {base_dir})")
        if path.is_file() or is_hf_folder(path):
            return [path]
        found = _walk(path)
    if not found:
        raise FormatError(
            f"input {path_text!r}: no data files found in the folder {path}",
            hint=f"data files end in {', '.join(DATA_SUFFIXES)}",
        )
    return sorted(found, key=lambda p: p.as_posix())
