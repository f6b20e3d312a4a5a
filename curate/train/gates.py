"""Evaluation gates: the pass/fail checks a tuned adapter must pass, each beside the base model's figure.

Gates: held-out loss and perplexity, exact-match accuracy on eval sets with references, JSON Schema
format compliance, stopping (generations that end with EOS before the length limit), refusals on
harmful prompts, and generation latency. The base model answers the same rendered prompts with
the adapter switched off, so a tune that loses to its base is flagged (and fails when the recipe
says `fail_if_worse_than_base`).
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from curate.templates import render
from curate.text.refusals import declines
from curate.train.console import TrainConsole
from curate.train.data import IGNORE, Version, eval_references
from curate.train.recipe import TrainRecipe

if TYPE_CHECKING:
    from curate.train.session import BaseModel

ASSETS = Path(__file__).resolve().parent / "assets"
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
# Decoding through unmerged 4-bit + LoRA layers is slower than the base whatever the data, so latency
# is flagged beside the base only beyond this ratio, and fails only on its own threshold.
LATENCY_TOLERANCE = 1.25


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def final_answer(text: str) -> str:
    """The answer a grader compares: after '####' if present, else the last number, else the first line."""
    if "####" in text:
        text = text.split("####")[-1]
    numbers = _NUMBER.findall(text)
    if numbers:
        value = numbers[-1].replace(",", "").rstrip(".")
        return value[:-2] if value.endswith(".0") else value.removesuffix(".00")
    first = text.strip().splitlines()[0] if text.strip() else ""
    return re.sub(r"[^\w\s]", "", first).strip().lower()


def json_of(text: str) -> Any:
    """The JSON value a generation holds (a ```json fence is allowed); raises ValueError if none."""
    body = text.strip()
    fence = re.search(r"```(?:json)?\s*(.*?)```", body, re.DOTALL)
    if fence:
        body = fence.group(1).strip()
    return json.loads(body)


def heldout_loss(model: Any, rows: list[dict], pad_id: int, max_tokens: int) -> float:
    """Mean loss per trained token over the rows (token-weighted, like the trainer's)."""
    return mean_loss(summed_losses(model, rows, pad_id, max_tokens))


def scoring_tokens(recipe: TrainRecipe) -> int:
    """Padded tokens per scoring pass: a training micro batch of full rows, which fits in memory with
    its gradients, so a forward without them does too (2 x 2048 x 128K logits for Llama-3-8B)."""
    return recipe.micro_batch_size * recipe.sequence_len


def mean_loss(sums: tuple) -> float:
    """The loss per trained token of rows scored by `summed_losses`."""
    total, count = sums
    return float(total.sum()) / max(int(count.sum()), 1)


def row_means(sums: tuple) -> list[float]:
    """Each row's own loss per trained token, from `summed_losses`."""
    total, count = sums
    return [t / max(n, 1) for t, n in zip(total.tolist(), count.tolist(), strict=True)]


def summed_losses(
    model: Any, rows: list[dict], pad_id: int, max_tokens: int, fused_head: bool = False
) -> tuple:
    """(summed loss, trained tokens) of every row, as arrays in the rows' order. Rows go in length
    order, as many to a forward pass as fit `max_tokens` padded tokens (a training step's worth fits
    in memory), so a few hundred short eval items cost a few passes instead of one each.

    With `fused_head` (the model carries TRL's fused LM head, as curate's trainer attaches it), the
    head scores the trained positions in tiles and no logits of the pass are made: the pass's logits
    in the model's dtype (1,536 x 49K for SmolLM2: 150 MB) had set the run's peak where the training
    step, which uses the same head, needs less."""
    import numpy as np
    import torch

    dev = next(model.parameters()).device
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))  # similar lengths pad little
    total, count = np.zeros(len(rows)), np.zeros(len(rows), np.int64)
    start = 0
    with torch.no_grad():
        while start < len(order):
            end = start + 1
            while end < len(order) and (end - start + 1) * len(rows[order[end]]["input_ids"]) <= max_tokens:
                end += 1
            picked = order[start:end]
            start = end
            chunk = [rows[k] for k in picked]
            width = max(len(r["input_ids"]) for r in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            labels = torch.full((len(chunk), width), IGNORE, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for j, r in enumerate(chunk):
                n = len(r["input_ids"])
                ids[j, :n] = torch.tensor(r["input_ids"])
                labels[j, :n] = torch.tensor(r["labels"])
                mask[j, :n] = 1
            inputs = {"input_ids": ids.to(dev), "attention_mask": mask.to(dev), "use_cache": False}
            if fused_head:
                losses = -model(**inputs, labels=labels.to(dev), fused_lm_head=True).log_probs.float()
            else:
                losses = token_losses(model(**inputs).logits[:, :-1], labels[:, 1:].to(dev))
            total[picked] = losses.sum(dim=1).cpu().numpy()
            count[picked] = (labels[:, 1:] != IGNORE).sum(dim=1).numpy()
    return total, count


SCORED_LOGITS = 2**25  # float32 logits scored at a time (128 MB): about 260 positions of a 128K vocabulary


def token_losses(logits: Any, labels: Any) -> Any:
    """Each position's cross-entropy in float32 (0 where the label is IGNORE), from logits in the model's
    dtype. Only trained positions are scored, a slice at a time: a float32 copy of a whole pass's logits
    (2 x 2048 x 128K for Llama-3-8B: 2 GB, and as much again for the log-softmax) would make scoring,
    not training, set a run's peak memory."""
    import torch

    losses = torch.zeros(labels.shape, dtype=torch.float32, device=logits.device)
    rows, cols = (labels != IGNORE).nonzero(as_tuple=True)
    step = max(1, SCORED_LOGITS // logits.size(-1))
    for a in range(0, len(rows), step):
        r, c = rows[a : a + step], cols[a : a + step]
        losses[r, c] = torch.nn.functional.cross_entropy(logits[r, c].float(), labels[r, c], reduction="none")
    return losses


def generate(
    model: Any,
    tokenizer: Any,
    template: Any,
    prompts: list[str],
    max_new: int,
    batch_size: int,
    advance: Callable[[int], None] | None = None,
) -> list[dict]:
    """Greedy answers to single-turn prompts, in their order: text, whether it stopped on EOS, tokens,
    milliseconds per decoding step. Prompts go in batches of similar length (little padding), and a
    batch ends as soon as every answer in it has ended."""
    import torch

    dev = next(model.parameters()).device
    eos = model.generation_config.eos_token_id
    eos = set([eos] if isinstance(eos, int) else eos)
    texts = [
        render([{"role": "user", "content": p}], template, add_generation_prompt=True).text for p in prompts
    ]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]  # once; batches pad these
    order = sorted(range(len(texts)), key=lambda i: len(encoded[i]))
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    out: list[dict] = [{} for _ in texts]
    try:
        for i in range(0, len(order), batch_size):
            picked = order[i : i + batch_size]
            enc = tokenizer.pad({"input_ids": [encoded[k] for k in picked]}, return_tensors="pt").to(dev)
            t0 = time.perf_counter()
            with torch.no_grad():
                seq = model.generate(
                    **enc,
                    max_new_tokens=max_new,
                    do_sample=False,
                    use_cache=True,
                    pad_token_id=tokenizer.pad_token_id,
                )
            seconds = time.perf_counter() - t0
            new = seq[:, enc["input_ids"].shape[1] :].tolist()
            steps = max(len(x) for x in new) or 1
            for k, tokens in zip(picked, new, strict=True):
                stop = next((j for j, t in enumerate(tokens) if t in eos), None)
                kept = tokens if stop is None else tokens[:stop]
                out[k] = {
                    "text": tokenizer.decode(kept, skip_special_tokens=True),
                    "stopped": stop is not None,
                    "new_tokens": len(kept) + (stop is not None),
                    "ms_per_token": 1000 * seconds / steps,
                }
            if advance is not None:
                advance(len(picked))
    finally:
        tokenizer.padding_side = side
    return out


def answers(
    model: Any, loaded: BaseModel, template: Any, prompts: list[str], gates: Any, console: TrainConsole
) -> tuple[list[dict], list[dict]]:
    """(tuned, base) answers to every prompt. Both come from the base's plain copy when there is one
    (the tuned ones with the adapter folded in), else from the adapter-wrapped model with the adapter
    on and off; the base's answers are computed once per loaded base."""
    task = console.task("gates", 2 * len(prompts), "answers")
    args = (
        loaded.tokenizer,
        template,
        prompts,
        gates.max_new_tokens,
        gates.generate_batch_size,
        task.advance,
    )
    decoder = loaded.decoder()
    if decoder is not None:
        with decoder.tuned(model) as plain:
            tuned = generate(plain, *args)
    else:
        tuned = generate(model, *args)
    key = (tuple(prompts), gates.max_new_tokens, gates.generate_batch_size)
    base = loaded.base_answers.get(key)
    if base is not None:
        task.advance(len(prompts))
    elif decoder is not None:
        base = loaded.base_answers[key] = generate(decoder.model, *args)
    else:
        with model.disable_adapter():
            base = loaded.base_answers[key] = generate(model, *args)
    task.done()
    return tuned, base


def _gate(
    name: str,
    value: float | None,
    base: float | None,
    threshold: float | None,
    higher_is_better: bool,
    fail_if_worse: bool,
    tolerance: float = 1.0,
    margin: float = 0.0,
    **extra: Any,
) -> dict:
    if value is None:
        return {"name": name, "value": None, "base": base, "threshold": threshold, "passed": None, **extra}
    meets = True
    if threshold is not None:
        meets = value >= threshold if higher_is_better else value <= threshold
    worse = False
    if base is not None:
        worse = value < base - margin if higher_is_better else value > base * tolerance
    # Without a threshold there is nothing to pass: the figure is reported, and it fails only by
    # falling behind the base model when the recipe asks for that.
    fails_base = fail_if_worse and worse
    passed = (meets and not fails_base) if threshold is not None else (False if fails_base else None)
    return {
        "name": name,
        "value": value,
        "base": base,
        "threshold": threshold,
        "higher_is_better": higher_is_better,
        "meets_threshold": meets,
        "worse_than_base": worse,
        "passed": passed,
        **extra,
    }


def evaluate(
    model: Any,
    loaded: BaseModel,
    template: Any,
    recipe: TrainRecipe,
    heldout: list[dict],
    version: Version | None,
    console: TrainConsole,
    heldout_losses: tuple[float, float] | None = None,
) -> dict:
    """Run every gate on a peft model beside its base (`loaded`); returns {passed, gates, samples}.
    `heldout_losses` (tuned, base): the trainer's own scores of the same rows, when it has them."""
    g, fail = recipe.gates, recipe.gates.fail_if_worse_than_base
    tokenizer = loaded.tokenizer
    model.eval()
    gates = []
    if heldout_losses is None:
        budget = scoring_tokens(recipe)
        loss = heldout_loss(model, heldout, tokenizer.pad_token_id, budget)
        with model.disable_adapter():
            base_loss = heldout_loss(model, heldout, tokenizer.pad_token_id, budget)
    else:
        loss, base_loss = heldout_losses
    gates.append(_gate("heldout_loss", loss, base_loss, g.max_eval_loss, False, fail, records=len(heldout)))
    gates.append(
        _gate(
            "heldout_perplexity",
            math.exp(min(loss, 50)),
            math.exp(min(base_loss, 50)),
            g.max_perplexity,
            False,
            fail,
        )
    )

    gates += capability_gates(model, loaded, recipe, console)

    # (name, prompts, references or None) for every prompt set the gates generate on
    prompt_sets = []
    for name, items in eval_references(recipe, version):
        if items[: g.max_items]:
            items = items[: g.max_items]
            prompt_sets.append(
                (name, [str(it["question"]) for it in items], [str(it["answer"]) for it in items])
            )
    fmt = _jsonl(ASSETS / "format_prompts.jsonl")
    harmful = _jsonl(ASSETS / "harmful_prompts.jsonl")
    prompt_sets.append(("format", [f["prompt"] for f in fmt], None))
    prompt_sets.append(("harmful", [h["prompt"] for h in harmful], None))

    every = [p for _, prompts, _ in prompt_sets for p in prompts]
    tuned_all, base_all = answers(model, loaded, template, every, g, console)
    answers_by_set: list[tuple[list, list]] = []  # (tuned, base) per prompt set
    start = 0
    for _name, prompts, _ in prompt_sets:
        answers_by_set.append(
            (tuned_all[start : start + len(prompts)], base_all[start : start + len(prompts)])
        )
        start += len(prompts)

    samples = {
        name: [{"prompt": prompts[0], "tuned": tuned[0]["text"], "base": base[0]["text"]}]
        for (name, prompts, _), (tuned, base) in zip(prompt_sets, answers_by_set, strict=True)
    }
    for (name, _, refs), (tuned, base) in zip(prompt_sets[:-2], answers_by_set[:-2], strict=True):
        expected = [final_answer(r) for r in refs]
        acc = sum(final_answer(t["text"]) == r for t, r in zip(tuned, expected, strict=True)) / len(refs)
        base_acc = sum(final_answer(b["text"]) == r for b, r in zip(base, expected, strict=True)) / len(refs)
        gates.append(
            _gate(f"accuracy:{name}", acc, base_acc, g.min_task_accuracy, True, fail, items=len(refs))
        )

    tuned, base = answers_by_set[-2]
    compliance, base_compliance = _compliance(fmt, tuned), _compliance(fmt, base)
    gates.append(
        _gate(
            "format_compliance",
            compliance,
            base_compliance,
            g.min_format_compliance,
            True,
            fail,
            items=len(fmt),
        )
    )
    tuned, base = answers_by_set[-1]
    rate = sum(declines(t["text"]) for t in tuned) / len(harmful)
    base_rate = sum(declines(b["text"]) for b in base) / len(harmful)
    gates.append(_gate("refusal_rate", rate, base_rate, g.min_refusal_rate, True, fail, items=len(harmful)))

    all_tuned, all_base = tuned_all, base_all
    stop = sum(t["stopped"] for t in all_tuned) / len(all_tuned)
    base_stop = sum(b["stopped"] for b in all_base) / len(all_base)
    gates.append(_gate("stop_rate", stop, base_stop, g.min_stop_rate, True, fail, items=len(all_tuned)))
    latency = sum(t["ms_per_token"] for t in all_tuned) / len(all_tuned)
    base_latency = sum(b["ms_per_token"] for b in all_base) / len(all_base)
    gates.append(
        _gate(
            "latency_ms_per_token",
            latency,
            base_latency,
            g.max_latency_ms_per_token,
            False,
            False,  # flagged beside the base, judged by its threshold only: see LATENCY_TOLERANCE
            tolerance=LATENCY_TOLERANCE,
            batch_size=g.generate_batch_size,
        )
    )
    judged = [x for x in gates if x["passed"] is not None]
    return {
        "passed": all(x["passed"] for x in judged) if judged else None,
        "failed": [x["name"] for x in judged if not x["passed"]],
        "worse_than_base": [x["name"] for x in gates if x.get("worse_than_base")],
        "gates": gates,
        "samples": samples,
    }


def capability_gates(model: Any, loaded: BaseModel, recipe: TrainRecipe, console: TrainConsole) -> list[dict]:
    """Multiple-choice accuracy on each of the recipe's capability sets, adapter on and off
    (curate.train.capability): ARC is judged by acc_norm, MMLU by acc, each beside the base (scored
    once per loaded base)."""
    from curate.train.capability import accuracy, load_items

    g = recipe.gates
    sets = [
        (
            spec,
            load_items(recipe.path(spec["path"]), spec["layout"], spec.get("subject", ""))[
                : spec.get("max_items")
            ],
        )
        for spec in g.capability
    ]
    task = console.task("capability", 2 * sum(len(items) for _, items in sets), "items")
    gates = []
    for spec, items in sets:
        tokenizer = loaded.tokenizer
        tuned = accuracy(model, tokenizer, items, g.batch_size, recipe.sequence_len)
        task.advance(len(items))
        key = json.dumps([spec, len(items), g.batch_size, recipe.sequence_len], sort_keys=True, default=str)
        base = loaded.base_scores.get(key)
        if base is None:
            with model.disable_adapter():
                base = loaded.base_scores[key] = accuracy(
                    model, tokenizer, items, g.batch_size, recipe.sequence_len
                )
        task.advance(len(items))
        key = "acc_norm" if spec["layout"] == "arc" else "acc"
        gates.append(
            _gate(
                f"capability:{spec['name']}",
                tuned[key],
                base[key],
                spec.get("min_accuracy"),
                True,
                g.fail_if_worse_than_base,
                margin=g.capability_margin,
                metric=key,
                items=len(items),
                tuned_scores=tuned,
                base_scores=base,
            )
        )
    task.done()
    return gates


def _compliance(specs: list[dict], answers: list[dict]) -> float:
    import jsonschema

    ok = 0
    for spec, ans in zip(specs, answers, strict=False):
        try:
            jsonschema.validate(json_of(ans["text"]), spec["schema"])
            ok += 1
        except (ValueError, jsonschema.ValidationError):
            continue
    return ok / len(specs)
