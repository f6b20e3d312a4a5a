"""The text of a conversation that dedup and decontamination compare, computed column-wise in polars."""

from __future__ import annotations

from typing import Literal

import polars as pl

TextKey = Literal["conversation", "user", "first_user", "assistant"]


def conversation_text(table: pl.DataFrame, key: TextKey = "conversation", sep: str = "\n") -> pl.Series:
    """One string per row: all turns, the user turns, the first user turn, or the assistant turns.

    System turns are left out of every key: a shared system prompt must not make records look alike.
    """
    msgs = pl.col("messages")
    if key == "conversation":
        picked = msgs.list.eval(
            pl.when(pl.element().struct.field("role") != "system").then(pl.element().struct.field("content"))
        ).list.drop_nulls()
    elif key in ("user", "assistant"):
        picked = msgs.list.eval(
            pl.when(pl.element().struct.field("role") == key).then(pl.element().struct.field("content"))
        ).list.drop_nulls()
    elif key == "first_user":
        picked = (
            msgs.list.eval(
                pl.when(pl.element().struct.field("role") == "user").then(
                    pl.element().struct.field("content")
                )
            )
            .list.drop_nulls()
            .list.head(1)
        )
    else:
        raise ValueError(f"unknown text key {key!r}; use conversation, user, first_user or assistant")
    return table.select(picked.list.join(sep).fill_null("").alias("text")).to_series()
