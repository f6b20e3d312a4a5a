"""The canonical record: one conversation, where it came from, and its stable content id.

Every reader turns its rows into these dicts; every stage reads and writes them; the version
writer stores them as the Arrow schema below. `meta` is free-form, so it travels as a JSON string
in tables and as a dict in Python (see `meta_of`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from itertools import pairwise
from typing import Any

import numpy as np
import pyarrow as pa
from xxhash import xxh3_64_hexdigest

from curate.text.clean import clean_text, id_keys
from curate.text.utf8 import list_of_struct

ROLES = ("system", "user", "assistant", "tool")

MESSAGE_TYPE = pa.struct(
    [
        pa.field("role", pa.string()),
        pa.field("content", pa.string()),
        # JSON text of OpenAI-style tool calls made by an assistant turn, or null.
        pa.field("tool_calls", pa.string()),
        # name of the tool whose result a "tool" turn carries, or null.
        pa.field("name", pa.string()),
    ]
)
MESSAGES_TYPE = pa.list_(MESSAGE_TYPE)

SOURCE_TYPE = pa.struct(
    [
        pa.field("name", pa.string()),
        pa.field("path", pa.string()),
        pa.field("row", pa.int64()),
        pa.field("format", pa.string()),
    ]
)

RECORD_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("messages", MESSAGES_TYPE, nullable=False),
        pa.field("source", SOURCE_TYPE),
        pa.field("origin", pa.string()),
        pa.field("parent_id", pa.string()),
        pa.field("meta", pa.string()),
        # JSON text of the tool definitions offered to the model, or null.
        pa.field("tools", pa.string()),
        # the dispreferred continuation of a preference pair (same shape as messages), or null.
        pa.field("rejected", MESSAGES_TYPE),
        # KTO desirability label, or null.
        pa.field("label", pa.bool_()),
    ]
)


def message(role: str, content: str, tool_calls: Any = None, name: str | None = None) -> dict:
    """A canonical message dict; tool calls are stored as JSON text so the Arrow type stays fixed."""
    if tool_calls is not None and not isinstance(tool_calls, str):
        tool_calls = json.dumps(tool_calls, ensure_ascii=False, sort_keys=True)
    return {"role": role, "content": content, "tool_calls": tool_calls, "name": name}


# Separators of the id key; they are control characters, so cleaned text never contains them.
_FIELD, _TURN = "\x1f", "\x1e"


def record_id(messages: list[dict]) -> str:
    """Stable content id: the same conversation gives the same id in any run, file or format.

    The key is the text as the normalize stage cleans it by default (NFC, no stray control
    characters, tidy whitespace), so normalizing a record never changes its id.
    """
    key = _TURN.join(
        f"{m['role']}{_FIELD}{clean_text(m.get('content') or '')}{_FIELD}{m.get('tool_calls') or ''}"
        f"{_FIELD}{m.get('name') or ''}"
        for m in messages
    )
    return xxh3_64_hexdigest(key.encode("utf-8"))


def stored_fields(
    *,
    origin: str = "real",
    parent_id: str | None = None,
    meta: dict | None = None,
    tools: Any = None,
    rejected: list[dict] | None = None,
    label: bool | None = None,
) -> tuple:
    """A record's fields after messages and source, in schema order, as they are stored (meta and
    tool definitions as JSON text). The one list of them that `make_record` and `RecordColumns` share."""
    return origin, parent_id, _meta_text(meta), _tools_text(tools), rejected, label


def _meta_text(meta: dict | None) -> str | None:
    return json.dumps(meta, ensure_ascii=False, sort_keys=True) if meta else None


def _tools_text(tools: Any) -> str | None:
    return tools if tools is None or isinstance(tools, str) else json.dumps(tools, ensure_ascii=False)


_STORED = RECORD_SCHEMA.names[3:]  # the fields `stored_fields` returns: all after id, messages, source


def make_record(messages: list[dict], source: dict, **fields: Any) -> dict:
    """One canonical record dict with its id; messages must already be canonical dicts, `fields` are
    the keywords of `stored_fields`.

    For many records at once, `RecordColumns` is several times faster and gives the same rows.
    """
    record = {"id": record_id(messages), "messages": messages, "source": source}
    return record | dict(zip(_STORED, stored_fields(**fields), strict=True))


_BODY = pa.schema([f for f in RECORD_SCHEMA if f.name != "id"])


class RecordColumns:
    """Records gathered column by column, then one Arrow table with every id computed at once.

    Readers add tens of thousands of records per file; building Python dicts and converting them
    with `pa.Table.from_pylist` cost more than parsing the JSON, so the values go straight into
    one list per column instead (`add`), or arrive as whole Arrow columns from a batch converter
    (`add_columns`). `table()` gives the same rows as `to_table` of `make_record`s, in the order
    they were added.
    """

    def __init__(self) -> None:
        self.pieces: list[pa.Table] = []  # finished runs of records, without ids
        self.offsets = [0]
        self.turns: list[dict] = []
        self.rows: list[tuple] = []  # (source, *stored_fields)

    def __len__(self) -> int:
        return sum(p.num_rows for p in self.pieces) + len(self.rows)

    def add(self, messages: list[dict], source: dict, **fields: Any) -> None:
        """Append one record; the arguments are those of `make_record` (messages as `message` makes
        them, with all four keys)."""
        self.turns += messages
        self.offsets.append(len(self.turns))
        self.rows.append((source, *stored_fields(**fields)))

    def add_columns(self, messages: pa.ListArray, sources: pa.StructArray, meta: list[dict | None]) -> None:
        """Append real records whose conversations are already a column (one source, one meta each)."""
        n = len(messages)
        self._close_run()
        columns = {
            "messages": messages,
            "source": sources,
            "origin": pa.repeat(pa.scalar("real", pa.string()), n),
            "meta": pa.array([_meta_text(m) for m in meta], pa.string()),
        }
        values = [columns[f.name] if f.name in columns else pa.nulls(n, f.type) for f in _BODY]
        self.pieces.append(pa.table(values, schema=_BODY))

    def _close_run(self) -> None:
        """The records added one by one so far become a piece."""
        if not self.rows:
            return
        turns = pa.array(self.turns, MESSAGE_TYPE)
        columns = [pa.ListArray.from_arrays(pa.array(self.offsets, pa.int32()), turns)]
        for field, column in zip(list(_BODY)[1:], zip(*self.rows, strict=True), strict=True):
            columns.append(pa.array(list(column), field.type))
        self.pieces.append(pa.table(columns, schema=_BODY))
        self.offsets, self.turns, self.rows = [0], [], []

    def table(self) -> pa.Table:
        """The records as a table of RECORD_SCHEMA, ids included: one chunk per piece, not copied
        into one (whoever gathers the batches makes one chunk of them all, once)."""
        self._close_run()
        body = pa.concat_tables(self.pieces) if self.pieces else _BODY.empty_table()
        ids = pa.chunked_array([record_ids(chunk) for chunk in body["messages"].chunks], pa.string())
        return body.add_column(0, RECORD_SCHEMA.field("id"), ids)


def source_column(names: list[str], paths: list[str], rows: list[int], formats: list[str]) -> pa.StructArray:
    """The source struct of many records, from one list per field."""
    values = [pa.array(names, pa.string()), pa.array(paths, pa.string()), pa.array(rows, pa.int64())]
    return pa.StructArray.from_arrays([*values, pa.array(formats, pa.string())], fields=list(SOURCE_TYPE))


def user_assistant_column(users: pa.Array, answers: pa.Array) -> pa.ListArray:
    """Conversations of one user turn and one assistant answer each, from the two text columns."""
    n = len(users)
    order = np.empty(2 * n, np.int64)
    order[0::2] = np.arange(n)
    order[1::2] = np.arange(n, 2 * n)
    roles = pa.array(["user", "assistant"], pa.string()).take(pa.array(np.arange(2 * n) % 2))
    content = pa.concat_arrays([users.cast(pa.string()), answers.cast(pa.string())]).take(pa.array(order))
    nulls = pa.nulls(2 * n, pa.string())
    turns = pa.StructArray.from_arrays([roles, content, nulls, nulls], fields=list(MESSAGE_TYPE))
    return pa.ListArray.from_arrays(pa.array(np.arange(0, 2 * n + 1, 2, dtype=np.int32)), turns)


def message_fields(
    messages: pa.Array | pa.ChunkedArray,
) -> tuple[np.ndarray, pa.Array, pa.Array, pa.Array, pa.Array]:
    """A messages column taken apart for column-wise work: the records' turn offsets (int64, from 0)
    and one array per message field (role, content, tool_calls, name) over all turns."""
    offsets, (role, content, tool_calls, name) = list_of_struct(messages)
    return offsets, role, content, tool_calls, name


def record_ids(messages: pa.Array | pa.ChunkedArray) -> pa.Array:
    """`record_id` of every conversation of a messages column: the keys are written by one compiled
    pass (text cleaned on the way, see curate.text.clean.id_keys), then hashed."""
    offsets, role, content, tool_calls, name = message_fields(messages)
    keys, ends = id_keys(offsets, role, content, tool_calls, name)
    view = memoryview(keys)
    return pa.array([xxh3_64_hexdigest(view[a:b]) for a, b in pairwise(ends.tolist())], pa.string())


def meta_of(record: dict) -> dict:
    """The record's meta as a dict (it is stored as JSON text)."""
    raw = record.get("meta")
    return json.loads(raw) if raw else {}


def meta_numbers(meta: Iterable[str | None], key: str) -> np.ndarray:
    """A numeric meta field of each record (meta as stored, JSON text); NaN where it is missing or
    not a number (a bool is not a score)."""
    out = []
    for raw in meta:
        value = json.loads(raw).get(key) if raw else None
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        out.append(float(value) if number else np.nan)
    return np.array(out, dtype=np.float64)


def to_table(records: list[dict]) -> pa.Table:
    """Records as an Arrow table with the canonical schema (missing optional keys become null)."""
    return pa.Table.from_pylist(records, schema=RECORD_SCHEMA)


def train_messages(messages: list[dict]) -> list[dict]:
    """Messages in the OpenAI wire format that TRL and Axolotl read, every turn with the same four
    keys (null where a turn has none): content always text (templates concatenate it), tool calls
    as {"type": "function", "function": {"name", "arguments"}} with the arguments as JSON text, the
    tool's `name` on a tool turn."""
    return [
        {
            "role": m["role"],
            "content": m["content"] or "",
            "tool_calls": [_wire_call(c) for c in json.loads(m["tool_calls"])]
            if m.get("tool_calls")
            else None,
            "name": m.get("name") or None,
        }
        for m in messages
    ]


def _wire_call(call: dict) -> dict:
    """A tool call of one shape whatever the source wrote (arguments as an object or text, bare or
    under "function"), so that every call of a file loads into one column."""
    function = call.get("function") if isinstance(call.get("function"), dict) else call
    arguments = function.get("arguments")
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments if arguments is not None else {}, ensure_ascii=False)
    return {"type": "function", "function": {"name": function.get("name"), "arguments": arguments}}


def train_tools(tools: str | None) -> str | None:
    """Tool definitions as one JSON text of OpenAI function entries ({"type": "function", "function":
    {...}}): text, so that every line of train.jsonl loads into one column whatever each schema's
    shape; TRL parses it back."""
    if not tools:
        return None
    parsed = json.loads(tools)
    entries = parsed if isinstance(parsed, list) else [parsed]
    wrapped = [
        t if isinstance(t, dict) and "function" in t else {"type": "function", "function": t} for t in entries
    ]
    return json.dumps(wrapped, ensure_ascii=False)
