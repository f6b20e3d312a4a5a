"""normalize: one chat format for the whole set (system prompt, Unicode, whitespace, roles, turn merging)."""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Literal

from curate.errors import CurateError
from curate.records import ROLES, message
from curate.stages.base import Drop, RowStage, Verdict, option, register

# C0/C1 control characters except tab and newline: they break tokenizers and renderers.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_TRAILING_SPACE = re.compile(r"[ \t]+\n")
_MANY_BLANK_LINES = re.compile(r"\n{3,}")


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

        self._aliases = {k.lower(): v for k, v in self.config.role_aliases.items()}
        self._template = self.config.template
        if self._template not in TEMPLATE_NAMES:
            folder = self.context.base_dir / self._template
            self._template = str(folder) if folder.is_dir() else self._template
            render([message("user", "hi")], self._template)  # a bad tokenizer fails here, not per record

    def clean(self, text: str) -> str:
        cfg = self.config
        if cfg.unicode_form != "none":
            text = unicodedata.normalize(cfg.unicode_form, text)
        if cfg.strip_whitespace:
            text = text.replace("\r\n", "\n").replace("\r", "\n")
        if cfg.strip_control_chars:
            text = _CONTROL.sub("", text)
        if cfg.strip_whitespace:
            text = _MANY_BLANK_LINES.sub("\n\n", _TRAILING_SPACE.sub("\n", text)).strip()
        return text

    def process(self, record: dict) -> Verdict:
        cfg = self.config
        turns = []
        for m in record["messages"]:
            role = m["role"] if m["role"] in ROLES else self._aliases.get(m["role"].lower())
            if role is None:
                return Drop("unknown_role", {"role": m["role"], "hint": "map it with normalize.role_aliases"})
            turns.append(message(role, self.clean(m["content"] or ""), m.get("tool_calls"), m.get("name")))
        if cfg.merge_consecutive:
            turns = _merge_consecutive(turns)
        if cfg.system_prompt is not None and cfg.system_prompt_mode != "keep":
            has_system = bool(turns) and turns[0]["role"] == "system"
            if cfg.system_prompt_mode == "replace":
                turns = [t for t in turns if t["role"] != "system"]
                has_system = False
            if not has_system:
                turns = [message("system", self.clean(cfg.system_prompt)), *turns]
        problem = self._render_problem(turns)
        if problem:
            return Drop("unrenderable", {"template": self.config.template, "problem": problem})
        if turns == record["messages"]:
            return None
        return {**record, "messages": turns}

    def _render_problem(self, turns: list[dict]) -> str | None:
        from curate.templates import render

        # A conversation still waiting for its answer (prompt-only) renders as a generation prompt;
        # whether it may stay is the filter's decision, not the template's.
        awaiting_answer = bool(turns) and turns[-1]["role"] != "assistant"
        try:
            render(turns, self._template, add_generation_prompt=awaiting_answer)
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
