"""filter: the cheap checks every instruction set needs (empty turns, no answer, length, refusals)."""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from curate.records import message_fields
from curate.stages.base import Decisions, Drop, Stage, option, register
from curate.text.clean import blank_column
from curate.text.refusals import BOILERPLATE, any_of

_WORDISH = re.compile(r"\w+|[^\w\s]")


@dataclass
class FilterConfig:
    drop_empty_turns: bool = option(
        True, help="Drop records with an empty or whitespace-only user/assistant turn."
    )
    require_assistant: bool = option(True, help="Drop records with no assistant answer at all.")
    keep_prompt_only: bool = option(
        False,
        help="Keep prompt-only records (instruction lists, self-instruct tasks: meta.needs_response) for a "
        "later respond/evol stage to answer; otherwise they are dropped as prompt_only.",
    )
    require_final_assistant: bool = option(
        True, help="Drop conversations whose last turn is not the assistant's."
    )
    min_chars: int = option(
        0, help="Minimum characters of the whole conversation (system turns excluded).", minimum=0
    )
    max_chars: int | None = option(None, help="Maximum characters of the whole conversation.", minimum=0)
    min_assistant_chars: int = option(1, help="Minimum characters of every assistant turn.", minimum=0)
    min_user_chars: int = option(1, help="Minimum characters of every user turn.", minimum=0)
    min_tokens: int = option(0, help="Minimum tokens of the conversation (see tokenizer).", minimum=0)
    max_tokens: int | None = option(
        None, help="Maximum tokens of the conversation (see tokenizer).", minimum=0
    )
    tokenizer: str | None = option(
        None,
        help="Hugging Face tokenizer folder for token bounds; without one, tokens are counted as words and "
        "punctuation marks (a close, tokenizer-free estimate).",
    )
    drop_refusals: bool = option(True, help="Drop records whose assistant turns contain refusal boilerplate.")
    refusal_patterns: list[str] = option(
        BOILERPLATE,
        help="Case-insensitive regular expressions (Rust regex syntax: no look-around) matched against "
        "assistant turns.",
    )

    def check(self) -> None:
        for pattern in self.refusal_patterns:
            try:
                pl.Series([""]).str.contains(pattern)
            except pl.exceptions.ComputeError as exc:
                raise ValueError(
                    f"refusal_patterns: {pattern!r} is not a valid regular expression ({exc})"
                ) from None
        if self.max_chars is not None and self.max_chars < self.min_chars:
            raise ValueError("max_chars is below min_chars")
        if self.max_tokens is not None and self.max_tokens < self.min_tokens:
            raise ValueError("max_tokens is below min_tokens")


@register
class FilterStage(Stage):
    """Drop empty, unanswered, out-of-bounds and refusal records."""

    name = "filter"
    Config = FilterConfig

    def reads(self) -> list:
        folder = self.context.base_dir / self.config.tokenizer if self.config.tokenizer else None
        return [folder] if folder is not None and folder.is_dir() and self._token_bounds() else []

    @classmethod
    def warmup_config(cls, config: FilterConfig) -> FilterConfig:
        return dataclasses.replace(config, tokenizer=None)

    def _token_bounds(self) -> bool:
        return bool(self.config.min_tokens or self.config.max_tokens is not None)

    def setup(self) -> None:
        cfg = self.config
        self._refusal = any_of(cfg.refusal_patterns)
        self._count_tokens = None
        if self._token_bounds():
            self._count_tokens = _word_counter
            if cfg.tokenizer:
                self._count_tokens = _hf_token_counter(cfg.tokenizer, self.context.base_dir)

    def process(self, table: pa.Table) -> Decisions:
        """The cheap checks on whole columns; the records that fail one are judged one by one, to
        report the first failure in `_verdict`'s order, with its evidence."""
        cfg = self.config
        decisions = Decisions(table.num_rows)
        if table.num_rows == 0:
            return decisions
        t = _TurnFacts.of(table["messages"])
        suspects = ~t.has_assistant | (t.last_role != "assistant") | (t.text_chars < cfg.min_chars)
        if cfg.max_chars is not None:
            suspects |= t.text_chars > cfg.max_chars
        tokens = self._count_tokens(t.texts()) if self._count_tokens is not None else None
        if tokens is not None:
            suspects |= tokens < cfg.min_tokens
            if cfg.max_tokens is not None:
                suspects |= tokens > cfg.max_tokens
        empty = _first_per_record(t, t.speaks & t.empty & ~t.tool_call) if cfg.drop_empty_turns else {}
        short_turn = (t.is_assistant & ~t.tool_call & (t.chars < cfg.min_assistant_chars)) | (
            t.is_user & (t.chars < cfg.min_user_chars)
        )
        short = _first_per_record(t, short_turn)
        refusals = self._refusals(t) if cfg.drop_refusals else {}
        flagged = set(np.flatnonzero(suspects).tolist()) | set(empty) | set(short) | set(refusals)
        meta = table["meta"].combine_chunks()
        for i in sorted(flagged):
            verdict = self._verdict(
                t.roles_of(i),
                empty.get(i),
                lambda i=i: bool(meta[i].as_py()) and json.loads(meta[i].as_py()).get("needs_response"),
                None if i not in short else (short[i], t.chars_of(i, short[i])),
                int(t.text_chars[i]),
                None if tokens is None else int(tokens[i]),
                refusals.get(i),
            )
            if verdict is not None:
                decisions.drop(i, verdict.reason, verdict.evidence)
        return decisions

    def _verdict(self, roles, empty, needs_response, short, chars, tokens, refusal) -> Drop | None:
        """The checks in their order, on one record's facts; the first that fails is the verdict.

        roles: of the non-system turns; empty: the first empty user/assistant turn, or None;
        needs_response: () -> whether meta marks a prompt-only record; short: (turn, chars) of the
        first too-short turn, or None; chars: of the conversation; tokens: of the conversation, or
        None without token bounds; refusal: (turn, match), or None.
        """
        cfg = self.config
        if empty is not None:
            return Drop("empty_turn", {"turn": empty, "role": roles[empty]})
        if "assistant" not in roles:
            if needs_response():
                return None if cfg.keep_prompt_only else Drop("prompt_only", {})
            if cfg.require_assistant:
                return Drop("no_assistant_answer", {"roles": roles})
        elif cfg.require_final_assistant and roles[-1] != "assistant":
            return Drop("not_ending_on_assistant", {"last_role": roles[-1]})
        if short is not None:
            turn, turn_chars = short
            if roles[turn] == "assistant":
                return Drop("assistant_too_short", {"chars": turn_chars, "min": cfg.min_assistant_chars})
            return Drop("user_too_short", {"chars": turn_chars, "min": cfg.min_user_chars})
        if chars < cfg.min_chars:
            return Drop("too_short", {"chars": chars, "min": cfg.min_chars})
        if cfg.max_chars is not None and chars > cfg.max_chars:
            return Drop("too_long", {"chars": chars, "max": cfg.max_chars})
        if tokens is not None:
            if tokens < cfg.min_tokens:
                return Drop("too_few_tokens", {"tokens": tokens, "min": cfg.min_tokens})
            if cfg.max_tokens is not None and tokens > cfg.max_tokens:
                return Drop("too_many_tokens", {"tokens": tokens, "max": cfg.max_tokens})
        if refusal is not None:
            return Drop("refusal", {"turn": refusal[0], "match": refusal[1]})
        return None

    def _refusals(self, t: _TurnFacts) -> dict[int, tuple[int, str]]:
        """First refusal match per record as {record: (turn, matched text)}.

        Matching runs in polars' regex engine over all assistant turns at once: Python's `re` over
        every assistant turn of a large set costs more than all the other checks together.
        """
        candidates = np.flatnonzero(t.is_assistant & (t.chars > 0))
        texts = pl.Series(t.content.take(pa.array(t.turn[candidates])))
        matches = texts.str.extract(self._refusal, 1)
        hit = matches.is_not_null().to_numpy()
        found: dict[int, tuple[int, str]] = {}
        for k, match in zip(np.flatnonzero(hit).tolist(), matches.filter(hit).to_list(), strict=True):
            record = int(t.record[candidates[k]])
            if record not in found:
                found[record] = (int(t.position[candidates[k]]), match)
        return found


def _word_counter(texts: list[str]) -> np.ndarray:
    """Tokens as words and punctuation marks: a close, tokenizer-free estimate."""
    return np.array([len(_WORDISH.findall(text)) for text in texts], np.int64)


def _hf_token_counter(path: str, base_dir):
    from pathlib import Path

    from curate.errors import CurateError

    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise CurateError(
            "filter.tokenizer needs the transformers package", hint="pip install 'curate[train]'"
        ) from None
    folder = Path(path) if Path(path).is_absolute() else base_dir / path
    try:
        tok = AutoTokenizer.from_pretrained(str(folder if folder.exists() else path), local_files_only=True)
    except OSError as exc:
        raise CurateError(
            f"filter.tokenizer: cannot load {path!r}: {exc}", hint="give a local tokenizer folder"
        ) from None

    def count(texts: list[str]) -> np.ndarray:
        return np.array([len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]], np.int64)

    return count


@dataclass
class _TurnFacts:
    """Per non-system turn of a messages column: what filter's checks look at, as numpy arrays."""

    turn: np.ndarray  # index of the turn in the flattened messages
    record: np.ndarray
    position: np.ndarray  # index among the record's non-system turns (what evidence calls "turn")
    role: np.ndarray  # object array of role names
    content: pa.Array  # all turns' contents (index with `turn`)
    chars: np.ndarray  # len(content or "")
    empty: np.ndarray  # not (content or "").strip()
    tool_call: np.ndarray  # bool(tool_calls)
    starts: np.ndarray  # per record: its first non-system turn in these arrays
    has_assistant: np.ndarray  # per record
    last_role: np.ndarray  # per record: role of its last non-system turn ("" if none)
    text_chars: np.ndarray  # per record: len("\n".join(contents of its non-system turns))

    @classmethod
    def of(cls, messages: pa.Array | pa.ChunkedArray) -> _TurnFacts:
        offsets, role, content, tool_calls, _ = message_fields(messages)
        n = len(offsets) - 1
        roles = role.to_numpy(zero_copy_only=False)
        turn = np.flatnonzero(roles != "system")
        record = np.repeat(np.arange(n), np.diff(offsets))[turn]
        starts = np.searchsorted(record, np.arange(n + 1))
        roles = roles[turn]
        take = pa.array(turn)
        text = content.take(take)
        chars = pc.fill_null(pc.utf8_length(text), 0).to_numpy(zero_copy_only=False).astype(np.int64)
        empty = blank_column(text)
        calls = tool_calls.take(take)
        tool_call = pc.fill_null(pc.not_equal(calls, ""), False).to_numpy(zero_copy_only=False)
        is_assistant = roles == "assistant"
        counts = np.diff(starts)
        last_role = np.full(n, "", dtype=object)
        last_role[counts > 0] = roles[starts[1:][counts > 0] - 1]
        return cls(
            turn=turn,
            record=record,
            position=np.arange(len(turn)) - starts[record],
            role=roles,
            content=content,
            chars=chars,
            empty=empty,
            tool_call=tool_call,
            starts=starts,
            has_assistant=np.bincount(record, weights=is_assistant, minlength=n) > 0,
            last_role=last_role,
            text_chars=np.bincount(record, weights=chars, minlength=n).astype(np.int64)
            + np.maximum(counts - 1, 0),
        )

    @property
    def is_assistant(self) -> np.ndarray:
        return self.role == "assistant"

    @property
    def is_user(self) -> np.ndarray:
        return self.role == "user"

    @property
    def speaks(self) -> np.ndarray:
        return self.is_assistant | self.is_user

    def texts(self) -> list[str]:
        """Per record: its non-system turns joined by newlines (what token bounds count)."""
        text = pc.fill_null(self.content.take(pa.array(self.turn)), "").to_pylist()
        return [
            "\n".join(text[a:b])
            for a, b in zip(self.starts[:-1].tolist(), self.starts[1:].tolist(), strict=True)
        ]

    def roles_of(self, record: int) -> list[str]:
        return self.role[self.starts[record] : self.starts[record + 1]].tolist()

    def chars_of(self, record: int, position: int) -> int:
        return int(self.chars[self.starts[record] + position])


def _first_per_record(t: _TurnFacts, hits: np.ndarray) -> dict[int, int]:
    """{record: position of its first turn where `hits`}."""
    where = np.flatnonzero(hits)
    records, first = np.unique(t.record[where], return_index=True)
    return dict(zip(records.tolist(), t.position[where[first]].tolist(), strict=True))
