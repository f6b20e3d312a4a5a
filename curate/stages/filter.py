"""filter: the cheap checks every instruction set needs (empty turns, no answer, length, refusals)."""

from __future__ import annotations

import re
from dataclasses import dataclass

import polars as pl

from curate.records import meta_of
from curate.stages.base import Drop, RowStage, Verdict, option, register

# Boilerplate that marks a refusal or a model talking about itself rather than answering.
DEFAULT_REFUSAL_PATTERNS = [
    r"\bas an ai language model\b",
    r"\bas an ai (?:assistant|model)\b",
    r"\bas a language model\b",
    r"\bi(?: am|'m) (?:just )?an ai\b",
    r"\bi(?: am|'m) not able to (?:provide|assist|help)\b",
    r"\bi(?: am|'m) sorry,? but i (?:cannot|can't|am unable to|won't)\b",
    r"\bi cannot fulfill (?:this|your) request\b",
    r"\bi do not have (?:personal )?(?:opinions|feelings|emotions|beliefs)\b",
    r"\bmy knowledge cutoff\b",
    r"\bopenai's (?:use|content) polic",
]

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
    min_chars: int = option(0, help="Minimum characters of the whole conversation (system turns excluded).")
    max_chars: int | None = option(None, help="Maximum characters of the whole conversation.")
    min_assistant_chars: int = option(1, help="Minimum characters of every assistant turn.")
    min_user_chars: int = option(1, help="Minimum characters of every user turn.")
    min_tokens: int = option(0, help="Minimum tokens of the conversation (see tokenizer).")
    max_tokens: int | None = option(None, help="Maximum tokens of the conversation (see tokenizer).")
    tokenizer: str | None = option(
        None,
        help="Hugging Face tokenizer folder for token bounds; without one, tokens are counted as words and "
        "punctuation marks (a close, tokenizer-free estimate).",
    )
    drop_refusals: bool = option(True, help="Drop records whose assistant turns contain refusal boilerplate.")
    refusal_patterns: list[str] = option(
        DEFAULT_REFUSAL_PATTERNS,
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
class FilterStage(RowStage):
    """Drop records that no curation should keep: empty turns, no answer, out-of-bounds length, refusals."""

    name = "filter"
    Config = FilterConfig

    def setup(self) -> None:
        cfg = self.config
        self._refusal = "(?i)(" + "|".join(f"(?:{p})" for p in cfg.refusal_patterns) + ")"
        self._count_tokens = _word_count
        if cfg.tokenizer and (cfg.min_tokens or cfg.max_tokens is not None):
            self._count_tokens = _hf_token_counter(cfg.tokenizer, self.context.base_dir)

    def process_batch(self, records: list[dict]) -> list[Verdict]:
        refusals = self._refusals(records) if self.config.drop_refusals else {}
        return [self._judge(r, refusals.get(i)) for i, r in enumerate(records)]

    def process(self, record: dict) -> Verdict:
        return self.process_batch([record])[0]

    def _refusals(self, records: list[dict]) -> dict[int, tuple[int, str]]:
        """First refusal match per record as {record index: (turn, matched text)}.

        Matching runs once per batch in polars' regex engine: Python's `re` over every assistant
        turn of a large set costs more than all the other checks together.
        """
        where, texts = [], []
        for i, r in enumerate(records):
            turns = [m for m in r["messages"] if m["role"] != "system"]
            for t, m in enumerate(turns):
                if m["role"] == "assistant" and m["content"]:
                    where.append((i, t))
                    texts.append(m["content"])
        found: dict[int, tuple[int, str]] = {}
        matches = pl.Series(texts, dtype=pl.String).str.extract(self._refusal, 1).to_list()
        for (i, t), match in zip(where, matches, strict=True):
            if match is not None and i not in found:
                found[i] = (t, match)
        return found

    def _judge(self, record: dict, refusal: tuple[int, str] | None) -> Verdict:
        cfg = self.config
        turns = [m for m in record["messages"] if m["role"] != "system"]
        roles = [m["role"] for m in turns]
        if cfg.drop_empty_turns:
            for i, m in enumerate(turns):
                if (
                    m["role"] in ("user", "assistant")
                    and not (m["content"] or "").strip()
                    and not m.get("tool_calls")
                ):
                    return Drop("empty_turn", {"turn": i, "role": m["role"]})
        if "assistant" not in roles:
            if meta_of(record).get("needs_response"):
                return None if cfg.keep_prompt_only else Drop("prompt_only", {})
            if cfg.require_assistant:
                return Drop("no_assistant_answer", {"roles": roles})
        elif cfg.require_final_assistant and roles[-1] != "assistant":
            return Drop("not_ending_on_assistant", {"last_role": roles[-1]})
        for m in turns:
            chars = len(m["content"] or "")
            if m["role"] == "assistant" and not m.get("tool_calls") and chars < cfg.min_assistant_chars:
                return Drop("assistant_too_short", {"chars": chars, "min": cfg.min_assistant_chars})
            if m["role"] == "user" and chars < cfg.min_user_chars:
                return Drop("user_too_short", {"chars": chars, "min": cfg.min_user_chars})
        text = "\n".join(m["content"] or "" for m in turns)
        if len(text) < cfg.min_chars:
            return Drop("too_short", {"chars": len(text), "min": cfg.min_chars})
        if cfg.max_chars is not None and len(text) > cfg.max_chars:
            return Drop("too_long", {"chars": len(text), "max": cfg.max_chars})
        if cfg.min_tokens or cfg.max_tokens is not None:
            tokens = self._count_tokens(text)
            if tokens < cfg.min_tokens:
                return Drop("too_few_tokens", {"tokens": tokens, "min": cfg.min_tokens})
            if cfg.max_tokens is not None and tokens > cfg.max_tokens:
                return Drop("too_many_tokens", {"tokens": tokens, "max": cfg.max_tokens})
        if refusal is not None:
            return Drop("refusal", {"turn": refusal[0], "match": refusal[1]})
        return None


def _word_count(text: str) -> int:
    return len(_WORDISH.findall(text))


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
    return lambda text: len(tok(text, add_special_tokens=False)["input_ids"])
