"""normalize: one chat format for the whole set (system prompt, Unicode, whitespace, roles, turn merging)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from curate.errors import CurateError
from curate.records import ROLES, message
from curate.stages.base import Drop, RowStage, Verdict, option, register
from curate.text.clean import clean_text


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
