"""normalize: one chat format for the whole set (system prompt, Unicode, whitespace, roles, turn merging)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from curate.edits import EDITS_SCHEMA
from curate.errors import CurateError
from curate.records import MESSAGE_TYPE, ROLES, message, message_fields
from curate.stages.base import (
    Drop,
    RowsResult,
    RowStage,
    Verdict,
    evidence_json,
    option,
    register,
    without_drops,
)
from curate.text.clean import clean_column, clean_text


@dataclass
class NormalizeConfig:
    system_prompt: str | None = option(
        None, help="Default system prompt; how it applies is system_prompt_mode."
    )
    system_prompt_mode: Literal["add", "replace", "keep"] = option(
        "add",
        help="add: give records without a system turn the default one; replace: every record gets the "
        "default (theirs is removed); keep: leave system turns exactly as the sources have them.",
    )
    unicode_form: Literal["NFC", "NFKC", "none"] = option(
        "NFC", help="Unicode normalization form of all text."
    )
    strip_control_chars: bool = option(True, help="Remove C0/C1 control characters (tab and newline stay).")
    strip_whitespace: bool = option(
        True, help="Turn CRLF into LF, trim each turn, drop trailing spaces on lines, cap blank lines at one."
    )
    role_aliases: dict = option(
        {},
        help="Extra role names to map, e.g. {narrator: system, bot: assistant}; canonical roles always pass.",
    )
    merge_consecutive: bool = option(
        True,
        help="Merge consecutive user or assistant turns (joined by a blank line); tool turns stay apart.",
    )
    template: str = option(
        "chatml",
        help="Chat template of the version (chatml, llama-3, or a Hugging Face tokenizer folder to use its "
        "own chat template); recorded in the manifest and used by `curate train`. Records it cannot render "
        "are dropped with reason unrenderable.",
    )

    def check(self) -> None:
        bad = {k: v for k, v in self.role_aliases.items() if v not in ROLES}
        if bad:
            raise ValueError(f"role_aliases must map to one of {', '.join(ROLES)}; got {bad}")
        if self.system_prompt_mode in ("add", "replace") and self.system_prompt is not None:
            if not self.system_prompt.strip():
                raise ValueError("system_prompt is empty; leave it out instead")


@register
class NormalizeStage(RowStage):
    """Give every record the same chat format: roles, Unicode, whitespace, system prompt, merged turns."""

    name = "normalize"
    Config = NormalizeConfig

    def setup(self) -> None:
        from curate.templates import TEMPLATE_NAMES, render

        cfg = self.config
        self._aliases = {k.lower(): v for k, v in cfg.role_aliases.items()}
        self._system = None if cfg.system_prompt is None else message("system", self.clean(cfg.system_prompt))
        # Named templates render any non-empty conversation of canonical roles, so only a tokenizer's
        # own template (which may reject role orders) is tried on every record.
        self._tokenizer_template = None
        if cfg.template not in TEMPLATE_NAMES:
            folder = self.context.base_dir / cfg.template
            self._tokenizer_template = str(folder) if folder.is_dir() else cfg.template
            render([message("user", "hi")], self._tokenizer_template)  # a bad tokenizer fails here, once

    def clean(self, text: str) -> str:
        cfg = self.config
        return clean_text(text, cfg.unicode_form, cfg.strip_control_chars, cfg.strip_whitespace)

    def process(self, record: dict) -> Verdict:
        cfg = self.config
        turns = []
        changed = False
        for m in record["messages"]:
            role = m["role"] if m["role"] in ROLES else self._aliases.get(m["role"].lower())
            if role is None:
                return Drop("unknown_role", {"role": m["role"], "hint": "map it with normalize.role_aliases"})
            content = m["content"] or ""
            cleaned = self.clean(content)
            if role == m["role"] and cleaned is content:
                turns.append(m)  # clean_text hands back the same object when there is nothing to do
            else:
                turns.append({**m, "role": role, "content": cleaned})
                changed = True
        if cfg.merge_consecutive:
            merged = _merge_consecutive(turns)
            changed = changed or len(merged) != len(turns)
            turns = merged
        if self._system is not None and cfg.system_prompt_mode != "keep":
            if cfg.system_prompt_mode == "replace" and any(t["role"] == "system" for t in turns):
                turns = [t for t in turns if t["role"] != "system"]
                changed = True
            if not turns or turns[0]["role"] != "system":
                turns = [self._system, *turns]
                changed = True
        problem = self._render_problem(turns)
        if problem:
            return Drop("unrenderable", {"template": cfg.template, "problem": problem})
        return {**record, "messages": turns} if changed else None

    def on_columns(self) -> bool:
        from curate.templates import TEMPLATE_NAMES

        return self.config.template in TEMPLATE_NAMES  # a tokenizer's template renders each record

    def process_table(self, table: pa.Table) -> RowsResult:
        """`process` on every row, done on whole columns: the same rows, drops and edits, without dicts.

        A tokenizer's own template is tried on each record in Python, so that case takes the row path.
        """
        if not self.on_columns() or table.num_rows == 0:
            return super().process_table(table)
        cfg = self.config
        old = _Turns.of(table["messages"])
        role, unknown = self._canonical_roles(old.role)
        content, content_changed = clean_column(
            old.content, cfg.unicode_form, cfg.strip_control_chars, cfg.strip_whitespace
        )
        role_changed = _ne(role, old.role)
        # a null content stays null unless its turn is rewritten anyway (as `process` does)
        content = pc.if_else(pc.and_(role_changed, pc.is_null(content)), "", content)
        new = _Turns(old.offsets, role, content, old.tool_calls, old.name)
        turn_changed = role_changed | content_changed
        if cfg.merge_consecutive:
            new = _merged(new)
        if self._system is not None and cfg.system_prompt_mode != "keep":
            new = self._with_system(new)
        drops = self._drops(table, old, unknown, new)
        old_counts, new_counts = np.diff(old.offsets), np.diff(new.offsets)
        changed = np.bincount(old.record, weights=turn_changed, minlength=table.num_rows) > 0
        changed |= old_counts != new_counts
        system_differs = _system_texts_differ(old, new)
        changed |= system_differs
        edits = self._edits(table, old, new, turn_changed, system_differs, changed, {i for i, _, _ in drops})
        column = table.schema.get_field_index("messages")
        kept = table.set_column(column, table.schema.field(column), new.array())
        return RowsResult(without_drops(kept, drops), drops, edits)

    def _canonical_roles(self, role: pa.Array) -> tuple[pa.Array, np.ndarray]:
        """Roles with aliases mapped, and which turns have a role nothing maps."""
        encoded = pc.dictionary_encode(role)
        names = encoded.dictionary.to_pylist()
        mapped = [r if r in ROLES else self._aliases.get(r.lower()) for r in names]
        codes = encoded.indices.to_numpy(zero_copy_only=False)
        unknown = np.array([m is None for m in mapped], np.bool_)[codes] if len(names) else np.zeros(0, bool)
        canonical = pa.array([m or r for m, r in zip(mapped, names, strict=True)], pa.string())
        return canonical.take(encoded.indices), unknown

    def _with_system(self, turns: _Turns) -> _Turns:
        """The default system prompt added (or put in place of the records' own, mode replace)."""
        if self.config.system_prompt_mode == "replace":
            turns = turns.filter(_ne(turns.role, "system", nulls=True))
        n = len(turns.offsets) - 1
        counts = np.diff(turns.offsets)
        starts = turns.offsets[:-1]
        first_is_system = np.zeros(n, np.bool_)
        has_turns = counts > 0
        roles = turns.role.to_numpy(zero_copy_only=False)
        first_is_system[has_turns] = roles[starts[has_turns]] == "system"
        add = ~first_is_system
        if not add.any():
            return turns
        system = len(turns.role)  # index of the system message, appended after the turns
        offsets = np.zeros(n + 1, np.int64)
        np.cumsum(counts + add, out=offsets[1:])
        order = np.full(offsets[-1], system, np.int64)
        turn_record = np.repeat(np.arange(n), counts)
        within = np.arange(len(turn_record)) - starts[turn_record]
        order[offsets[turn_record] + add[turn_record] + within] = np.arange(len(turn_record))
        take = pa.array(order)
        sys_msg = self._system

        def extended(values: pa.Array, value: str | None) -> pa.Array:
            return pa.concat_arrays([values, pa.array([value], pa.string())]).take(take)

        return _Turns(
            offsets,
            extended(turns.role, "system"),
            extended(turns.content, sys_msg["content"]),
            extended(turns.tool_calls, None),
            extended(turns.name, None),
        )

    def _drops(self, table: pa.Table, old: _Turns, unknown: np.ndarray, new: _Turns) -> list[tuple]:
        drops = {}
        if unknown.any():
            roles = old.role.to_numpy(zero_copy_only=False)
            for turn in np.flatnonzero(unknown).tolist():
                record = int(old.record[turn])
                if record not in drops:  # the first unknown role of a record is the one reported
                    evidence = {"role": roles[turn], "hint": "map it with normalize.role_aliases"}
                    drops[record] = (record, "unknown_role", evidence_json(evidence))
        for record in np.flatnonzero(np.diff(new.offsets) == 0).tolist():
            if record not in drops:
                evidence = {"template": self.config.template, "problem": "empty conversation"}
                drops[record] = (record, "unrenderable", evidence_json(evidence))
        return [drops[r] for r in sorted(drops)]

    def _edits(
        self, table: pa.Table, old: _Turns, new: _Turns, turn_changed, system_differs, changed, dropped
    ) -> pa.Table:
        """What `describe_change` says of each rewritten record, from counts instead of dicts."""
        n = table.num_rows
        old_system, new_system = old.role_is("system"), new.role_is("system")
        new_sys = np.bincount(new.record, weights=new_system, minlength=n)
        old_turns = np.diff(old.offsets) - np.bincount(old.record, weights=old_system, minlength=n)
        new_turns = np.diff(new.offsets) - new_sys
        rows = changed.copy()
        rows[list(dropped)] = False
        source = table["source"].combine_chunks()
        facts = pl.DataFrame(
            {
                "id": table["id"].combine_chunks(),
                "path": source.field("path"),
                "row": source.field("row"),
                "system": system_differs,
                "system_set": new_sys > 0,
                "old": old_turns.astype(np.int64),
                "new": new_turns.astype(np.int64),
                "cleaned": np.bincount(old.record, weights=turn_changed & ~old_system, minlength=n).astype(
                    np.int64
                ),
            }
        ).filter(pl.Series(rows))
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
        edits = facts.select(
            "id",
            "path",
            "row",
            pl.lit(self.name).alias("stage"),
            pl.concat_str([system, turns], separator="; ", ignore_nulls=True).alias("change"),
        ).filter(pl.col("change") != "")
        return edits.to_arrow().cast(EDITS_SCHEMA)

    def _render_problem(self, turns: list[dict]) -> str | None:
        if not turns:
            return "empty conversation"
        if self._tokenizer_template is None:
            return None
        from curate.templates import render

        # A conversation still waiting for its answer (prompt-only) renders as a generation prompt;
        # whether it may stay is the filter's decision, not the template's.
        try:
            render(turns, self._tokenizer_template, add_generation_prompt=turns[-1]["role"] != "assistant")
        except (ValueError, CurateError) as exc:
            return str(exc)
        return None


def _merge_consecutive(turns: list[dict]) -> list[dict]:
    merged: list[dict] = []
    for t in turns:
        prev = merged[-1] if merged else None
        if (
            prev is not None
            and t["role"] == prev["role"]
            and t["role"] in ("user", "assistant", "system")
            and not prev.get("tool_calls")
            and not t.get("tool_calls")
        ):
            joined = "\n\n".join(x for x in (prev["content"], t["content"]) if x)
            merged[-1] = {**prev, "content": joined}
        else:
            merged.append(t)
    return merged


@dataclass
class _Turns:
    """A messages column taken apart: record offsets and one array per message field."""

    offsets: np.ndarray  # int64, len = records + 1, starting at 0
    role: pa.Array
    content: pa.Array
    tool_calls: pa.Array
    name: pa.Array

    @classmethod
    def of(cls, messages: pa.Array | pa.ChunkedArray) -> _Turns:
        return cls(*message_fields(messages))

    @property
    def record(self) -> np.ndarray:
        """The record each turn belongs to."""
        return np.repeat(np.arange(len(self.offsets) - 1), np.diff(self.offsets))

    def role_is(self, role: str) -> np.ndarray:
        return pc.equal(self.role, role).to_numpy(zero_copy_only=False)

    def filter(self, keep: np.ndarray) -> _Turns:
        counts = np.bincount(self.record[keep], minlength=len(self.offsets) - 1)
        offsets = np.zeros(len(self.offsets), np.int64)
        np.cumsum(counts, out=offsets[1:])
        mask = pa.array(keep)
        return _Turns(
            offsets, *(a.filter(mask) for a in (self.role, self.content, self.tool_calls, self.name))
        )

    def array(self) -> pa.ListArray:
        turns = pa.StructArray.from_arrays(
            [self.role, self.content, self.tool_calls, self.name], fields=list(MESSAGE_TYPE)
        )
        return pa.ListArray.from_arrays(pa.array(self.offsets.astype(np.int32)), turns)


def _ne(values: pa.Array, other, nulls: bool = False) -> np.ndarray:
    """values != other, element-wise, as numpy booleans (a null compares as `nulls`)."""
    return pc.fill_null(pc.not_equal(values, other), nulls).to_numpy(zero_copy_only=False)


def _merged(turns: _Turns) -> _Turns:
    """`_merge_consecutive` on every record: runs of user, assistant or system turns without tool calls."""
    record = turns.record
    encoded = pc.dictionary_encode(turns.role, null_encoding="encode")  # small codes, not str objects
    role = encoded.indices.to_numpy(zero_copy_only=False)
    names = encoded.dictionary.to_pylist()
    plain = pc.fill_null(pc.equal(turns.tool_calls, ""), True).to_numpy(zero_copy_only=False)
    mergeable = np.array([n in ("user", "assistant", "system") for n in names] + [False])[role] & plain
    follows = np.zeros(len(role), np.bool_)
    follows[1:] = (record[1:] == record[:-1]) & (role[1:] == role[:-1]) & mergeable[1:] & mergeable[:-1]
    if not follows.any():
        return turns
    starts = np.flatnonzero(~follows)  # each run's first turn, which the run becomes
    sizes = np.diff(np.append(starts, len(role)))
    runs = np.flatnonzero(sizes > 1)
    members = np.concatenate([np.arange(starts[g], starts[g] + sizes[g]) for g in runs.tolist()])
    texts = turns.content.take(pa.array(members)).to_pylist()
    joined, k = [], 0
    for size in sizes[runs].tolist():
        joined.append("\n\n".join(x for x in texts[k : k + size] if x))
        k += size
    kept = turns.filter(~follows)
    mask = np.zeros(len(starts), np.bool_)
    mask[runs] = True
    content = pc.replace_with_mask(kept.content, pa.array(mask), pa.array(joined, kept.content.type))
    return _Turns(kept.offsets, kept.role, content, kept.tool_calls, kept.name)


def _system_texts_differ(old: _Turns, new: _Turns) -> np.ndarray:
    """Per record: whether its system turns' texts changed (describe_change's "system prompt" note)."""
    n = len(old.offsets) - 1
    old_sys = old.role_is("system")
    new_sys = new.role_is("system")
    old_count = np.bincount(old.record[old_sys], minlength=n)
    new_count = np.bincount(new.record[new_sys], minlength=n)
    differ = old_count != new_count
    both = np.flatnonzero((old_count > 0) & ~differ)
    if len(both):
        old_texts = old.content.filter(pa.array(old_sys)).to_pylist()
        new_texts = new.content.filter(pa.array(new_sys)).to_pylist()
        old_start = np.concatenate([[0], np.cumsum(old_count)])
        new_start = np.concatenate([[0], np.cumsum(new_count)])
        for r in both.tolist():
            a = old_texts[old_start[r] : old_start[r + 1]]
            b = new_texts[new_start[r] : new_start[r + 1]]
            differ[r] = a != b
    return differ
