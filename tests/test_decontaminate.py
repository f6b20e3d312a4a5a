"""decontaminate on real data: known contamination found, clean data left alone, evidence and report exact."""

from __future__ import annotations

import gzip
import http.server
import json
import re
import threading
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from curate.contamination import EvalCopies, RecordTokens, numbers_in
from curate.evalsets import EvalSetSpec, load_eval_set
from curate.formats import InputSpec, read_input
from curate.pipeline import run_recipe
from curate.recipe import recipe_from_dict
from curate.records import make_record, message, to_table
from curate.report.decontam import decontam_report, render
from curate.stages.base import StageContext, build_config
from curate.stages.decontaminate import DecontaminateStage
from curate.text.conversation import conversation_text
from curate.text.ngrams import SpanIndex, normalize, tokenize

ALPACA_EVAL = [
    {"name": "alpaca_eval", "path": "eval/alpaca_eval_gpt4_1106_preview_outputs.json.gz"},
    {"name": "alpaca_eval_davinci", "path": "eval/alpaca_eval_text_davinci_003_outputs.json.gz"},
]
MMLU = ["abstract_algebra", "sociology", "high_school_us_history"]
MMLU_SETS = [{"name": f"mmlu_{s}", "path": f"eval/mmlu_{s}_test.csv.gz"} for s in MMLU]


def read(shared_data: Path, path: str) -> pl.DataFrame:
    records = [
        r
        for batch in read_input(InputSpec.from_recipe({"path": path}, "t"), shared_data)
        for r in batch.records
    ]
    return pl.from_arrow(to_table(records))


def prompts(texts: list[str], answers: list[str] | None = None) -> pl.DataFrame:
    """Records made from bare texts: one user turn each (and an answer when given)."""
    records = []
    for row, text in enumerate(texts):
        msgs = [message("user", text)] + ([message("assistant", answers[row])] if answers else [])
        records.append(make_record(msgs, {"name": "t", "path": "t", "row": row, "format": "t"}))
    return pl.from_arrow(to_table(records))


def run(table: pl.DataFrame, eval_sets: list[dict], base: Path, cache: Path, **options) -> list:
    config = build_config(DecontaminateStage.Config, options, "stages[0].decontaminate")
    stage = DecontaminateStage(config, StageContext(base_dir=base, shared_cache=cache, eval_sets=eval_sets))
    stage.setup()
    verdicts = stage.apply(table.to_arrow()).verdicts()
    assert len(verdicts) == table.height
    return verdicts


def flagged(verdicts: list) -> list[int]:
    return [i for i, v in enumerate(verdicts) if v is not None]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("decontam-cache")


# kernels ---------------------------------------------------------------------------------------


def test_ngram_index_equals_plain_python_sets(shared_data):
    """ngram_hits and contained against a set-of-tuples reference on real eval and training texts."""
    vicuna = load_eval_set(EvalSetSpec.from_recipe(ALPACA_EVAL[0], "e"), shared_data)
    items = [i.question for i in vicuna.items]
    train = read(shared_data, "raw/oasst_en_100_message.jsonl.gz")["messages"].to_list()
    texts = ["\n".join(m["content"] for m in msgs) for msgs in train] + items[:40] + ["", "!!!"]
    index, tokens = SpanIndex(items, 13), tokenize(texts)
    # the kernel's words are the reference's words: same count per text, same hash per word
    words = [normalize(t).split() for t in texts]
    assert tokens.lengths().tolist() == [len(w) for w in words]
    assert (tokens.hashes == tokenize([x for w in words for x in w]).hashes).all()
    item_words = [normalize(t).split() for t in items]
    owners: dict[tuple, set] = {}
    for item, w in enumerate(item_words):
        for k in range(len(w) - 12):
            owners.setdefault(tuple(w[k : k + 13]), set()).add(item)
    expected: dict[tuple, set] = {}
    for doc, w in enumerate(words):
        for k in range(len(w) - 12):
            for item in owners.get(tuple(w[k : k + 13]), ()):
                expected.setdefault((doc, item), set()).add(tuple(w[k : k + 13]))
    hits = index.ngram_hits(tokens)
    assert {(d, i): m for d, i, m in hits.select("doc", "item", "matches").rows()} == {
        k: len(v) for k, v in expected.items()
    }
    contained = {
        (doc, item)
        for doc, w in enumerate(words)
        for item, q in enumerate(item_words)
        if q and f" {' '.join(q)} " in f" {' '.join(w)} "
    }
    assert set(index.contained(tokens).select("doc", "item").rows()) == contained
    assert len(contained) >= 46  # the 40 planted items and OASST's known copies


def test_record_tokens_equal_tokenizing_the_joined_turns(shared_data):
    table = pl.concat(
        [
            read(shared_data, "raw/llamafactory_glaive_toolcall_en_demo.json.gz"),
            read(shared_data, "raw/hh_rlhf_harmless_base_test.jsonl.gz"),
        ]
    )
    records = RecordTokens(table)
    for key, tokens in (("conversation", records.conversation), ("user", records.user)):
        direct = tokenize(conversation_text(table, key))
        assert (tokens.offsets == direct.offsets).all() and (tokens.hashes == direct.hashes).all()
    user_turns = table.select(
        pl.col("messages").list.eval(pl.element().struct.field("role") == "user").list.sum()
    )
    assert len(records.user_turns) == len(records.turn_docs) == user_turns.to_series().sum()


def test_minhash_candidates_lose_nothing_against_all_pairs(shared_data, cache):
    """The shared-n-gram bound that picks MinHash candidates finds what comparing every pair finds."""
    from curate.text.minhash import signatures

    table = pl.concat(
        [
            read(shared_data, "raw/oasst_en_100_message.jsonl.gz"),
            read(shared_data, "raw/wizardlm_testset.jsonl.gz"),
        ]
    )
    alpaca = load_eval_set(EvalSetSpec.from_recipe(ALPACA_EVAL[0], "e"), shared_data)
    user = conversation_text(table, "user")
    questions = [i.question for i in alpaca.items if len(i.question.split()) >= 5]
    sims = (signatures(user)[:, None, :] == signatures(questions)[None, :, :]).mean(axis=2)
    expected = set(np.flatnonzero(sims.max(axis=1) >= 0.7).tolist())
    verdicts = run(table, ALPACA_EVAL[:1], shared_data, cache, methods=["minhash"])
    assert set(flagged(verdicts)) == expected
    assert len(expected) == 4


# what the issue asks to show -------------------------------------------------------------------


def test_all_self_instruct_user_oriented_instructions_are_flagged(shared_data, cache):
    for path in (
        "raw/selfinstruct_user_oriented_instructions.jsonl.gz",
        "raw/selfinstruct_text-davinci-003_predictions.jsonl.gz",
    ):
        table = read(shared_data, path)
        assert table.height == 252
        verdicts = run(table, ALPACA_EVAL, shared_data, cache)
        assert len(flagged(verdicts)) == 252
        assert len(flagged(run(table, ALPACA_EVAL, shared_data, cache, methods=["exact"]))) == 252
        # 34 instructions are shorter than 13 words: n-grams alone cannot see them
        assert len(flagged(run(table, ALPACA_EVAL, shared_data, cache, methods=["ngram"]))) == 218
    evidence = verdicts[0].evidence
    assert verdicts[0].reason == "eval_overlap"
    assert {k: evidence[k] for k in ("eval_set", "eval_id", "method", "score")} == {
        "eval_set": "alpaca_eval",
        "eval_id": "473",
        "method": "exact",
        "score": 1.0,
    }
    assert evidence["match"].startswith(
        "the sentence you are given might be too wordy complicated or unclear"
    )
    assert [(h["eval_set"], h["method"]) for h in evidence["hits"]] == [
        ("alpaca_eval", "exact"),
        ("alpaca_eval", "ngram"),
        ("alpaca_eval", "minhash"),
    ]
    alpaca = load_eval_set(EvalSetSpec.from_recipe(ALPACA_EVAL[0], "e"), shared_data)
    assert alpaca.items[473].question.startswith("The sentence you are given might be too wordy")


def test_all_80_vicuna_questions_are_flagged(shared_data, cache):
    vicuna = load_eval_set(
        EvalSetSpec.from_recipe({"name": "v", "path": "eval/vicuna_bench_question.jsonl.gz"}, "e"),
        shared_data,
    )
    table = prompts([item.question for item in vicuna.items])
    verdicts = run(table, ALPACA_EVAL, shared_data, cache)
    assert len(flagged(verdicts)) == 80
    assert len(flagged(run(table, ALPACA_EVAL, shared_data, cache, methods=["ngram"]))) == 56
    first = verdicts[0].evidence  # "How can I improve my time management skills?": 8 words, a whole-turn copy
    assert (first["method"], first["match"], first["score"]) == (
        "exact",
        "how can i improve my time management skills",
        1.0,
    )
    alpaca = load_eval_set(EvalSetSpec.from_recipe(ALPACA_EVAL[0], "e"), shared_data)
    assert alpaca.items[int(first["eval_id"])].question == "How can I improve my time management skills?"


def test_gsm8k_train_is_not_flagged_wholesale_against_test(shared_data, cache):
    train = load_eval_set(
        EvalSetSpec.from_recipe({"name": "t", "path": "eval/gsm8k_train.jsonl.gz"}, "e"), shared_data
    )
    table = prompts([i.question for i in train.items], [i.answer for i in train.items])
    gsm8k_test = [{"name": "gsm8k", "path": "eval/gsm8k_test.jsonl.gz"}]
    verdicts = run(table, gsm8k_test, shared_data, cache)
    found = {
        i: (v.evidence["eval_id"], v.evidence["method"], v.evidence["matches"])
        for i, v in enumerate(verdicts)
        if v
    }
    # shared problem templates with other numbers (see docs/decontamination.md), not copies
    assert found == {
        20: ("632", "ngram", 13),  # Bella / Max bought snowflake, truck and rose stamps
        406: ("581", "ngram", 3),  # "The first movie is 1 hour and 30 minutes long while the second ..."
        1314: ("602", "ngram", 7),  # "A train / plane travels N miles in 3 hours. At the same rate ..."
        5162: ("602", "ngram", 7),
    }
    assert (
        verdicts[20].evidence["match"]
        == "bought stamps at the post office some of the stamps had a snowflake"
    )


def test_mmlu_paraphrases_found_by_embedding_and_raw_left_alone(shared_data, raw_table, cache):
    texts, truth = [], []
    for subject in MMLU:
        path = (
            shared_data / f"contamination/llmdecon_{subject}_test_rephrase_english_filtered_question.jsonl.gz"
        )
        with gzip.open(path, "rt") as fh:
            for row, line in enumerate(fh):
                text = json.loads(line)["text"]
                if text.strip():  # the filtered set blanks rephrasings it rejected
                    texts.append(text)
                    truth.append((f"mmlu_{subject}", str(row)))
    assert len(texts) == 485
    verdicts = run(prompts(texts), MMLU_SETS, shared_data, cache, methods=["embedding"])
    hit = [i for i, v in enumerate(verdicts) if v]
    right = [
        i for i in hit if (verdicts[i].evidence["eval_set"], verdicts[i].evidence["eval_id"]) == truth[i]
    ]
    # recall 0.920 (0.911 on the right item); without the numbers check 447 and 443: the one lost
    # writes "the late 1800s" as "the last part of the 19th century"
    assert (len(hit), len(right)) == (446, 442)
    assert len(right) / len(texts) >= 0.9
    e = verdicts[hit[0]].evidence
    assert (
        e["method"] == "embedding"
        and 0.7 <= e["score"] <= 1.0
        and e["eval_text"]
        and e["match"] == texts[hit[0]]
    )

    # the vectors are cached on disk: a second embedder over the same cache loads no model at all
    from curate.embed import Embedder

    again = Embedder(cache_dir=cache, max_seq_length=128)
    assert again.encode(texts[:5]).shape == (5, 384)
    assert (again.encoded, again._model) == (0, None)

    # every 250th record of raw/ (343 of 85,669, all shapes): paraphrase hits against MMLU are rare
    sample = pl.from_arrow(raw_table).gather_every(250)
    raw_verdicts = run(sample, MMLU_SETS, shared_data, cache, methods=["embedding"])
    assert sample.height == 343
    assert len(flagged(raw_verdicts)) == 0 <= 0.01 * sample.height


def test_embedding_matches_need_a_shared_number_when_both_state_numbers(cache, tmp_path):
    """AlpacaEval's tip item against real glaive/code_alpaca requests: a tip on other amounts is
    another question, while a restatement with no numbers, or with the same ones, still matches."""
    assert numbers_in("1,000 or 1000.0 items, 007, the 1980s") == {"1000", "7", "1980", "80"}
    (tmp_path / "eval.jsonl").write_text(
        json.dumps({"question": "Using a given amount, determine an appropriate tip.\n\n14% tip on $47.50"})
        + "\n"
        + json.dumps({"question": "python function to determine whether a number is prime."})
        + "\n"
    )
    texts = [
        "Hi, I need help with calculating a tip. My bill amount is $50 and I want to leave a 20% tip.",
        "My bill is $47.50. What is a 14% tip on it?",
        "Write a Python function to check if a given number is a prime number.\n\n13",
    ]
    sets = [{"name": "alpaca_eval", "path": "eval.jsonl"}]
    plain = run(prompts(texts), sets, tmp_path, cache, methods=["embedding"], embedding_numbers_agree=False)
    assert all(v is not None for v in plain)  # all three are above 0.7
    checked = run(prompts(texts), sets, tmp_path, cache, methods=["embedding"])
    assert [v is not None for v in checked] == [False, True, True]


class _FakeOpenAI(http.server.BaseHTTPRequestHandler):
    """An OpenAI-compatible chat endpoint: says yes when the training example mentions Oregon."""

    requests: list[dict] = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append(
            {"path": self.path, "auth": self.headers.get("Authorization"), "body": body}
        )
        example = body["messages"][-1]["content"].split("Training example:")[1]
        reply = {
            "id": "x",
            "object": "chat.completion",
            "created": 0,
            "model": body["model"],
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "stop",
                    "message": {"role": "assistant", "content": "Yes" if "Oregon" in example else "No."},
                }
            ],
            "usage": {"prompt_tokens": 50, "completion_tokens": 1, "total_tokens": 51},
        }
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_llm_judge_confirms_embedding_candidates_once(shared_data, cache, monkeypatch):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeOpenAI)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("CURATE_TEST_JUDGE_KEY", "sk-test-secret-123")
    _FakeOpenAI.requests = []
    texts = [
        "How did the United States acquire the Oregon Territory? ",  # rephrased MMLU history item 0
        "Which legislative act is the clearest illustration of nativism?",  # rephrased item 3
        "Write a haiku about autumn leaves.",
    ]
    options = {
        "methods": ["embedding"],
        "judge": True,
        "judge_model": "judge-1",
        "judge_base_url": f"http://127.0.0.1:{server.server_address[1]}/v1",
        "judge_api_key_env": "CURATE_TEST_JUDGE_KEY",
    }
    try:
        verdicts = run(prompts(texts), MMLU_SETS[2:], shared_data, cache, **options)
        sent = len(_FakeOpenAI.requests)
        again = run(prompts(texts), MMLU_SETS[2:], shared_data, cache, **options)
    finally:
        server.shutdown()
    assert sent == 2  # the two history questions passed the candidate bar; the haiku did not
    assert len(_FakeOpenAI.requests) == sent  # the rerun was answered from the request cache
    assert _FakeOpenAI.requests[0]["path"] == "/v1/chat/completions"
    assert _FakeOpenAI.requests[0]["auth"] == "Bearer sk-test-secret-123"
    assert flagged(verdicts) == flagged(again) == [0]
    e = verdicts[0].evidence
    assert (e["eval_set"], e["eval_id"], e["method"], e["judge"]) == (
        "mmlu_high_school_us_history",
        "0",
        "embedding",
        "judge-1",
    )
    stored = b"".join(p.read_bytes() for p in cache.rglob("*.sqlite*"))  # WAL: answers may be in -wal yet
    assert b"sk-test-secret-123" not in stored and b"Oregon" in stored


# evidence, refusal, report ---------------------------------------------------------------------


def test_match_answers_and_user_turns_only(shared_data, cache):
    gsm8k = load_eval_set(
        EvalSetSpec.from_recipe({"name": "g", "path": "eval/gsm8k_test.jsonl.gz"}, "e"), shared_data
    )
    # a record that quotes only the worked answer of a test item, as a model answer would
    table = prompts(["Solve the duck egg problem."], [gsm8k.items[0].answer])
    sets = [{"name": "gsm8k", "path": "eval/gsm8k_test.jsonl.gz"}]
    assert flagged(run(table, sets, shared_data, cache, methods=["ngram"])) == []
    verdicts = run(table, sets, shared_data, cache, methods=["ngram"], match_answers=True, ngram=8)
    e = verdicts[0].evidence
    assert (e["eval_id"], e["part"], e["match"]) == ("0", "answer", "janet sells 16 3 4 163499 duck eggs")
    assert (
        flagged(
            run(
                table,
                sets,
                shared_data,
                cache,
                methods=["ngram"],
                match_answers=True,
                ngram=8,
                user_turns_only=True,
            )
        )
        == []
    )


def test_exact_eval_copies_finds_a_planted_copy(shared_data):
    table = read(shared_data, "raw/code_alpaca_2k.json.gz")
    sets = [
        {"name": "gsm8k", "path": "eval/gsm8k_test.jsonl.gz"},
        {"name": "humaneval", "path": "eval/HumanEval.jsonl.gz"},
    ]
    copies = EvalCopies(sets, shared_data)
    assert copies.find(table.to_arrow()) == []
    gsm8k = load_eval_set(EvalSetSpec.from_recipe(sets[0], "e"), shared_data)
    question = gsm8k.items[1].question
    assert question.startswith("A robe takes 2 bolts of blue fiber")
    planted = prompts([f"Please help with my homework.\n\n{question.upper()}\n\nThanks!"], ["3"])
    both = pl.concat([table, planted])
    assert copies.find(both.to_arrow()) == [{"id": planted["id"][0], "eval_set": "gsm8k", "eval_id": "1"}]


def test_version_report_counts_items_per_eval_set_and_method(shared_data, tmp_path):
    recipe = recipe_from_dict(
        {
            "name": "decontam",
            "inputs": [
                {"path": "raw/selfinstruct_user_oriented_instructions.jsonl.gz"},
                {"path": "raw/oasst_en_100_message.jsonl.gz"},
            ],
            "eval_sets": [*ALPACA_EVAL[:1], {"name": "gsm8k", "path": "eval/gsm8k_test.jsonl.gz"}],
            "stages": [{"decontaminate": {"methods": ["exact", "ngram", "minhash"]}}],
        },
        base_dir=shared_data,
    )
    result = run_recipe(recipe, tmp_path / "runs")
    folder, manifest = result.folder, result.manifest
    assert manifest["counts"]["dropped"] == 258
    assert manifest["eval_overlap"]["exact_copies"] == 0
    report = decontam_report(folder, base_dir=shared_data)
    assert report["records_dropped"] == 258
    assert report["eval_sets"] == [
        {
            "name": "alpaca_eval",
            "items": 805,
            "items_found": 258,
            "records_dropped": 258,
            "by_method": {"exact": 258, "ngram": 221, "minhash": 254},
        },
        {"name": "gsm8k", "items": 1319, "items_found": 0, "records_dropped": 0, "by_method": {}},
    ]
    from rich.console import Console

    console = Console(record=True, width=160)
    render(report, console)
    assert re.search(r"alpaca_eval\s+│\s+805\s+│\s+258 \(32\.0%\)", console.export_text())


def test_runner_refuses_a_version_with_an_eval_copy(shared_data, tmp_path):
    from curate.errors import CurateError

    raw = {
        "name": "nodecontam",
        "inputs": [{"path": "raw/selfinstruct_text-davinci-003_predictions.jsonl.gz"}],
        "eval_sets": ALPACA_EVAL[:1],
        "stages": [{"filter": {}}],
    }
    with pytest.raises(CurateError, match="refusing to write a version: 252 kept record"):
        run_recipe(recipe_from_dict(raw, base_dir=shared_data), tmp_path / "runs")
    manifest = run_recipe(
        recipe_from_dict({**raw, "allow_eval_overlap": True}, base_dir=shared_data), tmp_path / "ok"
    ).manifest
    assert manifest["eval_overlap"] == {"checked": True, "exact_copies": 252, "allowed": True}


def test_config_errors_name_the_option(shared_data, cache):
    from curate.errors import RecipeError

    with pytest.raises(RecipeError, match="methods"):
        build_config(DecontaminateStage.Config, {"methods": ["exact", "fuzzy"]}, "stages[1].decontaminate")
    with pytest.raises(RecipeError, match="minhash_threshold: 1.5 is greater than the maximum of 1.0"):
        build_config(DecontaminateStage.Config, {"minhash_threshold": 1.5}, "stages[1].decontaminate")
    raw = {
        "inputs": [{"path": "raw/selfinstruct_user_oriented_instructions.jsonl.gz"}],
        "eval_sets": ALPACA_EVAL,
        "stages": [{"decontaminate": {"eval_sets": ["gsm8k"]}}],
    }
    with pytest.raises(RecipeError, match="'gsm8k' is not a declared eval set"):
        recipe_from_dict(raw, base_dir=shared_data)


def test_a_template_sentence_that_many_items_share_is_not_evidence(shared_data, cache, tmp_path):
    """Every Dolly record opens with the same boilerplate ("Below is an instruction that describes a
    task. Write a response ..."). Against 40 of them as an eval set, 13-grams made mostly of that
    sentence would flag nearly the whole file; left out (ngram_max_items), the 40 copies and the few
    records that share real words with one are what the n-gram method finds."""
    dolly = read(shared_data, "raw/foundry_dolly_hhrlhf_train_small.jsonl.gz")
    users = [next(m["content"] for m in msgs if m["role"] == "user") for msgs in dolly["messages"].to_list()]
    frozen = tmp_path / "frozen.jsonl"
    frozen.write_text(
        "".join(json.dumps({"id": str(k), "question": users[k]}) + "\n" for k in range(0, 1000, 25))
    )
    sets = [{"name": "frozen", "path": str(frozen), "fields": {"question": "question", "id": "id"}}]
    verdicts = run(dolly, sets, tmp_path, cache, methods=["exact", "ngram"])
    flagged = {k: v.evidence["method"] for k, v in enumerate(verdicts) if v}
    everything = sum(bool(v) for v in run(dolly, sets, tmp_path, cache, methods=["ngram"], ngram_max_items=0))
    assert {k for k, method in flagged.items() if method == "exact"} == set(range(0, 1000, 25))
    assert (len(flagged), everything) == (52, 1000)
    # what the n-grams still find shares real words with an item: a task family ("identify which
    # animal species is alive or extinct", 9 records), a paragraph about Nintendo (60 shared 13-grams)
    assert verdicts[238].evidence["eval_id"] == "900" and verdicts[238].evidence["matches"] == 60
    by_ngram = [v.evidence["match"] for v in verdicts if v and v.evidence["method"] == "ngram"]
    assert sum("animal species is alive" in match for match in by_ngram) == 9
