"""normalize: one chat format for the whole set (system prompt, Unicode, whitespace, roles, turn merging).

All of it works on whole columns: the turns of a batch are taken apart into one array per message
field, cleaned by the compiled kernel (curate.text.clean), merged and given the system prompt with
numpy index arithmetic, and put back together as the new messages column. Records keep their ids:
the content id is computed on text cleaned the same way.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.errors import CurateError
from curate.records import MESSAGE_TYPE, ROLES, message, message_fields
from curate.stages.base import Decisions, Stage, option, register
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
class NormalizeStage(Stage):
    """One chat format: roles, Unicode, whitespace, system prompt."""

    name = "normalize"
    Config = NormalizeConfig

    @classmethod
    def warmup_config(cls, config: NormalizeConfig) -> NormalizeConfig:
        return dataclasses.replace(config, template="chatml")  # a tokenizer compiles nothing of ours

    def reads(self) -> list:
        folder = self._template_folder()
        return [folder] if folder is not None else []

    def _template_folder(self):
        from curate.templates import TEMPLATE_NAMES

        if self.config.template in TEMPLATE_NAMES:
            return None
        folder = self.context.base_dir / self.config.template
        return folder if folder.is_dir() else None

    def setup(self) -> None:
        from curate.templates import TEMPLATE_NAMES, render

        cfg = self.config
        self._aliases = {k.lower(): v for k, v in cfg.role_aliases.items()}
        self._system = None
        if cfg.system_prompt is not None:
            text = clean_text(
                cfg.system_prompt, cfg.unicode_form, cfg.strip_control_chars, cfg.strip_whitespace
            )
            self._system = message("system", text)
        # Named templates render any non-empty conversation of canonical roles, so only a tokenizer's
        # own template (which may reject role orders) is tried on every record.
        self._tokenizer_template = None
        if cfg.template not in TEMPLATE_NAMES:
            folder = self._template_folder()
            self._tokenizer_template = str(folder) if folder is not None else cfg.template
            render([message("user", "hi")], self._tokenizer_template)  # a bad tokenizer fails here, once

    def process(self, table: pa.Table) -> Decisions:
        decisions = Decisions(table.num_rows)
        if table.num_rows == 0:
            return decisions
        cfg = self.config
        old = _Turns.of(table["messages"])
        role, unknown = self._canonical_roles(old.role)
        content, _ = clean_column(
            old.content, cfg.unicode_form, cfg.strip_control_chars, cfg.strip_whitespace
        )
        # a null content stays null unless its turn is rewritten anyway (its role was mapped)
        content = pc.if_else(pc.and_(_ne(role, old.role), pc.is_null(content)), "", content)
        new = _Turns(old.offsets, role, content, old.tool_calls, old.name)
        if cfg.merge_consecutive:
            new = _merged(new)
        if self._system is not None and cfg.system_prompt_mode != "keep":
            new = self._with_system(new)
        messages = new.array()
        self._drop(decisions, old, unknown, new, messages)
        decisions.replace("messages", messages)
        return decisions

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

        def extended(values: pa.Array, value: str | None) -> pa.Array:
            return pa.concat_arrays([values, pa.array([value], pa.string())]).take(take)

        return _Turns(
            offsets,
            extended(turns.role, "system"),
            extended(turns.content, self._system["content"]),
            extended(turns.tool_calls, None),
            extended(turns.name, None),
        )

    def _drop(self, decisions: Decisions, old: _Turns, unknown: np.ndarray, new: _Turns, messages) -> None:
        """unknown_role for a role nothing maps (the record's first); unrenderable for what the
        template cannot render: an empty conversation, or what a tokenizer's template refuses."""
        dropped = set()
        if unknown.any():
            roles = old.role.to_numpy(zero_copy_only=False)
            for turn in np.flatnonzero(unknown).tolist():
                record = int(old.record[turn])
                if record not in dropped:
                    dropped.add(record)
                    decisions.drop(
                        record,
                        "unknown_role",
                        {"role": roles[turn], "hint": "map it with normalize.role_aliases"},
                    )
        template = self.config.template
        for record in np.flatnonzero(np.diff(new.offsets) == 0).tolist():
            if record not in dropped:
                dropped.add(record)
                decisions.drop(
                    record, "unrenderable", {"template": template, "problem": "empty conversation"}
                )
        if self._tokenizer_template is None:
            return
        from curate.templates import render

        for record, turns in enumerate(messages.to_pylist()):
            if record in dropped:
                continue
            # A conversation still waiting for its answer (prompt-only) renders as a generation
            # prompt; whether it may stay is the filter's decision, not the template's.
            try:
                render(
                    turns, self._tokenizer_template, add_generation_prompt=turns[-1]["role"] != "assistant"
                )
            except (ValueError, CurateError) as exc:
                decisions.drop(record, "unrenderable", {"template": template, "problem": str(exc)})


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
