"""Batch converters (whole chunks of rows in columns) give exactly what the row-by-row path gives."""

from __future__ import annotations

import dataclasses
import json
import random
from collections import Counter
from pathlib import Path

import pytest

from curate.formats import CHUNK_ROWS, FORMATS, FormatOptions, InputSpec, read_input


def read(spec: InputSpec, base: Path, batch_size: int = 5000) -> tuple[list[dict], list[dict], dict]:
    """Records, quarantine and per-file totals (batches may cut them differently on the two paths)."""
    records, quarantined, files = [], [], {}
    for batch in read_input(spec, base, batch_size=batch_size):
        records += batch.records
        quarantined += batch.quarantined
        for entry in batch.files:
            total = files.setdefault(
                entry["path"], {"format": entry["format"], "records": 0, "quarantined": 0}
            )
            total["records"] += entry["records"]
            total["quarantined"] += entry["quarantined"]
    return records, quarantined, files


@pytest.fixture
def row_by_row(monkeypatch):
    """Every format without its batch converter: the reference path."""

    def off():
        for name, fmt in list(FORMATS.items()):
            monkeypatch.setitem(FORMATS, name, dataclasses.replace(fmt, convert_batch=None))

    return off


TEXTS = [
    "",
    "  ",
    "\n\t",
    "\x1c",
    "plain",
    " padded \n",
    "caf\u00e9",
    "\u00a0",
    "x<|endoftext|>",
    "\u00e9<|endoftext|>",
    "<|endoftext|>",
    "two<|endoftext|><|endoftext|>",
    "end</s>",
    "a\n\nb",
]
VALUES = [*TEXTS, None, 7, 2.5, True, ["list"], {"k": "v"}]


def fuzzed_rows(rng: random.Random, keys: list[str], extra: list[str], n: int) -> list[dict]:
    """Rows of one shape with every field sometimes missing, null, not text, blank or marked."""
    rows = []
    for _ in range(n):
        row = {}
        for key in keys:
            roll = rng.random()
            if roll < 0.7:
                row[key] = rng.choice(TEXTS)
            elif roll < 0.95:
                row[key] = rng.choice(VALUES)
        for key in extra:
            if rng.random() < 0.15:
                row[key] = rng.choice(VALUES + [[["u", "a"]], []])
        rows.append(row)
    return rows


SHAPES = {
    "prompt_completion": (["prompt", "completion"], ["system", "id"]),
    "prompt_response": (["prompt", "response"], ["system", "source"]),
    "alpaca": (["instruction", "output"], ["input", "response", "system", "history", "category"]),
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("options", [{}, {"end_markers": ["</s>", "<|endoftext|>"]}])
def test_batch_equals_row_by_row_on_fuzzed_rows(tmp_path, row_by_row, shape, options):
    keys, extra = SHAPES[shape]
    rng = random.Random(sorted(SHAPES).index(shape))
    # a head of plain rows fixes the file's format; then every oddity, across several chunks
    head = [dict(zip(keys, (f"q{i}", f"a{i}"), strict=True)) for i in range(32)]
    rows = head + fuzzed_rows(rng, keys, extra, 2 * CHUNK_ROWS + 500)
    lines = [json.dumps(r) for r in rows]
    lines[40:40] = ["{broken", "[1, 2]", ""]  # unreadable, not an object, blank
    (tmp_path / "rows.jsonl").write_text("\n".join(lines) + "\n")
    specs = [InputSpec(path="rows.jsonl", format=fmt, options=options) for fmt in ("auto", shape)]
    batched = [read(spec, tmp_path, batch_size=3000) for spec in specs]
    # both paths take part: the batch converter takes the plain rows and leaves the odd ones
    taken = int(FORMATS[shape].convert_batch(rows, FormatOptions.from_dict(options, None)).handled.sum())
    assert len(rows) * 0.2 < taken < len(rows) - 1000
    row_by_row()
    assert batched == [read(spec, tmp_path, batch_size=3000) for spec in specs]
    for records, quarantined, files in batched:
        assert len(records) + len(quarantined) == len(rows) + 2
        assert files["rows.jsonl"]["records"] == len(records)


def test_batch_equals_row_by_row_on_all_of_raw(shared_data, row_by_row, monkeypatch):
    taken = Counter()
    for name, fmt in list(FORMATS.items()):
        if fmt.convert_batch is not None:

            def counted(rows, options, convert=fmt.convert_batch, name=name):
                batch = convert(rows, options)
                taken[name] += int(batch.handled.sum())
                return batch

            monkeypatch.setitem(FORMATS, name, dataclasses.replace(fmt, convert_batch=counted))
    spec = InputSpec(path="raw")
    batched = read(spec, shared_data)
    # every prompt/completion, prompt/response and alpaca row of raw/ goes the batch path
    assert taken == {"prompt_completion": 55_185, "alpaca": 23_025, "prompt_response": 1_000}
    row_by_row()
    assert batched == read(spec, shared_data)
    assert len(batched[0]) == 85_669 and len(batched[1]) == 5
