"""Decisions and how they are applied: the one place where records are kept, dropped, edited and added."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pyarrow as pa
import pytest

from curate.decisions import Decisions, Drop, apply_decisions
from curate.records import RECORD_SCHEMA, make_record, message, to_table


def batch(n: int) -> pa.Table:
    source = {"name": "t", "path": "t.jsonl", "row": 0, "format": "messages"}
    return to_table(
        [
            make_record([message("user", f"q{i}"), message("assistant", f"a{i}")], {**source, "row": i})
            for i in range(n)
        ]
    )


def test_row_and_column_evidence_are_stored_alike():
    table = batch(10)
    by_row, by_column = Decisions(10), Decisions(10)
    for i in (7, 2, 5):
        by_row.drop(i, "odd", {"score": i / 3, "of": f"r{i}"})
    rows = np.array([7, 2, 5])
    by_column.drop_many(rows, "odd", {"score": rows / 3, "of": pa.array([f"r{i}" for i in rows])})
    a, b = apply_decisions("s", table, by_row), apply_decisions("s", table, by_column)
    assert a.dropped.equals(b.dropped) and a.kept.equals(b.kept)
    assert a.drop_rows.tolist() == [2, 5, 7]
    assert json.loads(a.dropped["evidence"][0].as_py()) == {"of": "r2", "score": 2 / 3}
    assert a.verdicts()[5] == Drop("odd", {"of": "r5", "score": 5 / 3}) and a.verdicts()[0] is None
    assert a.reasons == {"odd": 3}
    assert a.kept["id"].to_pylist() == [table["id"][i].as_py() for i in (0, 1, 3, 4, 6, 8, 9)]


def test_a_row_dropped_twice_or_out_of_range_is_an_error():
    d = Decisions(4)
    d.drop(1, "a")
    d.drop_many([1, 2], "b")
    with pytest.raises(ValueError, match="row 1 is dropped twice"):
        d.dropped()
    with pytest.raises(ValueError, match="names row 4 of 4"):
        Decisions(4).drop_many([0, 4], "c")


def test_slices_of_global_decisions_equal_the_whole():
    rng = np.random.default_rng(0)
    n = 5000
    d = Decisions(n)
    rows = rng.choice(n, 900, replace=False)
    d.drop_many(rows[:600], "near", {"j": rng.random(600)})
    for r in rows[600:].tolist():
        d.drop(r, "exact", {"r": r})
    table = batch(n)
    whole = apply_decisions("dedup", table, d)
    cuts = [0, 1, 1234, 1235, 3000, n]
    parts = [
        apply_decisions("dedup", table.slice(a, b - a), d.slice(a, b)) for a, b in itertools.pairwise(cuts)
    ]
    assert pa.concat_tables(p.dropped for p in parts).equals(whole.dropped)
    assert pa.concat_tables(p.kept for p in parts).equals(whole.kept)
    assert sum(p.drop_rows.size for p in parts) == 900


def test_replaced_columns_are_described_and_added_records_listed():
    table = batch(3)
    d = Decisions(3)
    messages = table["messages"].to_pylist()
    messages[1] = [message("system", "Be brief."), *messages[1]]
    messages[2] = [message("user", "q2 "), message("assistant", "a2")]  # a trailing space: text changed
    d.replace("messages", pa.array(messages, RECORD_SCHEMA.field("messages").type))
    meta = pa.array([None, '{"score": 1}', None], pa.string())
    d.replace("meta", meta)
    d.add(
        to_table([make_record([message("user", "new")], {"name": "gen"}, origin="synthetic", parent_id="x")])
    )
    applied = apply_decisions("s", table, d)
    changes = applied.edits.select(["row", "change"]).to_pylist()
    assert changes == [
        {"row": 1, "change": "system prompt set; meta changed"},
        {"row": 2, "change": "text cleaned in 1 turn"},
        {"row": None, "change": "added (synthetic)"},
    ]
    assert applied.added["origin"].to_pylist() == ["synthetic"]
    assert applied.kept["messages"][1].as_py()[0]["content"] == "Be brief."
