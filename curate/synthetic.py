"""What every generating stage shares: its prompt templates, the checks that throw out a bad
generation, synthetic records with their lineage, and the spend estimate checked against a budget
before the first paid request.
"""

from __future__ import annotations

import re
from pathlib import Path

import pyarrow as pa

from curate.errors import CurateError
from curate.llm.config import LLMConfig
from curate.llm.engine import Answer
from curate.records import RECORD_SCHEMA, make_record, message
from curate.text.refusals import declines

PROMPTS = Path(__file__).parent / "llm" / "prompts"

# Words a real instruction may consist of only if it says nothing (English function words).
STOP_WORDS = frozenset(
    """a about above after again against all am an and any are as at be because been before being below
    between both but by can could did do does doing down during each few for from further had has have
    having he her here hers herself him himself his how i if in into is it its itself just let me more
    most my myself no nor not now of off on once only or other our ours ourselves out over own please
    same she should so some such than that the their theirs them themselves then there these they this
    those through to too under until up very was we were what when where which while who whom why will
    with would you your yours yourself yourselves""".split()
)
_WORD = re.compile(r"\w+", re.UNICODE)
# What an evolution that copied its prompt contains: the templates' markers and the phrases models
# echo back from them.
TEMPLATE_WORDS = (
    "<<<",
    ">>>",
    "given instruction",
    "rewritten instruction",
    "new instruction",
    "given prompt",
    "rewritten prompt",
    "rewrite the instruction",
    "between the markers",
    "reply with the new instruction",
)


def template(name: str, folder: str, base_dir: Path) -> str:
    """Prompt template `name`.txt from the user's folder when it has one, else curate's own."""
    if folder:
        own = Path(folder).expanduser()
        own = own if own.is_absolute() else base_dir / own
        if (own / f"{name}.txt").is_file():
            return (own / f"{name}.txt").read_text(encoding="utf-8")
    return (PROMPTS / f"{name}.txt").read_text(encoding="utf-8")


def fill(text: str, **values: str) -> str:
    """A template with {name} fields filled (text braces elsewhere are left alone)."""
    for key, value in values.items():
        text = text.replace("{" + key + "}", value)
    return text


def copied_template(instruction: str) -> str | None:
    """The first template marker or phrase an evolved instruction repeats, if any."""
    low = instruction.lower()
    return next((w for w in TEMPLATE_WORDS if w in low), None)


def says_nothing(instruction: str) -> bool:
    """Only punctuation and stop words (or nothing at all)."""
    return all(w.lower() in STOP_WORDS for w in _WORD.findall(instruction))


def answer_problem(answer: Answer, min_words: int, drop_cut_off: bool) -> tuple[str, dict] | None:
    """Why a generated answer is not worth training on: an apology (a decline in under 80 words, as
    WizardLM eliminates them), fewer than `min_words` words, or cut off at max_tokens."""
    words = len(answer.text.split())
    if declines(answer.text) and words < 80:
        return "refused_answer", {"answer": answer.text[:300], "words": words}
    if words < min_words:
        return "short_answer", {"answer": answer.text[:300], "words": words, "min_words": min_words}
    if drop_cut_off and answer.finish == "length":
        return "answer_cut_off", {"output_tokens": answer.output_tokens}
    return None


def synthetic_record(
    messages: list[tuple[str, str]], parent: dict, op: str, meta: dict, config: LLMConfig
) -> dict:
    """A generated record: origin synthetic, its parent's id, where it came from (the parent's
    source, format `op`), and op, provider and model in meta."""
    source = dict(parent["source"] or {})
    source["format"] = op
    return make_record(
        [message(role, content) for role, content in messages],
        source,
        origin="synthetic",
        parent_id=parent["id"],
        meta={op: {**meta, "provider": config.provider, "model": config.model}},
    )


def records_table(records: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(records, schema=RECORD_SCHEMA)


def estimate(config: LLMConfig, prompt_sizes: list[int], max_out: list[int]) -> dict:
    """Upper bound of what requests cost, from each one's prompt tokens (`prompt_tokens`: about four
    characters each) and every answer at its max_tokens; cost from the stage's prices (None without)."""
    input_tokens = sum(prompt_sizes)
    output_tokens = sum(max_out)
    cost = config.prices.cost(input_tokens, output_tokens) if config.prices is not None else None
    return {
        "requests": len(prompt_sizes),
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "cost": None if cost is None else round(cost, 6),
    }


def add_estimates(parts: list[dict]) -> dict:
    total = {"requests": 0, "input_tokens": 0, "output_tokens": 0, "cost": None}
    for part in parts:
        for key in ("requests", "input_tokens", "output_tokens"):
            total[key] += part[key]
        if part["cost"] is not None:
            total["cost"] = round((total["cost"] or 0) + part["cost"], 6)
    return total


def check_budget(stage: str, config: LLMConfig, expected: dict) -> list[str]:
    """The budget limits the expected spend passes (empty: it fits, or there is no budget)."""
    budget = config.budget
    if budget is None:
        return []
    over = []
    if budget.requests is not None and expected["requests"] > budget.requests:
        over.append(f"{expected['requests']:,} requests > budget {budget.requests:,}")
    tokens = expected["input_tokens"] + expected["output_tokens"]
    if budget.tokens is not None and tokens > budget.tokens:
        over.append(f"{tokens:,} tokens > budget {budget.tokens:,}")
    if budget.cost is not None and (expected["cost"] or 0) > budget.cost:
        over.append(f"cost {expected['cost']:.4f} > budget {budget.cost:g}")
    return over


def refuse_over_budget(stage: str, config: LLMConfig, expected: dict) -> None:
    """Stop before the first paid request when the estimate passes the budget, unless allowed."""
    over = check_budget(stage, config, expected)
    if over and not config.budget.allow_partial:
        raise CurateError(
            f"{stage}: the estimate passes the budget ({'; '.join(over)}); nothing was sent",
            hint="raise the budget, shrink the stage (fewer seeds, rounds or max_tokens), or set "
            "budget.allow_partial: true to keep what the budget buys (`curate estimate` shows the figures)",
        )
