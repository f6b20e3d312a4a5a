"""Training data from a dataset version: conversations, the held-out split, and token-level loss masks.

Masks come from the rendered template (`curate.templates.render` spans mapped onto the tokenizer's
offsets), so loss falls on assistant content and its end-of-turn token only, for any template.
Nothing here imports polars: the GPU machine reads a version with pyarrow and json alone.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from curate.errors import CurateError
from curate.records import message, record_id, train_messages
from curate.templates import render
from curate.train.recipe import TrainRecipe
from curate.versions import resolve_version

IGNORE = -100


@dataclass
class Version:
    """A dataset version on disk: its folder, manifest and training conversations with their ids."""

    path: Path
    manifest: dict
    ids: list[str]
    conversations: list[list[dict]]

    @property
    def template(self) -> str | None:
        """The chat template the version was normalized for (the normalize stage's `template`)."""
        if self.manifest.get("template"):
            return self.manifest["template"]
        for stage in (self.manifest.get("recipe") or {}).get("stages") or []:
            if isinstance(stage, dict) and isinstance(stage.get("normalize"), dict):
                return stage["normalize"].get("template")
        return None

    @property
    def eval_sets(self) -> list[dict]:
        return list((self.manifest.get("recipe") or {}).get("eval_sets") or [])

    @property
    def eval_base_dir(self) -> Path:
        """Where the pipeline recipe's relative eval-set paths are read from (its folder)."""
        recipe_path = self.manifest.get("recipe_path")
        return Path(recipe_path).resolve().parent if recipe_path else self.path


def load_version(path: str | Path) -> Version:
    """A version's conversations as train.jsonl words them, with their record ids: read from
    data.parquet (rows in data order, ids included), else from train.jsonl (ids recomputed)."""
    folder = resolve_version(path)
    manifest_path = folder / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    reading = "data.parquet" if (folder / "data.parquet").is_file() else "train.jsonl"
    if manifest.get("files"):
        from curate.versions import verify_version

        if problems := verify_version(folder, [reading]):
            raise CurateError(
                f"{folder.name}: {'; '.join(problems)}",
                hint="training reads a version only as written; rebuild it with curate run",
            )
    if reading == "data.parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(folder / "data.parquet", columns=["id", "messages"])
        conversations = [train_messages(m) for m in table["messages"].to_pylist()]
        return Version(folder, manifest, table["id"].to_pylist(), conversations)
    conversations = []
    with open(folder / "train.jsonl", encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                conversations.append(json.loads(line)["messages"])
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CurateError(f"{folder / 'train.jsonl'}:{n}: not a messages line ({exc})") from None
    ids = [record_id([_canonical(m) for m in conv]) for conv in conversations]
    return Version(folder, manifest, ids, conversations)


def _canonical(m: dict) -> dict:
    return message(m["role"], m.get("content") or "", m.get("tool_calls"), m.get("name"))


def in_holdout(rid: str, fraction: float, salt: str) -> bool:
    """Whether a record id falls in the held-out split: a salted hash, so it is stable across runs."""
    digest = hashlib.blake2b(f"{salt}:{rid}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < fraction


def split_holdout(
    version: Version, fraction: float, max_records: int, salt: str
) -> tuple[list[int], list[int]]:
    """Row indices (train, held out); the held-out rows are capped at `max_records`, the rest train."""
    held = [i for i, rid in enumerate(version.ids) if in_holdout(rid, fraction, salt)]
    held = sorted(held, key=lambda i: version.ids[i])[:max_records]
    held_set = set(held)
    train = [i for i in range(len(version.ids)) if i not in held_set]
    if not train:
        raise CurateError("the held-out split took every record", hint="lower holdout.fraction")
    return train, sorted(held)


def token_labels(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    """For each token's character range, whether it overlaps a trained span (a token that starts in the
    prompt but ends in the answer is trained: the model must produce it to write the answer)."""
    out = []
    k = 0
    for start, end in offsets:
        while k < len(spans) and spans[k][1] <= start:
            k += 1
        out.append(k < len(spans) and spans[k][0] < max(end, start + 1))
    return out


def encode(messages: list[dict], tokenizer: Any, template: Any, max_len: int) -> dict:
    """Token ids and labels (-100 where not trained) of one conversation, cut to `max_len` tokens."""
    rendered = render(messages, template)
    enc = tokenizer(rendered.text, add_special_tokens=False, return_offsets_mapping=True)
    trained = token_labels(enc["offset_mapping"], rendered.spans)
    ids = enc["input_ids"][:max_len]
    labels = [t if keep else IGNORE for t, keep in zip(ids, trained[:max_len], strict=False)]
    return {"input_ids": ids, "labels": labels}


def encode_all(
    conversations: list[list[dict]],
    ids: list[str],
    tokenizer: Any,
    template: Any,
    max_len: int,
    on_empty: str,
) -> tuple[list[dict], list[str]]:
    """Encode every conversation; an example with no trained token is an error (or dropped and named)."""
    rows, empty = [], []
    for rid, conv in zip(ids, conversations, strict=False):
        row = encode(conv, tokenizer, template, max_len)
        if all(label == IGNORE for label in row["labels"]):
            empty.append(rid)
            continue
        rows.append(row)
    if empty and on_empty == "error":
        raise CurateError(
            f"{len(empty)} example(s) would train on nothing: every label is masked "
            f"(no assistant token within {max_len} tokens), e.g. record {', '.join(empty[:5])}",
            hint="raise sequence_len, filter long prompts out of the version, or set fully_masked: drop",
        )
    return rows, empty


def load_eval_items(spec: dict, base_dir: Path) -> list[dict]:
    """Items {id, question, answer} of a recipe's eval set (read by curate.evalsets)."""
    from curate.evalsets import EvalSetSpec, load_eval_set

    items = load_eval_set(EvalSetSpec.from_recipe(spec, f"eval_sets.{spec.get('name')}"), base_dir).items
    return [{"id": it.id, "question": it.question, "answer": it.answer} for it in items]


def eval_references(recipe: TrainRecipe, version: Version | None) -> list[tuple[str, list[dict]]]:
    """The eval sets a training run is judged by, each as (name, its items with both a question and
    an answer): the training recipe's own `eval_sets`, else those of the version's pipeline recipe."""
    if recipe.eval_sets is not None:
        specs, base = recipe.eval_sets, recipe.base_dir
    elif version is not None:
        specs, base = version.eval_sets, version.eval_base_dir
    else:
        specs, base = [], recipe.base_dir
    return [
        (spec["name"], [it for it in load_eval_items(spec, base) if it["question"] and it["answer"]])
        for spec in specs
    ]
