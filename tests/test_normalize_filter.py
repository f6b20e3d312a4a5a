"""normalize and filter stages: each option changes exactly what it says, with the right drop reasons."""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa
import pytest

from curate.errors import RecipeError
from curate.records import make_record, message, record_id, to_table
from curate.stages import STAGES, Drop, StageContext
from curate.stages.base import build_config
from tests.reference import describe_change, reference_filter, reference_normalize

SOURCE = {"name": "t", "path": "t.jsonl", "row": 1, "format": "messages"}


def stage(name: str, **options):
    cls = STAGES[name]
    s = cls(build_config(cls.Config, options, name), StageContext(base_dir=Path(".")))
    s.setup()
    return s


def judge(s, record: dict) -> Drop | dict | None:
    """One record through a stage: its Drop, the record as rewritten, or None when it stays as is."""
    applied = s.apply(to_table([record]))
    if applied.drop_rows.size:
        return applied.verdicts()[0]
    kept = applied.kept.to_pylist()[0]
    return kept if applied.edits.num_rows else None


def rec(*turns, meta=None) -> dict:
    return make_record([message(r, c) for r, c in turns], SOURCE, meta=meta)


def test_normalize_cleans_text_and_keeps_the_id():
    r = rec(("user", "Cafe\u0301\r\n\r\n\r\n\r\nline  \x07two  "), ("assistant", "  ok \x00"))
    out = judge(stage("normalize"), r)
    assert [m["content"] for m in out["messages"]] == ["Caf\u00e9\n\nline  two", "ok"]
    # whitespace and Unicode cleanup must not change the content id
    assert out["id"] == r["id"] == record_id(out["messages"])


def test_normalize_leaves_clean_records_untouched():
    assert judge(stage("normalize"), rec(("user", "hi"), ("assistant", "hello"))) is None


def test_system_prompt_modes():
    with_sys = rec(("system", "Be terse."), ("user", "hi"), ("assistant", "yo"))
    without = rec(("user", "hi"), ("assistant", "yo"))
    add = stage("normalize", system_prompt="You are helpful.")
    assert judge(add, with_sys) is None
    assert judge(add, without)["messages"][0] == message("system", "You are helpful.")
    replace = stage("normalize", system_prompt="You are helpful.", system_prompt_mode="replace")
    assert [m["content"] for m in judge(replace, with_sys)["messages"]] == ["You are helpful.", "hi", "yo"]
    keep = stage("normalize", system_prompt="You are helpful.", system_prompt_mode="keep")
    assert judge(keep, without) is None


def test_merge_consecutive_turns_and_role_aliases():
    r = make_record(
        [message("user", "a"), message("user", "b"), message("Bot", "c"), message("assistant", "d")], SOURCE
    )
    out = judge(stage("normalize", role_aliases={"bot": "assistant"}), r)
    assert [(m["role"], m["content"]) for m in out["messages"]] == [
        ("user", "a\n\nb"),
        ("assistant", "c\n\nd"),
    ]
    unknown = judge(stage("normalize"), r)
    assert isinstance(unknown, Drop) and unknown.reason == "unknown_role"


def test_tool_turns_are_not_merged():
    calls = [{"type": "function", "function": {"name": "f", "arguments": "{}"}}]
    r = make_record(
        [
            message("user", "q"),
            message("assistant", "", calls),
            message("tool", "1"),
            message("tool", "2"),
            message("assistant", "done"),
        ],
        SOURCE,
    )
    assert judge(stage("normalize"), r) is None


def test_bad_options_point_at_the_key():
    with pytest.raises(RecipeError, match="normalize: unknown option 'system_promt'") as exc:
        build_config(STAGES["normalize"].Config, {"system_promt": "x"}, "normalize")
    assert "system_prompt" in exc.value.hint
    with pytest.raises(
        RecipeError, match="normalize.unicode_form: 'NFD' is not one of NFC, NFKC, none"
    ) as exc:
        build_config(STAGES["normalize"].Config, {"unicode_form": "NFD"}, "normalize")
    assert exc.value.hint == "did you mean 'NFC'?"
    with pytest.raises(RecipeError, match="role_aliases must map"):
        build_config(STAGES["normalize"].Config, {"role_aliases": {"bot": "robot"}}, "normalize")


@pytest.mark.parametrize(
    ("turns", "options", "reason"),
    [
        ((("user", "q"), ("assistant", "   ")), {}, "empty_turn"),
        ((("user", "q"),), {}, "no_assistant_answer"),
        ((("user", "q"), ("assistant", "a"), ("user", "more?")), {}, "not_ending_on_assistant"),
        ((("user", "q"), ("assistant", "ab")), {"min_assistant_chars": 3}, "assistant_too_short"),
        ((("user", "q"), ("assistant", "a" * 50)), {"max_chars": 20}, "too_long"),
        ((("user", "q"), ("assistant", "ok")), {"min_chars": 10}, "too_short"),
        ((("user", "q"), ("assistant", "one two three four")), {"max_tokens": 3}, "too_many_tokens"),
        ((("user", "q"), ("assistant", "As an AI language model, I can't.")), {}, "refusal"),
        ((("user", "q"), ("assistant", "I'm sorry, but I cannot help.")), {}, "refusal"),
    ],
)
def test_filter_drops_with_reason(turns, options, reason):
    verdict = judge(stage("filter", **options), rec(*turns))
    assert isinstance(verdict, Drop) and verdict.reason == reason


def test_filter_keeps_good_records_and_reports_evidence():
    f = stage("filter")
    assert judge(f, rec(("system", "s"), ("user", "What is 2+2?"), ("assistant", "4"))) is None
    refusal = judge(f, rec(("user", "q"), ("assistant", "Sure. As an AI model I have no body.")))
    assert refusal.evidence == {"turn": 1, "match": "As an AI model"}
    assert (
        judge(stage("filter", drop_refusals=False), rec(("user", "q"), ("assistant", "As an AI model")))
        is None
    )
    custom = stage("filter", refusal_patterns=[r"\bnope\b"])
    assert judge(custom, rec(("user", "q"), ("assistant", "As an AI model"))) is None
    assert judge(custom, rec(("user", "q"), ("assistant", "Nope."))).reason == "refusal"


def test_prompt_only_records_are_dropped_or_kept_for_generation():
    prompt_only = rec(("user", "Write a haiku about rain."), meta={"needs_response": True})
    assert judge(stage("filter"), prompt_only).reason == "prompt_only"
    assert judge(stage("filter", keep_prompt_only=True), prompt_only) is None


def test_filter_rejects_bad_patterns_and_bounds():
    with pytest.raises(RecipeError, match="not a valid regular expression"):
        build_config(STAGES["filter"].Config, {"refusal_patterns": ["("]}, "filter")
    with pytest.raises(RecipeError, match="max_chars is below min_chars"):
        build_config(STAGES["filter"].Config, {"min_chars": 10, "max_chars": 5}, "filter")
    with pytest.raises(RecipeError, match=r"filter.min_chars: expected integer, got 'ten'"):
        build_config(STAGES["filter"].Config, {"min_chars": "ten"}, "filter")


def test_prompt_only_records_pass_normalize_for_the_filter_to_decide():
    prompt_only = rec(("user", "Write a haiku about rain."), meta={"needs_response": True})
    assert judge(stage("normalize"), prompt_only) is None
    nothing = make_record([message("system", "s")], SOURCE)
    assert judge(stage("normalize", system_prompt_mode="keep"), nothing) is None


def test_token_bounds_count_with_a_real_tokenizer(tmp_path):
    """max_tokens with `tokenizer:` counts that tokenizer's tokens (stories260K's 512-piece vocabulary)."""
    from transformers import AutoTokenizer

    from curate.train.llama2c import convert
    from tests.conftest import SHARED_MODELS

    folder = convert(SHARED_MODELS / "stories260K.bin", SHARED_MODELS / "tok512.bin", tmp_path / "stories")
    tok = AutoTokenizer.from_pretrained(str(folder))
    r = rec(("user", "Once upon a time"), ("assistant", "there was a little girl named Lily."))
    text = "Once upon a time\nthere was a little girl named Lily."
    n = len(tok(text, add_special_tokens=False)["input_ids"])
    words = len(text.split()) + 1  # the tokenizer-free estimate: words and the full stop
    assert n != words  # so the test tells the two counts apart
    assert judge(stage("filter", tokenizer=str(folder), max_tokens=n), r) is None
    too_many = judge(stage("filter", tokenizer=str(folder), max_tokens=n - 1), r)
    assert too_many.reason == "too_many_tokens" and too_many.evidence == {"tokens": n, "max": n - 1}


NORMALIZE_CONFIGS = [
    {},
    {"system_prompt": "You are helpful.  "},
    {"system_prompt": "Be brief.", "system_prompt_mode": "replace"},
    {"system_prompt": "S", "system_prompt_mode": "keep", "merge_consecutive": False},
    {"unicode_form": "NFKC", "role_aliases": {"human": "user", "narrator": "system"}},
    {"unicode_form": "none", "strip_whitespace": False, "strip_control_chars": False},
]


def _random_records(n: int, seed: int) -> list[dict]:
    """Records built to hit every branch: aliases, unknown roles, runs to merge, tool calls, nulls."""
    rng = random.Random(seed)
    roles = ["user", "assistant", "system", "tool", "human", "narrator", "wizard"]
    texts = ["", " ", "hi", "ok \n", "Cafe\u0301", "a\r\nb", "x\x07", "\u00a0y", None]
    records = []
    for i in range(n):
        turns = []
        for _ in range(rng.randint(0, 5)):
            role = rng.choice(roles)
            calls = (
                '[{"name": "f"}]' if role == "assistant" and rng.random() < 0.2 else rng.choice([None, ""])
            )
            turns.append(
                {
                    "role": role,
                    "content": rng.choice(texts),
                    "tool_calls": calls,
                    "name": rng.choice([None, "t"]),
                }
            )
        source = {"name": "t", "path": "t.jsonl", "row": i, "format": "messages"}
        records.append({**make_record(turns, source), "meta": None})
    return records


def _compare(s, table: pa.Table, reference) -> set[str]:
    """The stage on a table against the plain-Python reference, record by record: the same drops
    (reason and evidence), the same kept records, the same edits. Returns the drop reasons seen."""
    applied = s.apply(table)
    rows = table.to_pylist()
    expected = [reference(s.config, r) for r in rows]
    assert applied.verdicts() == [v if isinstance(v, Drop) else None for v in expected]
    kept = [
        v if isinstance(v, dict) else r
        for r, v in zip(rows, expected, strict=True)
        if not isinstance(v, Drop)
    ]
    assert applied.kept.to_pylist() == kept
    edits = [
        (r["id"], r["source"]["row"], change)
        for r, v in zip(rows, expected, strict=True)
        if isinstance(v, dict) and (change := describe_change(r, v))
    ]
    got = applied.edits.select(["id", "row", "change"]).to_pylist()
    assert [(e["id"], e["row"], e["change"]) for e in got] == edits
    return {v.reason for v in expected if isinstance(v, Drop)}


@pytest.mark.parametrize("options", NORMALIZE_CONFIGS)
def test_normalize_equals_the_reference(options):
    """The column-wise stage gives exactly the drops, records and edits of the plain-Python rules."""
    table = to_table(_random_records(3000, seed=len(str(options))))
    reasons = _compare(stage("normalize", **options), table, reference_normalize)
    assert "unknown_role" in reasons


@pytest.mark.parametrize("options", NORMALIZE_CONFIGS[:3])
def test_normalize_equals_the_reference_on_raw(raw_table, options):
    s = stage("normalize", **options)
    for offset in range(0, raw_table.num_rows, 20_000):
        _compare(s, raw_table.slice(offset, 20_000), reference_normalize)


FILTER_CONFIGS = [
    {},
    {"keep_prompt_only": True, "min_chars": 12, "max_chars": 60},
    {"require_assistant": False, "require_final_assistant": False, "drop_empty_turns": False},
    {"min_assistant_chars": 3, "min_user_chars": 2, "refusal_patterns": [r"\bok\b", "caf"]},
]


@pytest.mark.parametrize("options", FILTER_CONFIGS)
def test_filter_equals_the_reference(options):
    records = _random_records(3000, seed=7 + len(options))
    for r in records[::5]:
        r["meta"] = '{"needs_response": true}'
    reasons = _compare(stage("filter", **options), to_table(records), reference_filter)
    assert len(reasons) >= 3


def test_filter_equals_the_reference_on_raw(raw_table):
    s = stage("filter", keep_prompt_only=True, min_chars=20, max_tokens=3000)
    for offset in range(0, raw_table.num_rows, 20_000):
        _compare(s, raw_table.slice(offset, 20_000), reference_filter)
