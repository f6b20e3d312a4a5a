"""General capability: multiple-choice accuracy by log-likelihood, scored as lm-eval-harness does, so
a tune that teaches the format but costs knowledge shows up beside its base model.

Each choice is a continuation of the question's context; the model's summed log-probability of the
continuation's tokens picks the answer (no generation, no parsing). Two layouts, as lm-eval-harness
renders them zero-shot:

- `mmlu` (CSV rows: question, A, B, C, D, answer letter): the question, the four options as
  "A. ...", then "Answer:"; the continuations are " A" .. " D"; accuracy (`acc`).
- `arc` (llm-foundry JSONL: query "Question: ...", choices, gold index): "Question: ...\\nAnswer:";
  the continuations are " " + each choice's text; accuracy normalised by the choice's length in
  characters (`acc_norm`, lm-eval's headline for ARC), with plain `acc` beside it.

The continuation's tokens are those of context + continuation after the context's own tokens (as
lm-eval splits them), and every pair of a batch is scored in one forward pass.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from curate.errors import CurateError

LETTERS = ("A", "B", "C", "D")


@dataclass(frozen=True)
class Item:
    context: str
    choices: list[str]  # continuations, each starting with the space that separates it
    gold: int
    lengths: list[int]  # characters of each choice (for acc_norm)


def _text(path: Path) -> str:
    raw = path.read_bytes()
    return (gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw).decode("utf-8")


def load_items(path: str | Path, layout: str, subject: str = "") -> list[Item]:
    """The items of a multiple-choice file in one of the two layouts."""
    path = Path(path)
    if not path.is_file():
        raise CurateError(
            f"capability set {path}: no such file", hint="an MMLU CSV or an ARC JSONL (llm-foundry)"
        )
    if layout == "mmlu":
        head = (
            f"The following are multiple choice questions (with answers) about {subject}.\n\n"
            if subject
            else ""
        )
        items = []
        for row in csv.reader(io.StringIO(_text(path))):
            if len(row) != 6 or row[5].strip() not in LETTERS:
                raise CurateError(
                    f"{path}: an MMLU row is question, A, B, C, D, answer letter; got {row[:6]}"
                )
            options = "".join(f"\n{letter}. {text}" for letter, text in zip(LETTERS, row[1:5], strict=True))
            items.append(
                Item(f"{head}{row[0].strip()}{options}\nAnswer:", [f" {x}" for x in LETTERS],
                     LETTERS.index(row[5].strip()), [1, 1, 1, 1])
            )  # fmt: skip
        return items
    if layout == "arc":
        items = []
        for line in _text(path).splitlines():
            if line.strip():
                row = json.loads(line)
                choices = [str(c) for c in row["choices"]]
                items.append(
                    Item(f"{row['query']}\nAnswer:", [f" {c}" for c in choices], int(row["gold"]),
                         [len(c) for c in choices])
                )  # fmt: skip
        return items
    raise CurateError(f"unknown capability layout {layout!r}", hint="mmlu or arc")


def pair_tokens(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], int]:
    """Token ids of context + continuation, and how many at the end are the continuation's."""
    whole = tokenizer(context + continuation)["input_ids"]
    start = len(tokenizer(context)["input_ids"])
    return whole, max(1, len(whole) - start)


def loglikelihoods(
    model: Any, tokenizer: Any, pairs: list[tuple[str, str]], batch_size: int, max_len: int
) -> list[float]:
    """Summed log-probability of each continuation given its context (kept at most `max_len` tokens,
    cut from the left), pairs scored `batch_size` at a time."""
    import torch

    encoded = [pair_tokens(tokenizer, c, x) for c, x in pairs]
    encoded = [(ids[-max_len - 1 :], min(n, max_len)) for ids, n in encoded]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    scores = [0.0] * len(encoded)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            width = max(len(encoded[i][0]) - 1 for i in chunk)
            inputs = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, i in enumerate(chunk):
                ids = encoded[i][0][:-1]
                inputs[row, : len(ids)] = torch.tensor(ids)
                mask[row, : len(ids)] = 1
            logits = model(input_ids=inputs.to(device), attention_mask=mask.to(device)).logits
            for row, i in enumerate(chunk):  # float32 for the few scored positions only
                ids, n = encoded[i]
                end = len(ids) - 1
                picked = torch.log_softmax(logits[row, end - n : end].float(), dim=-1)
                target = torch.tensor(ids[len(ids) - n :], device=picked.device)
                scores[i] = float(picked.gather(1, target[:, None]).sum())
    return scores


def accuracy(model: Any, tokenizer: Any, items: list[Item], batch_size: int, max_len: int) -> dict:
    """{acc, acc_norm, items} of a model on multiple-choice items."""
    pairs = [(item.context, choice) for item in items for choice in item.choices]
    scores = loglikelihoods(model, tokenizer, pairs, batch_size, max_len)
    right = right_norm = 0
    at = 0
    for item in items:
        mine = scores[at : at + len(item.choices)]
        at += len(item.choices)
        right += max(range(len(mine)), key=mine.__getitem__) == item.gold
        normed = [s / max(1, n) for s, n in zip(mine, item.lengths, strict=True)]
        right_norm += max(range(len(normed)), key=normed.__getitem__) == item.gold
    return {"acc": right / len(items), "acc_norm": right_norm / len(items), "items": len(items)}
