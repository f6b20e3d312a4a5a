"""What a stage changed in a record, kept per version (edits.parquet) so `curate show` can tell.

Stages only hand back replaced columns; `describe_changes` compares them with the batch they came
from, on whole columns, and says in a few words what changed in each record: the system prompt,
the number of turns, how many turns' text was cleaned, other fields.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from curate.records import message_fields

EDITS_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string()),
        pa.field("path", pa.string()),
        pa.field("row", pa.int64()),
        pa.field("stage", pa.string()),
        pa.field("change", pa.string()),
    ]
)

_OTHER_FIELDS = ("meta", "tools", "rejected", "label")  # named as "<field> changed"


def describe_changes(
    stage: str, old: pa.Table, new: pa.Table, rows: np.ndarray, columns: list[str]
) -> pa.Table:
    """Edits of the records `rows` (a mask) whose `columns` differ between `old` and `new`."""
    n = old.num_rows
    notes: list[pl.Series] = []
    if "messages" in columns:
        notes.extend(_message_notes(old["messages"], new["messages"], n))
    for name in _OTHER_FIELDS:
        if name in columns:
            differ = _differ(old[name], new[name])
            said = [f"{name} changed" if d else None for d in differ.tolist()]
            notes.append(pl.Series(said, dtype=pl.String))
    if not notes:
        return EDITS_SCHEMA.empty_table()
    source = new["source"].combine_chunks()
    facts = pl.DataFrame(
        {
            "id": new["id"].combine_chunks(),
            "path": source.field("path"),
            "row": source.field("row"),
            **{f"note{i}": s for i, s in enumerate(notes)},
        }
    ).filter(pl.Series(rows))
    edits = facts.select(
        "id",
        "path",
        "row",
        pl.lit(stage).alias("stage"),
        pl.concat_str(
            [pl.col(f"note{i}") for i in range(len(notes))], separator="; ", ignore_nulls=True
        ).alias("change"),
    ).filter(pl.col("change") != "")
    return edits.to_arrow().cast(EDITS_SCHEMA)


def added_edits(stage: str, added: pa.Table) -> pa.Table:
    """One edit per added record: it was added (synthetic) by the stage."""
    n = added.num_rows
    return pa.Table.from_arrays(
        [
            added["id"].combine_chunks(),
            pa.nulls(n, pa.string()),
            pa.nulls(n, pa.int64()),
            pa.array([stage] * n, pa.string()),
            pa.array(["added (synthetic)"] * n, pa.string()),
        ],
        schema=EDITS_SCHEMA,
    )


def _differ(old: pa.ChunkedArray | pa.Array, new: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Per row: whether the values differ (two nulls are equal)."""
    a = old.combine_chunks() if isinstance(old, pa.ChunkedArray) else old
    b = new.combine_chunks() if isinstance(new, pa.ChunkedArray) else new
    if pa.types.is_nested(a.type):  # no compute kernel compares lists; rare (rejected answers)
        return np.array([x != y for x, y in zip(a.to_pylist(), b.to_pylist(), strict=True)], np.bool_)
    same = pc.or_kleene(pc.equal(a, b), pc.and_(pc.is_null(a), pc.is_null(b)))
    return ~pc.fill_null(same, False).to_numpy(zero_copy_only=False)


def _message_notes(old_messages, new_messages, n: int) -> list[pl.Series]:
    """ "system prompt set/removed", then "turns a -> b" or "text cleaned in k turn(s)", per record."""
    o_offsets, o_role, o_content, _, _ = message_fields(old_messages)
    w_offsets, w_role, w_content, _, _ = message_fields(new_messages)
    o_sys, w_sys = _is(o_role, "system"), _is(w_role, "system")
    o_record = np.repeat(np.arange(n), np.diff(o_offsets))
    w_record = np.repeat(np.arange(n), np.diff(w_offsets))
    o_sys_count = np.bincount(o_record[o_sys], minlength=n)
    w_sys_count = np.bincount(w_record[w_sys], minlength=n)
    old_turns = np.diff(o_offsets) - o_sys_count
    new_turns = np.diff(w_offsets) - w_sys_count
    # where the counts of non-system turns agree, turns pair up by position: count those that differ
    same_count = old_turns == new_turns
    o_pick = pa.array(np.flatnonzero(~o_sys & same_count[o_record]))
    w_pick = pa.array(np.flatnonzero(~w_sys & same_count[w_record]))
    differ = _differ(o_role.take(o_pick), w_role.take(w_pick)) | _differ(
        o_content.take(o_pick), w_content.take(w_pick)
    )
    cleaned = np.bincount(o_record[o_pick.to_numpy()], weights=differ, minlength=n).astype(np.int64)
    facts = pl.DataFrame(
        {
            "system": _system_texts_differ(o_content, w_content, o_sys, w_sys, o_sys_count, w_sys_count),
            "system_set": w_sys_count > 0,
            "old": old_turns.astype(np.int64),
            "new": new_turns.astype(np.int64),
            "cleaned": cleaned,
        }
    )
    system = pl.when(pl.col("system")).then(
        pl.when(pl.col("system_set"))
        .then(pl.lit("system prompt set"))
        .otherwise(pl.lit("system prompt removed"))
    )
    turns = (
        pl.when(pl.col("old") != pl.col("new"))
        .then(pl.format("turns {} -> {}", "old", "new"))
        .when(pl.col("cleaned") > 0)
        .then(
            pl.format(
                "text cleaned in {} turn{}",
                "cleaned",
                pl.when(pl.col("cleaned") > 1).then(pl.lit("s")).otherwise(pl.lit("")),
            )
        )
    )
    notes = facts.select(system.alias("system"), turns.alias("turns"))
    return [notes["system"], notes["turns"]]


def _is(role: pa.Array, name: str) -> np.ndarray:
    return pc.fill_null(pc.equal(role, name), False).to_numpy(zero_copy_only=False)


def _system_texts_differ(o_content, w_content, o_sys, w_sys, o_count, w_count) -> np.ndarray:
    """Per record: whether its system turns' texts changed (in number or in text)."""
    differ = o_count != w_count
    both = np.flatnonzero((o_count > 0) & ~differ)
    if len(both):
        old_texts = o_content.filter(pa.array(o_sys)).to_pylist()
        new_texts = w_content.filter(pa.array(w_sys)).to_pylist()
        o_start = np.concatenate([[0], np.cumsum(o_count)])
        w_start = np.concatenate([[0], np.cumsum(w_count)])
        for r in both.tolist():
            differ[r] = old_texts[o_start[r] : o_start[r + 1]] != new_texts[w_start[r] : w_start[r + 1]]
    return differ
