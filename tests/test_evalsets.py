"""Eval set specs and loaders on every benchmark shape in ../shared/data/eval: exact counts, known items."""

from __future__ import annotations

import gzip
import json

import pytest

from curate.errors import CurateError, RecipeError
from curate.evalsets import EvalSetSpec, load_eval_set, load_eval_sets

# file -> (recognised shape, items, first item id, start of the first question, start of its answer or None)
EXPECTED = {
    "gsm8k_test.jsonl.gz": (
        "gsm8k",
        1319,
        "0",
        "Janet’s ducks lay 16 eggs per day.",
        "Janet sells 16 - 3 - 4",
    ),
    "gsm8k_train.jsonl.gz": (
        "gsm8k",
        7473,
        "0",
        "Natalia sold clips to 48 of her friends",
        "Natalia sold 48/2",
    ),
    "HumanEval.jsonl.gz": (
        "humaneval",
        164,
        "HumanEval/0",
        "from typing import List",
        "    for idx, elem in",
    ),
    "mt_bench_question.jsonl.gz": ("mt_bench", 80, "81", "Compose an engaging travel blog post", None),
    "vicuna_bench_question.jsonl.gz": (
        "mt_bench",
        80,
        "1",
        "How can I improve my time management skills?",
        None,
    ),
    "ifeval_input_data.jsonl.gz": (
        "ifeval",
        541,
        "1000",
        "Write a 300+ word summary of the wikipedia page",
        None,
    ),
    "alpaca_eval_text_davinci_003_outputs.json.gz": (
        "alpaca_eval",
        805,
        "0",
        "What are the names of some famous actors that started their careers on Broadway?",
        "Some famous actors that started their careers on Broadway are Tom Hanks",
    ),
    "alpaca_eval_gpt4_1106_preview_outputs.json.gz": (
        "alpaca_eval",
        805,
        "0",
        "What are the names of",
        "Several",
    ),
    "arena_hard_v0.1_question.jsonl.gz": (
        "arena_hard",
        500,
        "328c149ed45a41c0b9d6f14659e63599",
        "Use ABC notation to write a melody in the style of a folk tune.",
        None,
    ),
    "TruthfulQA.csv.gz": (
        "truthfulqa",
        817,
        "0",
        "What happens to you if you eat watermelon seeds?",
        "The watermelon seeds pass through your digestive system",
    ),
    "mmlu_abstract_algebra_test.csv.gz": (
        "mmlu",
        100,
        "0",
        "Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q.",
        "4",
    ),
    "mmlu_high_school_us_history_test.csv.gz": (
        "mmlu",
        204,
        "0",
        "This question refers to the following information.",
        "Great Britain ceded it to the United States",
    ),
    "mmlu_sociology_test.csv.gz": (
        "mmlu",
        201,
        "0",
        "Mass-society theory suggests that:",
        "the media manipulate 'the masses' as vulnerable, passive consumers",
    ),
    "foundry_arc_challenge.jsonl.gz": (
        "arc",
        1172,
        "0",
        "An astronomer observes that a planet rotates faster after a meteorite impact.",
        "Planetary days will become shorter.",
    ),
}


def _spec(name: str, path: str, **extra) -> EvalSetSpec:
    return EvalSetSpec.from_recipe({"name": name, "path": path, **extra}, "eval_sets[0]")


@pytest.mark.parametrize("filename", sorted(EXPECTED))
def test_every_shape_loads_with_ids_questions_answers(shared_data, filename):
    shape, count, first_id, question, answer = EXPECTED[filename]
    loaded = load_eval_set(_spec("x", f"eval/{filename}"), shared_data)
    assert loaded.shape == shape
    assert len(loaded) == count
    first = loaded.items[0]
    assert first.id == first_id
    assert first.question.startswith(question)
    if answer is None:
        assert first.answer is None
    else:
        assert first.answer.startswith(answer)
    assert len({item.id for item in loaded.items}) == count  # ids are unique within a set


def test_turns_are_joined_and_arc_label_is_stripped(shared_data):
    mt = load_eval_set(_spec("mt", "eval/mt_bench_question.jsonl.gz"), shared_data)
    assert mt.items[0].question == (
        "Compose an engaging travel blog post about a recent trip to Hawaii, highlighting cultural "
        "experiences and must-see attractions.\n"
        "Rewrite your previous response. Start every sentence with the letter A."
    )
    arc = load_eval_set(_spec("arc", "eval/foundry_arc_challenge.jsonl.gz"), shared_data)
    assert not any(item.question.startswith("Question:") for item in arc.items)


def test_mmlu_answer_letter_becomes_the_option_text(shared_data):
    algebra = load_eval_set(_spec("mmlu", "eval/mmlu_abstract_algebra_test.csv.gz"), shared_data)
    # row 1: "Let p = (1, 2, 5, 4)(2, 3) in S_5 . Find the index of <p> in S_5.",8,2,24,120,C
    assert algebra.items[1].question == "Let p = (1, 2, 5, 4)(2, 3) in S_5 . Find the index of <p> in S_5."
    assert algebra.items[1].answer == "24"


def test_field_mapping_overrides_detection(shared_data):
    spec = _spec("humaneval", "eval/HumanEval.jsonl.gz", fields={"question": "entry_point", "id": "task_id"})
    loaded = load_eval_set(spec, shared_data)
    assert loaded.shape == "fields"
    assert (loaded.items[0].id, loaded.items[0].question, loaded.items[0].answer) == (
        "HumanEval/0",
        "has_close_elements",
        None,
    )
    truthful = load_eval_set(
        _spec("tqa", "eval/TruthfulQA.csv.gz", fields={"question": "Question", "answer": "Correct Answers"}),
        shared_data,
    )
    assert truthful.items[0].answer.startswith("Nothing happens; You eat watermelon seeds")


def test_missing_mapped_field_names_the_keys(shared_data):
    with pytest.raises(CurateError, match="field 'problem' is not in") as err:
        load_eval_set(_spec("g", "eval/gsm8k_test.jsonl.gz", fields={"question": "problem"}), shared_data)
    assert "question, answer" in err.value.hint


def test_plain_files_and_unknown_shapes(tmp_path):
    (tmp_path / "qa.jsonl").write_text(
        json.dumps({"q": "What is 2+2?", "a": "4"}) + "\n" + json.dumps({"q": "  ", "a": "none"}) + "\n"
    )
    loaded = load_eval_set(_spec("qa", "qa.jsonl", fields={"question": "q", "answer": "a"}), tmp_path)
    assert [(i.id, i.question, i.answer) for i in loaded.items] == [
        ("0", "What is 2+2?", "4")
    ]  # blank left out
    with gzip.open(tmp_path / "odd.jsonl.gz", "wt") as fh:
        fh.write(json.dumps({"x": 1}) + "\n")
    with pytest.raises(CurateError, match="no known benchmark shape") as err:
        load_eval_set(_spec("odd", "odd.jsonl.gz"), tmp_path)
    assert "fields:" in err.value.hint
    with pytest.raises(CurateError, match="does not exist"):
        load_eval_set(_spec("gone", "gone.jsonl"), tmp_path)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"path": "a.jsonl"}, r"eval_sets\[3\]\.name: required"),
        ({"name": "a", "path": "a.jsonl", "format": "xml"}, r"eval_sets\[3\]\.format: unknown format"),
        (
            {"name": "a", "path": "a.jsonl", "fields": {"prompt": "q"}},
            r"eval_sets\[3\]\.fields: unknown role",
        ),
        ({"name": "a", "path": "a.jsonl", "fields": {"answer": "a"}}, r"'question' is required"),
        ({"name": "a", "path": "a.jsonl", "colour": 1}, r"eval_sets\[3\]: unknown key 'colour'"),
        ("gsm8k.jsonl", r"eval_sets\[3\]: expected object, got 'gsm8k.jsonl'"),
    ],
)
def test_recipe_errors_name_the_entry(entry, message):
    with pytest.raises(RecipeError, match=message):
        EvalSetSpec.from_recipe(entry, "eval_sets[3]")


def test_hf_source_and_recipe_list(shared_data):
    spec = EvalSetSpec.from_recipe({"name": "g", "path": "hf:openai/gsm8k", "config": "main"}, "eval_sets[0]")
    assert (spec.format, spec.split, spec.config) == ("hf", "test", "main")
    sets = load_eval_sets(
        [
            {"name": "v", "path": "eval/vicuna_bench_question.jsonl.gz"},
            {"name": "h", "path": "eval/HumanEval.jsonl.gz"},
        ],
        shared_data,
    )
    assert [(s.name, len(s)) for s in sets] == [("v", 80), ("h", 164)]
