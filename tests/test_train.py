"""The QLoRA trainer on CPU with the stories260K llama2.c model: conversion, masks, packing, split, gates."""

from __future__ import annotations

import gzip
import json
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors import safe_open

from curate.errors import CurateError, RecipeError
from curate.records import make_record, message, to_table, train_messages
from curate.train.data import IGNORE, encode, encode_all, in_holdout, load_version, split_holdout
from curate.train.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO.parent / "shared" / "models"
SHARED_DATA = REPO.parent / "shared" / "data"
TINY = REPO / "train" / "tiny-cpu.yaml"
# tests run the tiny recipe shorter still: a few packed steps, short generations
FAST = {
    "max_steps": 12,
    "eval_steps": 6,
    "micro_batch_size": 4,
    "gates.max_new_tokens": 8,
    "gates.max_items": 4,
}


@pytest.fixture(scope="module")
def stories(tmp_path_factory) -> Path:
    from curate.train.llama2c import convert

    return convert(MODELS / "stories260K.bin", MODELS / "tok512.bin", tmp_path_factory.mktemp("stories"))


@pytest.fixture(scope="module")
def tokenizer(stories):
    from curate.train.model import load_tokenizer

    tok, added = load_tokenizer(str(stories), "chatml")
    assert added == ["<|im_start|>", "<|im_end|>"]
    return tok


@pytest.fixture(scope="module")
def version(tmp_path_factory, shared_data) -> Path:
    """A version folder in the runner's layout, from the first 120 short LLaMA-Factory alpaca records."""
    rows = json.loads(gzip.open(shared_data / "raw" / "llamafactory_alpaca_en_demo.json.gz", "rt").read())
    records = []
    for i, r in enumerate(rows):
        question = (r["instruction"] + ("\n\n" + r["input"] if r.get("input") else "")).strip()
        if len(question) + len(r["output"]) <= 300:
            source = {
                "name": "alpaca_en",
                "path": "llamafactory_alpaca_en_demo.json.gz",
                "row": i,
                "format": "alpaca",
            }
            records.append(
                make_record([message("user", question), message("assistant", r["output"])], source)
            )
        if len(records) == 120:
            break
    out = tmp_path_factory.mktemp("runs")
    folder = out / "v1"
    folder.mkdir()
    pq.write_table(to_table(records), folder / "data.parquet")
    with open(folder / "train.jsonl", "w") as fh:
        for rec in records:
            fh.write(json.dumps({"messages": train_messages(rec["messages"])}) + "\n")
    manifest = {
        "version": "v1",
        "template": "chatml",
        "recipe": {"stages": [{"normalize": {"template": "chatml"}}]},
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    (out / "latest").write_text("v1")
    return out


def test_llama2c_conversion_generates_the_known_story(stories):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(stories)
    tok = AutoTokenizer.from_pretrained(stories)
    ids = tok("Once upon a time", return_tensors="pt").input_ids
    assert ids[0].tolist() == [1, 403, 407, 261, 378]
    out = model.generate(ids, max_new_tokens=30, do_sample=False)
    assert tok.decode(out[0], skip_special_tokens=True) == (
        "Once upon a time, there was a little girl named Lily. "
        "She loved to play outside in the park. One day,"
    )


def test_masks_train_assistant_tokens_and_end_of_turn_only(tokenizer):
    conv = [
        {"role": "system", "content": "You are kind."},
        {"role": "user", "content": "Tell me a story."},
        {"role": "assistant", "content": "Tom had a red ball."},
        {"role": "user", "content": "More!"},
        {"role": "assistant", "content": "He played all day."},
    ]
    row = encode(conv, tokenizer, "chatml", 512)
    ids, labels = row["input_ids"], row["labels"]
    eot = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<unk>"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    trained = [i for i, lab in enumerate(labels) if lab != IGNORE]
    assert all(labels[i] == ids[i] for i in trained)
    # the trained tokens spell exactly the two answers, each closed by its end-of-turn token
    runs, current = [], []
    for i in range(len(ids)):
        if labels[i] != IGNORE:
            current.append(ids[i])
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    assert [tokenizer.decode(r) for r in runs] == [
        "Tom had a red ball.<|im_end|>",
        "He played all day.<|im_end|>",
    ]
    assert [r[-1] for r in runs] == [eot, eot]
    # every other token (system, user, headers, the end-of-turn after prompts) is masked
    assert sum(1 for lab in labels if lab == IGNORE) == len(ids) - sum(len(r) for r in runs)
    assert ids.count(eot) == 5 and sum(1 for i in trained if ids[i] == eot) == 2


def test_masks_from_a_tokenizer_template_equal_the_named_ones(stories, tokenizer):
    from curate.train.model import load_tokenizer

    own, _ = load_tokenizer(str(stories), "chatml")
    own.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    conv = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello, Tom."}]
    assert encode(conv, own, own, 512) == encode(conv, tokenizer, "chatml", 512)


def test_llama3_masks_with_added_tokens(stories):
    from curate.train.model import load_tokenizer

    tok, added = load_tokenizer(str(stories), "llama-3")
    assert added == ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    assert tok.eos_token == "<|eot_id|>" and tok.pad_token != tok.eos_token
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Tom ran home."}]
    row = encode(conv, tok, "llama-3", 512)
    trained = [t for t, lab in zip(row["input_ids"], row["labels"], strict=True) if lab != IGNORE]
    assert tok.decode(trained) == "Tom ran home.<|eot_id|>"
    assert row["input_ids"][0] == tok.convert_tokens_to_ids("<|begin_of_text|>")


def test_a_token_across_the_answer_boundary_is_trained():
    from curate.train.data import token_labels

    # spans [5, 9) and [12, 14); tokens: prompt, straddling, inside, between, inside, after
    offsets = [(0, 4), (4, 6), (6, 9), (9, 12), (12, 14), (14, 15)]
    assert token_labels(offsets, [(5, 9), (12, 14)]) == [False, True, True, False, True, False]


def test_a_template_that_rewrites_earlier_turns_is_refused(stories):
    from curate.templates import render
    from curate.train.model import load_tokenizer

    tok, _ = load_tokenizer(str(stories), "chatml")
    # renders the last message differently from the same message followed by more: no stable prefixes
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% if loop.last %}!{% endif %}{% endfor %}"
    conv = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
    ]
    with pytest.raises(CurateError, match="does not render conversations prefix by prefix"):
        render(conv + [{"role": "assistant", "content": "d"}], tok)


def test_token_budget_stops_training():
    from types import SimpleNamespace

    from curate.train.metrics import RunLog

    log = RunLog(max_tokens=1000)
    control = SimpleNamespace(should_training_stop=False)
    log.on_step_end(None, SimpleNamespace(num_input_tokens_seen=999), control)
    assert control.should_training_stop is False
    log.on_step_end(None, SimpleNamespace(num_input_tokens_seen=1000), control)
    assert control.should_training_stop is True


def test_an_example_with_nothing_to_train_is_an_error(tokenizer):
    long_prompt = [{"role": "user", "content": "word " * 400}, {"role": "assistant", "content": "ok"}]
    with pytest.raises(CurateError, match="1 example\\(s\\) would train on nothing.*record r1"):
        encode_all([long_prompt], ["r1"], tokenizer, "chatml", 64, "error")
    rows, dropped = encode_all([long_prompt], ["r1"], tokenizer, "chatml", 64, "drop")
    assert rows == [] and dropped == ["r1"]


def test_packed_examples_do_not_attend_across_each_other(stories, tokenizer):
    """curate's collator keeps each packed row a row (TRL's concatenates them: SDPA would then attend
    over the whole micro-batch). Conversations packed in a row see only themselves, a shorter row's pads
    carry no label, and the loss equals the one over TRL's single concatenated row."""
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from curate.train.collate import PackedRowCollator, packed_attention_mask

    model = AutoModelForCausalLM.from_pretrained(stories, dtype=torch.float32).eval()

    def conversation(user: str, answer: str) -> dict:
        turns = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        row = encode(turns, tokenizer, "chatml", 99)
        row["input_ids"] = [t % 512 for t in row["input_ids"]]  # the base vocabulary: no resize needed
        row["labels"] = [t if t == -100 else t % 512 for t in row["labels"]]
        return row

    a, b, c = conversation("Hi", "Tom ran."), conversation("Go", "Sue sat."), conversation("Yes", "A cat.")
    packed = [
        {
            "input_ids": a["input_ids"] + b["input_ids"],
            "labels": a["labels"] + b["labels"],
            "seq_lengths": [len(a["input_ids"]), len(b["input_ids"])],
        },
        {"input_ids": c["input_ids"], "labels": c["labels"], "seq_lengths": [len(c["input_ids"])]},
    ]
    batch = PackedRowCollator(pad_token_id=0)(packed)
    assert "attention_mask" not in batch and batch["input_ids"].shape == (2, len(packed[0]["input_ids"]))
    n, m = len(a["input_ids"]), len(c["input_ids"])
    assert batch.pop("num_tokens") == n + len(b["input_ids"]) + m  # counted on the host, without the pads
    assert (batch["labels"][1, m:] == -100).all() and (batch["input_ids"][1, m:] == 0).all()
    with torch.no_grad():
        # as in training (TRL passes use_cache=False): with no cache, restarting position ids split examples
        out = model(**batch, use_cache=False)
        # the trainer's mask, made on the device from the position ids, is the one transformers makes
        masked = model(**batch, attention_mask=packed_attention_mask(batch["position_ids"]), use_cache=False)
        alone = [model(input_ids=torch.tensor([r["input_ids"]])).logits[0] for r in (a, b, c)]
        flat = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(packed)
        flat_loss = model(
            **{k: flat[k] for k in ("input_ids", "position_ids", "labels")}, use_cache=False
        ).loss
    torch.testing.assert_close(out.logits[0, :n], alone[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.logits[0, n:], alone[1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.logits[1, :m], alone[2], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(masked.logits, out.logits, atol=0, rtol=0)
    assert int((batch["labels"] != -100).sum()) == int((flat["labels"] != -100).sum())
    torch.testing.assert_close(out.loss, flat_loss, atol=1e-5, rtol=1e-5)

    # rows of one conversation each: no position ids, so the model counts from 0 under a causal mask alone
    single = PackedRowCollator(pad_token_id=0)([packed[1], packed[1]])
    assert "position_ids" not in single and single["num_tokens"] == 2 * m


def test_the_step_loss_is_the_models_own_cross_entropy(stories, tokenizer, version, tmp_path):
    """curate's step computes TRL's fused LM-head loss and none of TRL's per-step metrics (their host
    syncs stall the GPU): on a packed batch it equals the model's own cross-entropy over the trained
    tokens."""
    from trl import SFTTrainer

    from curate.train.model import load_model, lora_config
    from curate.train.trainer import _dataset, _encode_splits, _sft_config, _trainer_class

    recipe = load_recipe(TINY, {"max_steps": 1})
    model = load_model(str(stories), recipe, tokenizer)
    rows = _encode_splits(recipe, load_version(version), tokenizer, "chatml")[0][:24]
    trainer = _trainer_class(SFTTrainer, model_loss=False)(
        model=model,
        peft_config=lora_config(recipe, model, tokenizer, []),
        args=_sft_config(recipe, tmp_path, tokenizer, rows, on_gpu=False),
        train_dataset=_dataset(rows),
        eval_dataset=_dataset(rows[:2]),
        processing_class=tokenizer,
    )
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    # the packed rows stay rows: 24 conversations in 6 rows of a micro-batch of 8
    assert batch["input_ids"].shape[0] == min(recipe.micro_batch_size, len(trainer.train_dataset)) == 6
    assert (batch["position_ids"][0] == 0).sum() > 1  # several examples packed in a row
    tokens = batch.pop("num_tokens")
    assert tokens == int((batch["input_ids"] != tokenizer.pad_token_id).sum())  # transformers' own count
    with torch.no_grad():
        step = trainer.compute_loss(trainer.model, {**batch, "num_tokens": tokens})
        # the model's forward with labels, its attention mask derived by transformers
        own = trainer.model(**batch, use_cache=False).loss
    torch.testing.assert_close(step, own, atol=1e-5, rtol=1e-5)
    assert not trainer._metrics["train"]  # no entropy, token accuracy or token count was computed


def test_logs_read_without_waiting_equal_transformers_logs(stories, tokenizer, version, tmp_path):
    """The step's loss, gradient norm and token count reach the logs without the host waiting for the
    GPU (copied back unwaited, counted by the collator): the log history of 4 steps equals the one
    transformers' own logging and token count write, entry by entry; and a log whose copy has not
    arrived waits, with those after it, until it has or until something must see every log."""
    from transformers import Trainer
    from trl import SFTTrainer

    from curate.train.model import load_model, lora_config
    from curate.train.trainer import _dataset, _encode_splits, _sft_config, _trainer_class

    recipe = load_recipe(TINY, {"max_steps": 4, "micro_batch_size": 2, "eval_steps": 100})
    rows = _encode_splits(recipe, load_version(version), tokenizer, "chatml")[0][:24]

    def history(cls: type) -> tuple[list[dict], object]:
        torch.manual_seed(0)
        model = load_model(str(stories), recipe, tokenizer)
        trainer = cls(
            model=model,
            peft_config=lora_config(recipe, model, tokenizer, []),
            args=_sft_config(recipe, tmp_path / cls.__name__, tokenizer, rows, on_gpu=False),
            train_dataset=_dataset(rows),
            eval_dataset=_dataset(rows[:2]),
            processing_class=tokenizer,
        )
        trainer.train()
        return [e for e in trainer.state.log_history if "loss" in e], trainer

    ours = _trainer_class(SFTTrainer, model_loss=False)

    class TransformersLogging(ours):
        _maybe_log_save_evaluate = Trainer._maybe_log_save_evaluate
        _track_num_input_tokens = Trainer._track_num_input_tokens

    unwaited, trainer = history(ours)
    waited, _ = history(TransformersLogging)
    assert [e["step"] for e in unwaited] == [1, 2, 3, 4]
    assert [e["num_input_tokens_seen"] for e in unwaited] == [e["num_input_tokens_seen"] for e in waited]
    clock = {"train_runtime", "train_tokens_per_second"}  # wall-clock figures, which curate times itself
    for a, b in zip(unwaited, waited, strict=True):
        b = {k: v for k, v in b.items() if k not in clock}
        assert a.keys() == b.keys() and a == pytest.approx(b, rel=1e-6)

    class Copy:  # a copy still on its way until `arrived` is set
        arrived = False

        def query(self) -> bool:
            return self.arrived

        def synchronize(self) -> None:
            self.arrived = True

    late, logged = Copy(), []
    trainer.log = lambda logs: logged.append((trainer.state.global_step, logs["loss"]))
    for step, arrived in ((5, late), (6, None)):
        trainer._unread_logs.append(((step, 0, 1.0), 1, [torch.tensor(float(step))], arrived, 1e-4))
    trainer._log_arrived(wait=False)
    assert logged == []  # step 6's copy is there, but step 5's is not: logs stay in order
    late.arrived = True
    trainer._log_arrived(wait=False)
    assert logged == [(5, 5.0), (6, 6.0)] and trainer.state.global_step == 4


def test_scoring_equals_whole_pass_cross_entropy_without_float32_logits_of_a_pass(
    stories, tokenizer, version, monkeypatch
):
    """Eval losses are scored a slice of trained positions at a time: the same per-row sums as one
    float32 cross-entropy over a whole pass, but no float32 logits of the whole pass (on Llama-3-8B
    those made scoring, not training, set a run's peak memory)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from curate.train import gates
    from curate.train.model import load_model
    from curate.train.trainer import _encode_splits

    recipe = load_recipe(TINY, {"bnb_4bit_compute_dtype": "bfloat16"})  # the model's logits are not float32
    model = load_model(str(stories), recipe, tokenizer).eval()
    rows = _encode_splits(recipe, load_version(version), tokenizer, "chatml")[0][:12]
    vocab = model.get_output_embeddings().weight.shape[0]
    monkeypatch.setattr(gates, "SCORED_LOGITS", 8 * vocab)  # 8 positions a slice

    class LargestFloat32Logits(TorchDispatchMode):
        rows = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.shape[-1:] == (vocab,):
                    if func not in (torch.ops.aten.mm.default, torch.ops.aten.view.default):  # the head
                        self.rows = max(self.rows, t.numel() // vocab)
            return out

    with LargestFloat32Logits() as watch:
        total, count = gates.summed_losses(model, rows, tokenizer.pad_token_id, 4096)
    assert watch.rows <= 8
    alone = gates.summed_losses(model, rows, tokenizer.pad_token_id, 1)  # a pass per row: no padding
    np.testing.assert_allclose(total, alone[0], rtol=5e-3)  # batch shapes change bf16 rounding only
    total, count = alone

    for i, row in enumerate(rows):  # each row alone, the whole pass in float32
        ids = torch.tensor([row["input_ids"]])
        labels = torch.tensor(row["labels"][1:])
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits.float()[0, :-1]
        own = torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
        assert count[i] == int((labels != -100).sum()) > 0
        assert total[i] == pytest.approx(float(own), rel=1e-5)

    # through TRL's fused LM head, which scores in tiles, as curate's trainer does: the same sums
    from trl.trainer.utils import add_fused_lm_head

    add_fused_lm_head(model)
    fused, fused_count = gates.summed_losses(model, rows, tokenizer.pad_token_id, 4096, fused_head=True)
    np.testing.assert_array_equal(fused_count, count)
    np.testing.assert_allclose(fused, total, rtol=5e-3)


def test_holdout_is_by_record_id_deterministic_and_stable(version):
    v = load_version(version)
    assert len(v.ids) == 120 and v.template == "chatml"
    train, held = split_holdout(v, 0.1, 500, "curate-holdout")
    assert sorted(train + held) == list(range(120))
    assert held == [i for i, rid in enumerate(v.ids) if in_holdout(rid, 0.1, "curate-holdout")]
    assert 4 <= len(held) <= 24
    assert split_holdout(load_version(version / "v1"), 0.1, 500, "curate-holdout") == (train, held)
    # membership depends on the id alone: it does not move when other records come or go
    assert [in_holdout(v.ids[i], 0.1, "curate-holdout") for i in held] == [True] * len(held)
    assert split_holdout(v, 0.1, 2, "curate-holdout")[1] == sorted(sorted(held, key=lambda i: v.ids[i])[:2])


def test_recipe_validation_names_the_key():
    recipe = load_recipe(TINY, {"lora.r": 8, "packing": False})
    assert recipe.lora.r == 8 and recipe.packing is False and recipe.lora.alpha == 32
    assert Path(recipe.path(recipe.base_model)) == (MODELS / "stories260K.bin").resolve()
    with pytest.raises(
        RecipeError, match="lora: Additional properties are not allowed \\('rank' was unexpected\\)"
    ):
        load_recipe(TINY, {"lora.rank": 8})
    with pytest.raises(RecipeError, match="sequence_len: 'long' is not of type 'integer'"):
        load_recipe(TINY, {"sequence_len": "long"})
    assert load_recipe(TINY, {"learning_rate": "2e-4"}).learning_rate == 0.0002  # YAML 1.1 reads 2e-4 as text
    with pytest.raises(RecipeError, match="base_model' is a required property"):
        load_recipe({"sequence_len": 128})
    default = load_recipe(REPO / "train" / "qlora-default.yaml")
    assert (default.lora.r, default.lora.alpha, default.lora.dropout) == (16, 32, 0.05)
    assert default.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert default.load_in_4bit and default.bnb_4bit_quant_type == "nf4" and default.bnb_4bit_use_double_quant


@pytest.fixture(scope="module")
def trained(demo_out, tmp_path_factory):
    from curate.train.trainer import run_training

    out = tmp_path_factory.mktemp("train")
    capability = [
        {"name": "arc", "path": str(SHARED_DATA / "eval/foundry_arc_challenge.jsonl.gz"), "layout": "arc",
         "max_items": 8},
        {"name": "algebra", "path": str(SHARED_DATA / "eval/mmlu_abstract_algebra_test.csv.gz"),
         "layout": "mmlu", "subject": "abstract algebra", "max_items": 8},
    ]  # fmt: skip
    return out, run_training(TINY, demo_out, out, {**FAST, "merge": True, "gates.capability": capability})


def test_tiny_qlora_run_end_to_end(trained, demo_out):
    out, metrics = trained
    assert metrics["steps"] == 12
    assert (
        metrics["records"]["train"]
        + metrics["records"]["heldout"]
        + len(metrics["records"]["fully_masked_dropped"])
        == json.loads((demo_out / "latest" / "manifest.json").read_text())["counts"]["kept"]
    )
    assert metrics["template"] == "chatml" and metrics["records"]["eval_sets"] == {"demo_eval": 16}
    before, after = metrics["eval_loss_before"]["heldout"], metrics["eval_loss_after"]["heldout"]
    assert after < before - 0.3
    assert metrics["train_loss"][-1]["loss"] < metrics["train_loss"][0]["loss"]
    assert [e["step"] for e in metrics["eval_loss"]] == [0, 6, 12]
    assert all(set(e["loss"]) == {"heldout", "demo_eval"} for e in metrics["eval_loss"])
    assert metrics["eval_loss"][-1]["loss"] == metrics["eval_loss_after"]
    assert metrics["tokens_seen"] > 0 and metrics["tokens_per_second"] > 0
    assert 0 < metrics["periodic_eval_seconds"] < metrics["train_seconds"] + metrics["periodic_eval_seconds"]
    phases = metrics["seconds"]  # where the wall time went, phase by phase
    assert list(phases) == [
        "load", "encode", "setup", "eval_before", "train", "eval_after", "save", "gates"
    ]  # fmt: skip
    assert sum(phases.values()) == pytest.approx(metrics["wall_seconds"], abs=0.05)
    assert phases["train"] >= metrics["train_seconds"] and all(v >= 0 for v in phases.values())
    assert set(metrics["versions"]) >= {"torch", "peft", "trl", "bitsandbytes"}
    for name in (
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "metrics.json",
        "loss.png",
    ):
        assert (out / name).is_file(), name
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 16 and config["lora_alpha"] == 32
    assert sorted(config["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    with safe_open(str(out / "adapter" / "adapter_model.safetensors"), "pt") as saved:
        dtypes = {saved.get_tensor(name).dtype for name in saved.keys()}  # noqa: SIM118 (not iterable)
    assert dtypes == {torch.float32}  # float32 compute trains float32 adapters (TRL casts QLoRA's to bf16)
    gates = {g["name"]: g for g in metrics["gates"]["gates"]}
    assert list(gates) == [
        "heldout_loss",
        "heldout_perplexity",
        "capability:arc",
        "capability:algebra",
        "accuracy:demo_eval",
        "format_compliance",
        "refusal_rate",
        "stop_rate",
        "latency_ms_per_token",
    ]
    # no threshold in this recipe: reported (better than the base model, so not failed either)
    assert (
        gates["heldout_loss"]["passed"] is None
        and gates["heldout_loss"]["value"] < gates["heldout_loss"]["base"]
    )
    assert gates["heldout_loss"]["worse_than_base"] is False
    assert (
        gates["format_compliance"]["value"] == 0.0
    )  # a story model writes no JSON; the recipe does not judge it
    assert gates["format_compliance"]["threshold"] is None


def test_capability_gates_score_tuned_and_base(trained):
    _, metrics = trained
    gates = {g["name"]: g for g in metrics["gates"]["gates"]}
    arc, algebra = gates["capability:arc"], gates["capability:algebra"]
    assert (arc["metric"], arc["items"], algebra["metric"], algebra["items"]) == ("acc_norm", 8, "acc", 8)
    for gate in (arc, algebra):
        assert (
            gate["value"] == gate["tuned_scores"][gate["metric"]]
            and gate["base"] == gate["base_scores"][gate["metric"]]
        )
        assert all(round(gate[k] * 8) == gate[k] * 8 for k in ("value", "base"))  # a share of 8 items
        assert gate["worse_than_base"] == (gate["value"] < gate["base"] - 0.02)


def test_multiple_choice_items_load_as_lm_eval_renders_them(shared_data):
    from curate.train.capability import load_items

    arc = load_items(shared_data / "eval/foundry_arc_challenge.jsonl.gz", "arc")
    assert len(arc) == 1172 and arc[0].gold == 2
    assert arc[0].context.startswith("Question: An astronomer observes") and arc[0].context.endswith(
        "\nAnswer:"
    )
    assert arc[0].choices[0] == " Planetary density will decrease." and arc[0].lengths[0] == 32
    algebra = load_items(shared_data / "eval/mmlu_abstract_algebra_test.csv.gz", "mmlu", "abstract algebra")
    assert len(algebra) == 100 and algebra[0].gold == 1 and algebra[0].choices == [" A", " B", " C", " D"]
    assert algebra[0].context == (
        "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
        "Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q."
        "\nA. 0\nB. 4\nC. 2\nD. 6\nAnswer:"
    )


def test_batched_loglikelihoods_equal_one_pair_at_a_time(stories, tokenizer, shared_data):
    """Padding, batching and the split of context and continuation change no score: every pair is
    compared with a forward pass of that pair alone."""
    from transformers import AutoModelForCausalLM

    from curate.train.capability import accuracy, load_items, loglikelihoods, pair_tokens

    model = AutoModelForCausalLM.from_pretrained(str(stories), dtype=torch.float32).eval()
    model.resize_token_embeddings(len(tokenizer))
    items = load_items(shared_data / "eval/foundry_arc_challenge.jsonl.gz", "arc")[:6]
    items += load_items(shared_data / "eval/mmlu_sociology_test.csv.gz", "mmlu", "sociology")[:4]
    pairs = [(item.context, choice) for item in items for choice in item.choices]
    batched = loglikelihoods(model, tokenizer, pairs, batch_size=5, max_len=512)
    alone = []
    with torch.inference_mode():
        for context, continuation in pairs:
            ids, n = pair_tokens(tokenizer, context, continuation)
            logits = model(input_ids=torch.tensor([ids[:-1]])).logits[0].float()
            logprobs = torch.log_softmax(logits[len(ids) - 1 - n :], dim=-1)
            alone.append(float(logprobs.gather(1, torch.tensor(ids[-n:])[:, None]).sum()))
    assert batched == pytest.approx(alone, abs=1e-3)
    scores = accuracy(model, tokenizer, items, batch_size=7, max_len=512)
    picks = []
    at = 0
    for item in items:
        mine = alone[at : at + len(item.choices)]
        at += len(item.choices)
        picks.append(mine.index(max(mine)) == item.gold)
    assert scores["acc"] == sum(picks) / len(items) and scores["items"] == 10


def test_adapter_loads_back_and_the_gates_run_again(trained, version, tmp_path):
    from curate.train.evaluation import run_eval

    out, metrics = trained
    report = run_eval(None, out / "adapter", None, tmp_path)
    assert (tmp_path / "gates.json").is_file()
    gates = {g["name"]: g for g in report["gates"]}
    trained_gates = {g["name"]: g for g in metrics["gates"]["gates"]}
    assert gates["heldout_loss"]["value"] == pytest.approx(trained_gates["heldout_loss"]["value"], rel=1e-3)
    assert gates["heldout_loss"]["base"] == pytest.approx(trained_gates["heldout_loss"]["base"], rel=1e-3)
    assert report["samples"]["format"][0]["tuned"].strip()  # the reloaded adapter generates text
    assert report["samples"]["format"][0]["tuned"] == metrics["gates"]["samples"]["format"][0]["tuned"]


def test_merged_weights_hold_the_adapter(trained):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = trained
    merged = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(out / "merged")
    assert tok.eos_token == "<|im_end|>" and len(tok) == merged.get_input_embeddings().weight.shape[0] == 514
    assert "lora" not in " ".join(n for n, _ in merged.named_parameters())
    base = AutoModelForCausalLM.from_pretrained(out / ".base" / next((out / ".base").iterdir()).name)
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    # the trained end-of-turn embedding row moved away from its mean initialisation
    mean_row = base.get_input_embeddings().weight.mean(0)
    assert not torch.allclose(merged.get_input_embeddings().weight[eot], mean_row, atol=1e-3)
    # merged = base + (alpha / r) * B @ A, from the saved adapter
    from safetensors.torch import load_file

    lora = load_file(out / "adapter" / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    delta = 2.0 * lora[f"{key}.lora_B.weight"].float() @ lora[f"{key}.lora_A.weight"].float()
    assert delta.abs().max() > 1e-3
    q_delta = merged.model.layers[0].self_attn.q_proj.weight - base.model.layers[0].self_attn.q_proj.weight
    torch.testing.assert_close(q_delta, delta, atol=2e-2, rtol=0.05)


def test_gate_helpers():
    from curate.text.refusals import declines
    from curate.train.gates import final_answer, json_of

    assert final_answer("Natalia sold 48/2 = 24 clips in May.\n#### 72") == "72"
    assert final_answer("so the total is 1,234 dollars") == "1234"
    assert final_answer("The answer is 18.0") == "18"
    assert declines("I'm sorry, but I can't help with that.")
    assert declines("I cannot provide instructions for making weapons.")
    assert not declines("Sure! Here is a recipe for pancakes.")
    assert json_of('```json\n{"a": 1}\n```') == {"a": 1}
    with pytest.raises(ValueError):
        json_of("name: Ada")


def test_the_compiled_blocks_are_the_decoder_layers_even_beside_a_longer_list(stories, tokenizer):
    """A mixture of experts can hold more experts in a layer than the model has layers: the decoder
    layers are found by the class transformers names in `_no_split_modules`, not by length."""
    from curate.train.compile import decoder_layers
    from curate.train.model import load_model

    model = load_model(str(stories), load_recipe(TINY), tokenizer)
    layers = list(model.model.layers)
    assert decoder_layers(model) == layers and len(layers) == 5
    model.model.layers[0].mlp.experts = torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in range(8))
    assert decoder_layers(model) == layers
    for module in model.modules():  # a model that names none (the outer and inner model both do): by length
        module._no_split_modules = None
    assert len(decoder_layers(model)) == 8


def test_compiled_layers_train_to_the_same_losses(demo_out, tmp_path, monkeypatch):
    """`compile: true` trains the decoder layers compiled (inductor, as on a GPU; checkpointed) and to
    the same losses as eager, step by step; the evaluation in the middle of training and everything after it
    (scoring, generation, the next run on the shared base) run the layers eager."""
    from transformers import TrainerCallback

    from curate.train.compile import decoder_layers
    from curate.train.session import BaseModels
    from curate.train.trainer import run_training

    class CompiledDuringSteps(TrainerCallback):
        def __init__(self) -> None:
            self.seen: list[bool] = []

        def on_step_end(self, args, state, control, model=None, **kwargs):
            self.seen.append(all(layer._compiled_call_impl is not None for layer in decoder_layers(model)))

    from curate.train import gates

    scored_compiled = []  # per scoring pass of an evaluation: whether any layer ran compiled
    score = gates.summed_losses

    def watched_scoring(model, *args, **kwargs):
        scored_compiled.append(any(layer._compiled_call_impl is not None for layer in decoder_layers(model)))
        return score(model, *args, **kwargs)

    monkeypatch.setattr(gates, "summed_losses", watched_scoring)
    bases = BaseModels(tmp_path / "base")
    short = {**FAST, "max_steps": 4, "eval_steps": 2, "gates.max_new_tokens": 2, "gates.max_items": 2}
    short["gradient_checkpointing"] = True  # as on a GPU: the compiled layer is also recomputed
    watch = CompiledDuringSteps()
    runs = []
    for compiled in (True, False, True):  # the third: compiled again on the reused base, as in an ablation
        settings = {**short, "compile": compiled}
        out = tmp_path / str(len(runs))
        runs.append(run_training(TINY, demo_out, out, settings, False, bases=bases, callbacks=[watch]))
        layers = decoder_layers(bases.current.model)
        assert layers and all(layer._compiled_call_impl is None for layer in layers)
    assert watch.seen == [True] * 4 + [False] * 4 + [True] * 4
    assert len(scored_compiled) >= 6 and not any(scored_compiled)  # evaluations ran eager, mid-training too
    compiled, eager, again = runs
    assert [r["loss"] for r in again["train_loss"]] == pytest.approx(
        [r["loss"] for r in compiled["train_loss"]]
    )
    assert [r["step"] for r in compiled["train_loss"]] == [1, 2, 3, 4]
    for a, b in zip(compiled["train_loss"], eager["train_loss"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    assert len(compiled["eval_loss"]) == len(eager["eval_loss"]) >= 3  # before, at step 2, after
    assert compiled["eval_loss_after"]["heldout"] == pytest.approx(
        eager["eval_loss_after"]["heldout"], rel=1e-4
    )


def test_train_json_prints_metrics_and_nothing_else(demo_out, tmp_path):
    """stdout is metrics.json alone (the trainer's per-step log dicts once went there) and stderr
    holds no library chatter: no bars, deprecation warnings or the bitsandbytes kernel notice."""
    import subprocess
    import sys

    settings = ["max_steps=2", "eval_steps=2", "gates.max_new_tokens=4", "gates.max_items=2"]
    cmd = [sys.executable, "-m", "curate", "train", str(TINY), "--data", str(demo_out)]
    cmd += ["--out", str(tmp_path), "--json", *(a for s in settings for a in ("--set", s))]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True)
    assert json.loads(done.stdout)["steps"] == 2
    assert done.stderr == ""


def test_a_killed_training_run_resumes_from_its_last_checkpoint(demo_out, tmp_path):
    """SIGKILL mid-training: the next run of the same command resumes from the last complete
    checkpoint and says so; changed settings start over and say that; a finished run leaves no
    checkpoints behind."""
    import signal
    import subprocess
    import sys

    settings = [  # 16 steps of half the tiny batch: killed after step 8 (or 4), 8 steps are left to go on
        "max_steps=16",
        "save_steps=4",
        "micro_batch_size=4",
        "eval_steps=100",
        "gates.max_new_tokens=4",
        "gates.max_items=2",
    ]

    def command(out: Path, *more: str) -> list[str]:
        cmd = [
            sys.executable,
            "-m",
            "curate",
            "train",
            str(TINY),
            "--data",
            str(demo_out),
            "--out",
            str(out),
        ]
        return cmd + [a for s in [*settings, *more] for a in ("--set", s)]

    def killed_after(out: Path, step: int) -> None:
        proc = subprocess.Popen(command(out), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        saved = out / "checkpoints" / f"checkpoint-{step}" / "trainer_state.json"
        deadline = time.time() + 600
        while not saved.is_file() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL and saved.is_file()
        assert not (out / "metrics.json").exists() and not (out / "adapter").exists()

    killed_after(tmp_path, 8)
    again = subprocess.run(command(tmp_path), cwd=REPO, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["resumed_from_step"] >= 8 and metrics["steps"] == 16
    assert f"resuming from step {metrics['resumed_from_step']}" in again.stderr
    assert (
        not (tmp_path / "checkpoints").exists() and (tmp_path / "adapter" / "adapter_config.json").is_file()
    )

    other = tmp_path / "other"
    killed_after(other, 4)
    changed = subprocess.run(command(other, "learning_rate=0.005"), cwd=REPO, capture_output=True, text=True)
    assert changed.returncode == 0, changed.stderr[-2000:]
    assert "starting over" in changed.stderr
    assert json.loads((other / "metrics.json").read_text())["resumed_from_step"] is None


def test_checkpoints_follow_the_clock_unless_save_steps_is_set(monkeypatch):
    """By default a checkpoint is asked for once checkpoint_minutes passed since the start or the
    last one, never before: a run shorter than that (an ablation's) writes none."""
    from types import SimpleNamespace

    from curate.train import trainer as trainer_mod

    now = [1000.0]
    monkeypatch.setattr(trainer_mod.time, "monotonic", lambda: now[0])
    clock = trainer_mod._checkpoint_clock(2.0)
    control = SimpleNamespace(should_save=False)
    clock.on_train_begin(None, None, control)
    saves = []
    for seconds in (30, 60, 119, 121, 200, 242):
        now[0] = 1000.0 + seconds
        control.should_save = False
        clock.on_step_end(None, None, control)
        saves.append(control.should_save)
    assert saves == [False, False, False, True, False, True]
