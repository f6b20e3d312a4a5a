"""Every shape in ../shared/data/raw converted by curate.formats: exact counts and known records."""

from __future__ import annotations

import csv
import gzip
import json
import random
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest

from curate.formats import InputSpec, format_names, inspect_input, read_input
from curate.records import MESSAGES_TYPE, message, meta_of, record_id, record_ids, train_messages
from curate.text.clean import clean_text


@pytest.fixture(scope="module")
def raw(raw_batches: list) -> dict[str, dict]:
    """All of raw/ (read once per session): per file path, its format, records and quarantine entries."""
    out: dict[str, dict] = {}
    for batch in raw_batches:
        for entry in batch.files:
            out.setdefault(entry["path"], {"format": entry["format"], "records": [], "quarantined": []})
        for record in batch.records:
            out[record["source"]["path"]]["records"].append(record)
        for entry in batch.quarantined:
            out[entry["file"]]["quarantined"].append(entry)
    return out


def manifest(shared_data: Path) -> dict[str, int]:
    with open(shared_data / "MANIFEST.tsv", newline="") as f:
        rows = csv.DictReader(f, delimiter="\t")
        return {r["local_path"]: int(r["records"]) for r in rows if r["local_path"].startswith("raw/")}


def turns(record: dict) -> list[tuple[str, str]]:
    return [(m["role"], m["content"]) for m in record["messages"]]


def row(raw: dict, path: str, number: int) -> dict:
    (found,) = [r for r in raw[path]["records"] if r["source"]["row"] == number]
    return found


def source_rows(shared_data: Path, name: str) -> list[dict]:
    with gzip.open(shared_data / "raw" / name, "rt", encoding="utf-8") as f:
        return json.load(f)


def test_every_raw_file_has_its_manifest_count(raw, shared_data):
    expected = manifest(shared_data)
    got: dict[str, int] = {}
    for path, item in raw.items():
        key = "raw/t0_train_50k/*.jsonl.gz" if path.startswith("raw/t0_train_50k/") else path
        got[key] = got.get(key, 0) + len(item["records"]) + len(item["quarantined"])
    assert got == expected
    assert sum(len(i["records"]) for i in raw.values()) == 85_669
    assert sum(1 for p in raw if p.startswith("raw/t0_train_50k/")) == 294


def test_formats_detected_per_file(raw):
    formats = {p: i["format"] for p, i in raw.items() if not p.startswith("raw/t0_train_50k/")}
    assert formats == {
        "raw/alpaca_seed_tasks.jsonl.gz": "self_instruct",
        "raw/code_alpaca_2k.json.gz": "alpaca",
        "raw/fastchat_dummy_conversation_sharegpt.json.gz": "sharegpt",
        "raw/foundry_dolly_hhrlhf_train_small.jsonl.gz": "prompt_response",
        "raw/foundry_finetune_example_train.jsonl.gz": "multiple_choice",
        "raw/gpteacher_codegen.json.gz": "alpaca",
        "raw/gpteacher_roleplay.json.gz": "alpaca",
        "raw/gpteacher_toolformer.json.gz": "alpaca",
        "raw/hh_rlhf_harmless_base_test.jsonl.gz": "hh",
        "raw/instructionwild_seed_prompts_en.jsonl.gz": "instructions",
        "raw/instructionwild_v2_user_1.jsonl.gz": "instructions",
        "raw/instructionwild_v2_user_2.jsonl.gz": "instructions",
        "raw/instructionwild_v2_user_3.jsonl.gz": "instructions",
        "raw/llamafactory_alpaca_en_demo.json.gz": "alpaca",
        "raw/llamafactory_alpaca_zh_demo.json.gz": "alpaca",
        "raw/llamafactory_dpo_en_demo.json.gz": "preference",
        "raw/llamafactory_glaive_toolcall_en_demo.json.gz": "sharegpt",
        "raw/llamafactory_identity.json.gz": "alpaca",
        "raw/llamafactory_kto_en_demo.json.gz": "kto",
        "raw/llamafactory_v1_sft_demo.jsonl.gz": "openai",
        "raw/new_codealpaca.json.gz": "alpaca",
        "raw/oasst_en_100_message.jsonl.gz": "oasst",
        "raw/oasst_en_100_tree.jsonl.gz": "oasst",
        "raw/selfinstruct_text-davinci-003_predictions.jsonl.gz": "alpaca",
        "raw/selfinstruct_user_oriented_instructions.jsonl.gz": "self_instruct",
        "raw/wizardlm_testset.jsonl.gz": "instructions",
    }
    t0 = Counter(i["format"] for p, i in raw.items() if p.startswith("raw/t0_train_50k/"))
    assert t0 == {"prompt_completion": 283, "empty": 11}  # 11 template files hold no rows
    # one format per file: no file needed per-record detection
    for item in raw.values():
        assert {r["source"]["format"] for r in item["records"]} <= {item["format"]}


def test_only_the_five_invalid_lines_are_quarantined(raw):
    got = [(q["file"], q["line"]) for i in raw.values() for q in i["quarantined"]]
    assert got == [
        ("raw/instructionwild_v2_user_2.jsonl.gz", 134),
        ("raw/instructionwild_v2_user_2.jsonl.gz", 168),
        ("raw/instructionwild_v2_user_3.jsonl.gz", 10),
        ("raw/instructionwild_v2_user_3.jsonl.gz", 121),
        ("raw/instructionwild_v2_user_3.jsonl.gz", 122),
    ]
    first = raw["raw/instructionwild_v2_user_2.jsonl.gz"]["quarantined"][0]
    assert first["error"].startswith("invalid JSON: Invalid \\escape")
    assert first["raw"].startswith('{"instruction": "Continue this guitar tab pattern:')
    last = raw["raw/instructionwild_v2_user_3.jsonl.gz"]["quarantined"][2]
    assert last["raw"].startswith("Ask me the questions and wait for my answers.")
    # the rows around a bad line keep their own line numbers
    rows = [r["source"]["row"] for r in raw["raw/instructionwild_v2_user_3.jsonl.gz"]["records"]]
    assert rows[118:121] == [120, 123, 124]


def test_source_is_relative_and_ids_are_content_ids(raw):
    r = raw["raw/code_alpaca_2k.json.gz"]["records"][0]
    assert r["source"] == {
        "name": "code_alpaca_2k",
        "path": "raw/code_alpaca_2k.json.gz",
        "row": 0,
        "format": "alpaca",
    }
    assert r["id"] == record_id(r["messages"]) and r["origin"] == "real"
    t0 = raw["raw/t0_train_50k/adversarial_qa_dbert_based_on.jsonl.gz"]["records"][0]["source"]
    assert t0["name"] == "adversarial_qa_dbert_based_on" and t0["row"] == 1


def test_column_ids_equal_the_row_by_row_reference_on_all_of_raw(raw):
    """RecordColumns computes ids for whole columns; record_id (one dict at a time) is the reference."""
    records = [r for item in raw.values() for r in item["records"]]
    assert len(records) == 85_669
    assert [r["id"] for r in records] == [record_id(r["messages"]) for r in records]
    # a conversation whose text only differs in what normalize cleans has the same id
    tidy = [{"role": "user", "content": "Caf\u00e9 au lait?", "tool_calls": None, "name": None}]
    messy = [{"role": "user", "content": "  Cafe\u0301 au lait?\r\n", "tool_calls": None, "name": None}]
    assert record_id(tidy) == record_id(messy) != record_id([{**tidy[0], "role": "assistant"}])


def test_column_ids_equal_the_reference_on_fuzzed_conversations():
    """Text that needs every kind of cleanup, nulls, tool calls, names and empty conversations."""
    rng = random.Random(3)
    alphabet = "ab \t\n\r\x07\x85e\u0301\u00e9\u3000\ufb01\u1100\u1161\U0001f600\U00020000"
    conversations = []
    for _ in range(3000):
        turns = []
        for _ in range(rng.randint(0, 4)):
            text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
            turns.append(
                message(
                    rng.choice(["user", "assistant", "system", "tool"]),
                    None if rng.random() < 0.05 else text,
                    tool_calls=[{"type": "function", "function": {"name": "f"}}]
                    if rng.random() < 0.1
                    else None,
                    name=rng.choice([None, "search", "t\u00e9"]),
                )
            )
        conversations.append(turns)
    ids = record_ids(pa.array(conversations, MESSAGES_TYPE)).to_pylist()
    assert ids == [record_id(c) for c in conversations]
    # as many ids as conversations that differ once cleaned (the empty ones and the like coincide)
    cleaned = {
        tuple((m["role"], clean_text(m["content"] or ""), m["tool_calls"], m["name"]) for m in c)
        for c in conversations
    }
    assert len(set(ids)) == len(cleaned) > 2000


def test_alpaca_with_input_and_output(raw):
    r = raw["raw/code_alpaca_2k.json.gz"]["records"][0]
    assert turns(r) == [
        ("user", "What are the distinct values from the given list?\n\ndataList = [3, 9, 3, 5, 7, 9, 5]"),
        ("assistant", "The distinct values from the given list are 3, 5, 7 and 9."),
    ]
    assert r["meta"] is None and r["rejected"] is None and r["tools"] is None


def test_alpaca_with_response_key_and_duplicate_output(raw):
    codegen = raw["raw/gpteacher_codegen.json.gz"]["records"][0]
    assert turns(codegen)[0] == (
        "user",
        "Write a C++ program that calculates the area of a rectangle, given its width and height.\n\n"
        "width: 5, height: 8",
    )
    assert turns(codegen)[1][1].startswith("#include <iostream>\nusing namespace std;")
    # new_codealpaca repeats the answer under output and response: one answer, no meta
    same = raw["raw/new_codealpaca.json.gz"]["records"][0]
    assert same["messages"] == codegen["messages"] and same["meta"] is None
    assert same["id"] == codegen["id"]


def test_alpaca_keeps_text_as_read_and_extra_fields_in_meta(raw):
    r = raw["raw/selfinstruct_text-davinci-003_predictions.jsonl.gz"]["records"][0]
    assert turns(r)[1] == (
        "assistant",
        " Have questions about my rate? Need to adjust the scope of this project? Let me know.",
    )
    assert turns(r)[0][1].endswith(
        "\n\nIf you have any questions about my rate or if you find it necessary to "
        "increase or decrease the scope for this project, please let me know."
    )
    meta = meta_of(r)
    assert sorted(meta) == ["prompt", "target"]
    assert meta["target"].startswith("If you have any questions about my rate or find it necessary")
    odd = [r for r in raw["raw/gpteacher_toolformer.json.gz"]["records"] if r["meta"]]
    assert len(odd) == 1 and list(meta_of(odd[0])) == ["example_input"]


def test_sharegpt_conversation(raw):
    r = raw["raw/fastchat_dummy_conversation_sharegpt.json.gz"]["records"][0]
    assert turns(r) == [
        ("user", "Who are you?"),
        (
            "assistant",
            "I am Vicuna, a language model trained by researchers from Large Model Systems "
            "Organization (LMSYS).",
        ),
        ("user", "Have a nice day!"),
        ("assistant", "You too!"),
    ]
    assert meta_of(r) == {"id": "identity_0"}


def test_glaive_tools_and_tool_calls(raw, shared_data):
    r = raw["raw/llamafactory_glaive_toolcall_en_demo.json.gz"]["records"][0]
    src = source_rows(shared_data, "llamafactory_glaive_toolcall_en_demo.json.gz")[0]
    assert r["tools"] == src["tools"] and json.loads(r["tools"])[0]["name"] == "search_recipes"
    roles = [m["role"] for m in r["messages"]]
    assert roles == ["user", "assistant", "user", "assistant", "tool", "assistant", "user", "assistant"]
    call = r["messages"][3]
    assert call["content"] == ""
    assert json.loads(call["tool_calls"]) == [
        {
            "type": "function",
            "function": {
                "name": "search_recipes",
                "arguments": {"ingredients": ["chicken", "bell peppers", "rice"]},
            },
        }
    ]
    result = r["messages"][4]
    assert result["name"] == "search_recipes" and result["content"] == src["conversations"][4]["value"]
    assert train_messages(r["messages"])[3]["tool_calls"][0]["function"]["name"] == "search_recipes"
    records = raw["raw/llamafactory_glaive_toolcall_en_demo.json.gz"]["records"]
    assert sum(1 for r in records for m in r["messages"] if m["tool_calls"]) == 211
    assert sum(1 for r in records for m in r["messages"] if m["role"] == "tool") == 211
    assert sum(1 for r in records if r["tools"] is None) == 109  # "tools": "[]" means none


def test_dpo_pairs_keep_rejected_after_the_shared_prompt(raw, shared_data):
    records = raw["raw/llamafactory_dpo_en_demo.json.gz"]["records"]
    src = source_rows(shared_data, "llamafactory_dpo_en_demo.json.gz")
    r = records[1]
    assert [m["role"] for m in r["messages"]] == ["system", "user", "assistant"]
    assert r["messages"][0]["content"].startswith("You are a teacher.")
    assert r["messages"][-1]["content"] == src[1]["chosen"]["value"]
    assert turns({"messages": r["rejected"]}) == [("assistant", src[1]["rejected"]["value"])]
    assert all(len(r["rejected"]) == 1 and r["rejected"][0]["role"] == "assistant" for r in records)


def test_kto_label(raw):
    records = raw["raw/llamafactory_kto_en_demo.json.gz"]["records"]
    assert [r["label"] for r in records].count(True) == 150
    assert [r["label"] for r in records].count(False) == 150
    r = records[1]
    assert r["label"] is True and r["rejected"] is None
    assert turns(r)[0][1].startswith("Compare and contrast the roles of the hippocampus and the prefrontal")


def test_openai_content_part_lists(raw):
    r = raw["raw/llamafactory_v1_sft_demo.jsonl.gz"]["records"][5]
    assert turns(r) == [
        ("user", "Can you introduce yourself?"),
        ("assistant", "I am {{name}}, an AI assistant trained by {{author}}."),
    ]
    assert meta_of(r) == {"loss_weight": [0.0, 1.0]}


def test_prompt_completion_strips_only_the_end_marker(raw):
    r = raw["raw/t0_train_50k/adversarial_qa_dbert_answer_the_following_q.jsonl.gz"]["records"][0]
    assert turns(r)[1] == ("assistant", "subjective idealism")
    assert turns(r)[0][1].startswith('Given the following passage\n\n"A generation later, the Irish Anglican')
    assert turns(r)[0][1].endswith("\n\nQuestion: what concept is mentioned last?\n")
    t0 = [r for p, i in raw.items() if p.startswith("raw/t0_train_50k/") for r in i["records"]]
    assert not any(r["messages"][-1]["content"].endswith("<|endoftext|>") for r in t0)


def test_prompt_response(raw):
    r = raw["raw/foundry_dolly_hhrlhf_train_small.jsonl.gz"]["records"][0]
    assert turns(r)[0] == (
        "user",
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nwhat is kangen water?\n\n### Response:\n",
    )
    assert turns(r)[1][1].startswith("Kangen water is alkaline ionized water produced through")


def test_hh_transcripts_split_into_turns_with_rejected_kept(raw):
    records = raw["raw/hh_rlhf_harmless_base_test.jsonl.gz"]["records"]
    r = records[1]
    assert [m["role"] for m in r["messages"]] == ["user", "assistant"] * 3
    assert r["messages"][0]["content"] == "How much alcohol can I drink per day?"
    assert r["messages"][4]["content"] == "I feel much better when I get drunk and consume a lot of alcohol."
    assert r["messages"][5]["content"].startswith("Sounds like alcohol is something you use to calm down")
    assert turns({"messages": r["rejected"]}) == [
        (
            "assistant",
            "I’m glad that you’re enjoying your alcohol intake. Can I ask about how you feel when "
            "you don’t drink alcohol?",
        ),
    ]
    assert Counter(len(r["rejected"]) for r in records) == {1: 2311, 2: 1}
    assert all(r["rejected"] and r["messages"][-1]["role"] == "assistant" for r in records)


def test_oasst_best_path_from_both_exports(raw):
    trees = raw["raw/oasst_en_100_tree.jsonl.gz"]["records"]
    messages = raw["raw/oasst_en_100_message.jsonl.gz"]["records"]
    assert [r["messages"] for r in trees] == [r["messages"] for r in messages]
    assert sum(len(r["messages"]) for r in trees) == 290
    r = trees[0]
    assert turns(r)[0] == ("user", "How can I find the best 401k plan for my needs?")
    assert turns(r)[1][1].startswith("The first step is to research your options.")  # the rank-0 reply
    assert meta_of(r)["message_ids"] == [
        "054e1df3-35e0-4bb8-a585-607dbdcd24e0",
        "fa783ef0-4f4e-457d-b429-afd89edf8757",
    ]
    assert all(r["messages"][-1]["role"] == "assistant" for r in trees)


@pytest.mark.parametrize("name", ["oasst_en_100_tree.jsonl.gz", "oasst_en_100_message.jsonl.gz"])
def test_oasst_all_paths(shared_data, name):
    spec = InputSpec.from_recipe({"path": f"raw/{name}", "options": {"oasst_paths": "all"}}, "inputs[0]")
    records = [r for b in read_input(spec, shared_data) for r in b.records]
    assert len(records) == 546 and len({r["id"] for r in records}) == 546
    assert sum(len(r["messages"]) for r in records) == 1806
    assert all(r["messages"][-1]["role"] == "assistant" for r in records)
    first_tree = [r for r in records if r["source"]["row"] == 1]
    assert [len(r["messages"]) for r in first_tree] == [2, 2, 2]


def test_bare_instruction_lists_are_prompt_only(raw):
    r = raw["raw/wizardlm_testset.jsonl.gz"]["records"][0]
    assert turns(r) == [
        ("user", "If a car travels 120 miles in 2 hours, what is its average speed in miles per hour?")
    ]
    assert meta_of(r) == {"Difficulty": 1, "Skill": "Math", "idx": 1, "needs_response": True}
    wild = raw["raw/instructionwild_v2_user_1.jsonl.gz"]["records"]
    assert meta_of(wild[0]) == {"instruction_type": "Generation", "needs_response": True}
    assert sum(1 for r in wild if "special_tag" in meta_of(r)) == 36


def test_self_instruct_tasks_use_the_first_instance_input(raw, shared_data):
    r = raw["raw/selfinstruct_user_oriented_instructions.jsonl.gz"]["records"][1]
    with gzip.open(shared_data / "raw/selfinstruct_user_oriented_instructions.jsonl.gz", "rt") as f:
        src = [json.loads(line) for line in f][1]
    assert turns(r) == [("user", src["instruction"] + "\n\n" + src["instances"][0]["input"])]
    meta = meta_of(r)
    assert meta["needs_response"] is True and meta["instances"] == src["instances"]
    assert meta["id"] == "user_oriented_task_1" and meta["motivation_app"] == "Grammarly"
    seed = raw["raw/alpaca_seed_tasks.jsonl.gz"]["records"][0]  # empty input: the instruction alone
    assert turns(seed) == [
        (
            "user",
            "Is there anything I can eat for a breakfast that doesn't include eggs, yet includes protein, "
            "and has roughly 700-1000 calories?",
        )
    ]
    assert meta_of(seed)["name"] == "breakfast_suggestion" and meta_of(seed)["is_classification"] is False


def test_multiple_choice_answers_with_the_gold_choice(raw):
    r = raw["raw/foundry_finetune_example_train.jsonl.gz"]["records"][0]
    assert turns(r) == [
        (
            "user",
            "Question: Which statement best explains why photosynthesis is the foundation of most food "
            "webs?\n",
        ),
        ("assistant", "Sunlight is the source of energy for nearly all ecosystems."),
    ]
    assert meta_of(r)["gold"] == 0 and len(meta_of(r)["choices"]) == 4


def test_inspect_input_reports_without_a_pipeline(shared_data):
    rows = inspect_input(InputSpec(path="raw/instructionwild_v2_user_*.jsonl.gz"), shared_data)
    assert rows == [
        {
            "path": f"raw/instructionwild_v2_user_{i}.jsonl.gz",
            "format": "instructions",
            "records": n,
            "quarantined": q,
            "detected": True,
            "formats": {"instructions": n},
        }
        for i, n, q in [(1, 429, 0), (2, 246, 2), (3, 198, 3)]
    ]
    assert {"alpaca", "sharegpt", "openai", "hh", "oasst", "kto", "preference", "fields"} <= set(
        format_names()
    )
