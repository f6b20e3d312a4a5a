"""The format registry: how each source shape is recognised and turned into canonical conversations.

A format is a pair of plain functions. `detect(row)` is a cheap test on one parsed row; `convert(row,
options)` returns the conversations the row holds (one for every shape but OASST trees with
`oasst_paths: all`). The reader adds `source` and builds the record, so converters stay pure.
A common shape may add a third, `convert_batch(rows, options)`, which converts the plain rows of a
chunk in Arrow columns and leaves the rest to `convert`; both must give the same records.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from curate.configs import option
from curate.records import message, user_assistant_column
from curate.text.clean import blank_column

# Keys that hold an answer: a row with one of them is not a bare prompt.
ANSWER_KEYS = ("output", "response", "completion", "answer", "chosen", "rejected", "target", "outputs")


class RecordError(ValueError):
    """A row of a known shape whose content cannot become a conversation (it is quarantined)."""


@dataclass
class FormatOptions:
    """Per-input options (`options:` of an input), shared by all converters."""

    oasst_paths: Literal["best", "all"] = option(
        "best",
        help="OASST trees: best (one conversation per tree, the best-ranked path) or all (every path).",
    )
    end_markers: list[str] = option(
        ["<|endoftext|>"],
        help="Trailing end-of-text markers stripped from prompt/completion answers.",
        items={"type": "string", "minLength": 1},
    )
    # the user's role -> source key mapping (format "fields"); set from the input, not from options
    fields: dict | None = field(default=None, metadata={"recipe": False})

    @classmethod
    def from_dict(cls, options: dict, fields: dict | None) -> FormatOptions:
        return cls(**options, fields=fields)


Converted = dict  # keyword arguments of curate.records.make_record, without `source`


@dataclass
class BatchConversion:
    """What a batch converter made of many rows at once.

    `handled` marks the rows it converted, one record each; every other row (another shape, an
    unusual field, content that would be refused) goes through `convert` one by one, so the two
    paths must agree on every row the batch converter takes.
    """

    handled: np.ndarray  # bool, one per row given
    messages: pa.ListArray  # of curate.records.MESSAGE_TYPE, one per handled row, in row order
    meta: list[dict | None]  # one per handled row


@dataclass(frozen=True)
class Format:
    name: str
    description: str
    detect: Callable[[dict], bool]
    convert: Callable[[dict, FormatOptions], list[Converted]]
    priority: int  # detection order: lower is tried first, so specific shapes win over loose ones
    # Optional: converts the common rows of a list at once, in columns (the row-by-row path costs
    # more than parsing the JSON). It may take any subset of the rows that `detect` accepts.
    convert_batch: Callable[[list, FormatOptions], BatchConversion] | None = None


FORMATS: dict[str, Format] = {}


def register(name: str, description: str, detect: Callable[[dict], bool], priority: int) -> Callable:
    """Decorator for a converter function: make the format known under `name`."""

    def wrap(convert: Callable[[dict, FormatOptions], list[Converted]]) -> Callable:
        FORMATS[name] = Format(name, description, detect, convert, priority)
        return convert

    return wrap


def register_batch(name: str) -> Callable:
    """Decorator for a batch converter of the registered format `name`."""

    def wrap(convert_batch: Callable[[list, FormatOptions], BatchConversion]) -> Callable:
        FORMATS[name] = dataclasses.replace(FORMATS[name], convert_batch=convert_batch)
        return convert_batch

    return wrap


def text_of(value: Any, what: str) -> str:
    """A field that must hold text; numbers are accepted as their text, anything else is an error
    (NaN and Infinity too: the json module reads them, but "nan" is no answer)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(value, float) and not math.isfinite(value):
            raise RecordError(f"{what} is {value}, expected text")
        return str(value)
    raise RecordError(f"{what} is {type(value).__name__}, expected text")


def rest(row: dict, used: tuple[str, ...] | frozenset[str], extra: dict | None = None) -> dict | None:
    """The row's unconverted fields (nulls left out) for the record's meta, plus `extra`."""
    meta = {k: v for k, v in row.items() if k not in used and v is not None}
    if extra:
        meta.update(extra)
    return meta or None


def join_input(instruction: str, inp: Any) -> str:
    """Alpaca's convention: the input follows the instruction after a blank line when it is non-empty."""
    if inp is None:
        return instruction
    inp = text_of(inp, "input")
    return f"{instruction}\n\n{inp}" if inp.strip() else instruction


def user_assistant(user: str, assistant: str) -> list[dict]:
    return [message("user", user), message("assistant", assistant)]


def require_text(messages: list[dict]) -> list[dict]:
    """A conversation with no text and no tool call at all is broken content, not a short record."""
    for m in messages:
        content = m["content"]
        if (content and not content.isspace()) or m["tool_calls"]:  # isspace: no copy of long texts
            return messages
    raise RecordError("no text in any turn")


def user_assistant_batch(
    candidates: list[bool], users: pa.Array, answers: pa.Array, meta: list[dict | None]
) -> BatchConversion:
    """A batch of user/answer pairs, from the rows `candidates` marks (their texts and meta given in
    row order). A pair with no text in either turn is left to `convert`, which refuses it."""
    handled = np.array(candidates, np.bool_)
    has_text = ~(blank_column(users) & blank_column(answers))
    if not has_text.all():
        handled[np.flatnonzero(handled)[~has_text]] = False
        keep = pa.array(has_text)
        users, answers = users.filter(keep), answers.filter(keep)
        meta = [m for m, ok in zip(meta, has_text.tolist(), strict=True) if ok]
    return BatchConversion(handled, user_assistant_column(users, answers), meta)


def preference_pair(chosen: list[dict], rejected: list[dict]) -> tuple[list[dict], list[dict]]:
    """Messages = the chosen conversation; rejected = the rejected turns after the shared prefix."""
    n = 0
    limit = min(len(chosen), len(rejected))
    while n < limit and chosen[n] == rejected[n]:
        n += 1
    return chosen, rejected[n:]
