"""Eval sets: the benchmark items a recipe declares once, so they are never trained on.

A recipe lists them under `eval_sets:` as `{name, path, format?, fields?: {question, answer, id}}`.
`path` is a file (jsonl/json/csv, optionally .gz/.zst/.xz) or `hf:NAME` (a Hugging Face dataset,
with optional `config` and `split`). Without `fields`, the common benchmark shapes are recognised
from their keys: GSM8K, HumanEval, MT-Bench / Vicuna turns, IFEval, AlpacaEval, Arena-Hard,
TruthfulQA, MMLU CSV (no header) and ARC query/choices/gold. Every item gets a stable id (the
set's own id field, else its row number), its question text and, when the set has one, its answer.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import lzma
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from curate.configs import config_schema, make_config, option, schema_issues
from curate.errors import CurateError, Issue, RecipeError

FORMATS = ("auto", "jsonl", "json", "csv", "mmlu", "hf")
_FIELD_ROLES = ("question", "answer", "id")

# Known shapes, tried in order: (shape name, keys that identify it, question key, answer key, id key).
# A question key naming a list (MT-Bench turns) joins the turns; an answer key naming a list index
# (ARC gold) picks that choice.
_SHAPES: tuple[tuple[str, frozenset[str], str, str | None, str | None], ...] = (
    (
        "humaneval",
        frozenset({"task_id", "prompt", "canonical_solution"}),
        "prompt",
        "canonical_solution",
        "task_id",
    ),
    ("mt_bench", frozenset({"question_id", "turns"}), "turns", None, "question_id"),
    ("ifeval", frozenset({"key", "prompt", "instruction_id_list"}), "prompt", None, "key"),
    ("arena_hard", frozenset({"uid", "prompt"}), "prompt", None, "uid"),
    ("arc", frozenset({"query", "choices", "gold"}), "query", "gold", None),
    ("alpaca_eval", frozenset({"instruction", "output"}), "instruction", "output", None),
    ("truthfulqa", frozenset({"Question", "Best Answer"}), "Question", "Best Answer", None),
    ("gsm8k", frozenset({"question", "answer"}), "question", "answer", None),
    ("prompt", frozenset({"prompt"}), "prompt", None, None),
    ("question", frozenset({"question"}), "question", None, None),
    ("instruction", frozenset({"instruction"}), "instruction", None, None),
)


@dataclass(frozen=True)
class EvalItem:
    id: str
    question: str
    answer: str | None = None


@dataclass(frozen=True)
class EvalSet:
    name: str
    items: list[EvalItem]
    shape: str  # the recognised shape (or "fields" when the recipe mapped them)

    def __len__(self) -> int:
        return len(self.items)


@dataclass
class EvalSetEntry:
    """One entry of the recipe's `eval_sets:` list, as written."""

    name: str = option(help="The eval set's name, as stages and reports refer to it.", minLength=1)
    path: str = option(help="A file (jsonl, json, csv; .gz, .zst, .xz) or hf:NAME.", minLength=1)
    format: Literal[FORMATS] = option(
        "auto", help="auto (detect), jsonl, json, csv, mmlu (header-less CSV) or hf."
    )
    fields: dict | None = option(
        None,
        help="Keys of each item's question, answer and id, e.g. {question: question, answer: answer}; "
        "without it the common benchmark shapes are recognised.",
    )
    split: str | None = option(None, help="hf: split (default test).")
    config: str | None = option(None, help="hf: config name.")

    def check(self) -> None:
        if self.fields is not None and "question" not in self.fields:
            raise ValueError("fields: 'question' is required when fields are given")


def eval_set_schema() -> dict:
    schema = config_schema(EvalSetEntry)
    key = {"type": "string", "minLength": 1}
    schema["properties"]["fields"].update(
        {
            "propertyNames": {"title": "role", "enum": list(_FIELD_ROLES)},
            "properties": dict.fromkeys(_FIELD_ROLES, key),
        }
    )
    schema["properties"]["format"]["title"] = "format"
    return schema


@dataclass(frozen=True)
class EvalSetSpec:
    """One `eval_sets:` entry of a recipe, checked, with its field mapping taken apart."""

    name: str
    path: str
    format: str = "auto"
    question: str | None = None
    answer: str | None = None
    id: str | None = None
    config: str | None = None
    split: str = "test"

    @classmethod
    def parse(cls, entry: Any, where: str) -> tuple[EvalSetSpec | None, list[Issue]]:
        """The spec of a recipe entry, or the issues that keep it from being one."""
        issues = schema_issues(eval_set_schema(), entry, where)
        if issues:
            return None, issues
        checked, issues = make_config(EvalSetEntry, entry, where)
        if issues:
            return None, issues
        fields = checked.fields or {}
        spec = cls(
            name=checked.name,
            path=checked.path,
            format="hf" if checked.path.startswith("hf:") else checked.format,
            question=fields.get("question"),
            answer=fields.get("answer"),
            id=fields.get("id"),
            config=checked.config,
            split=checked.split or "test",
        )
        return spec, []

    @classmethod
    def from_recipe(cls, entry: Any, where: str) -> EvalSetSpec:
        spec, issues = cls.parse(entry, where)
        if issues:
            raise RecipeError(issues)
        return spec


def load_eval_set(spec: EvalSetSpec, base_dir: Path) -> EvalSet:
    """Read an eval set into items with stable ids; empty questions are left out (nothing to match)."""
    rows, fmt = _read_rows(spec, Path(base_dir))
    if fmt == "mmlu":
        return EvalSet(spec.name, _mmlu_items(rows, spec), "mmlu")
    if not rows:
        raise CurateError(f"eval set {spec.name}: {spec.path} holds no rows", hint="check the path")
    if spec.question:
        shape, question, answer, ident = "fields", spec.question, spec.answer, spec.id
        missing = [k for k in (question, answer, ident) if k and k not in rows[0]]
        if missing:
            raise CurateError(
                f"eval set {spec.name}: field '{missing[0]}' is not in {spec.path}",
                hint=f"its keys are {', '.join(map(str, rows[0]))}",
            )
    else:
        shape, question, answer, ident = _detect(rows[0], spec)
    items = []
    for row_number, row in enumerate(rows):
        text = _question_text(row.get(question))
        if not text.strip():
            continue
        item_id = str(row[ident]) if ident and row.get(ident) is not None else str(row_number)
        items.append(EvalItem(item_id, _strip_label(text, shape), _answer_text(row, answer)))
    return EvalSet(spec.name, items, shape)


def load_eval_sets(entries: list[dict], base_dir: Path) -> list[EvalSet]:
    """All eval sets of a recipe (the raw `eval_sets:` entries), in order."""
    return [
        load_eval_set(EvalSetSpec.from_recipe(e, f"eval_sets[{i}]"), base_dir) for i, e in enumerate(entries)
    ]


def _detect(row: dict, spec: EvalSetSpec) -> tuple[str, str, str | None, str | None]:
    keys = set(row)
    for shape, needed, question, answer, ident in _SHAPES:
        if needed <= keys:
            return shape, question, answer, ident
    raise CurateError(
        f"eval set {spec.name}: no known benchmark shape has the keys {', '.join(map(str, row))}",
        hint="map them in the recipe: fields: {question: KEY, answer: KEY, id: KEY}",
    )


def _question_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # turns: strings, or chat messages with content
        parts = [v.get("content", "") if isinstance(v, dict) else str(v) for v in value]
        return "\n".join(p for p in parts if p)
    return str(value)


def _answer_text(row: dict, key: str | None) -> str | None:
    if not key or row.get(key) is None:
        return None
    value = row[key]
    choices = row.get("choices")
    if isinstance(value, int) and not isinstance(value, bool) and isinstance(choices, list):
        return str(choices[value]) if 0 <= value < len(choices) else None
    text = _question_text(value)
    return text if text.strip() else None


def _strip_label(text: str, shape: str) -> str:
    # ARC queries carry a "Question: " prompt label that is not part of the question itself.
    if shape == "arc" and text.startswith("Question:"):
        return text[len("Question:") :].strip()
    return text


def _mmlu_items(rows: list[list[str]], spec: EvalSetSpec) -> list[EvalItem]:
    items = []
    for row_number, row in enumerate(rows):
        if len(row) != 6 or row[5].strip() not in ("A", "B", "C", "D"):
            raise CurateError(
                f"eval set {spec.name}: row {row_number} of {spec.path} is not MMLU "
                "(question, A, B, C, D, answer)",
                hint="for a CSV with a header row use format: csv and map fields",
            )
        if row[0].strip():
            answer = row[1 + "ABCD".index(row[5].strip())]
            items.append(EvalItem(str(row_number), row[0], answer))
    return items


def _open_text(path: Path) -> io.TextIOBase:
    name = path.name
    if name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    if name.endswith(".xz"):
        return lzma.open(path, "rt", encoding="utf-8")
    if name.endswith(".zst"):
        import zstandard

        return io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(path.open("rb")), encoding="utf-8")
    return path.open("r", encoding="utf-8")


def _bare_suffix(path: Path) -> str:
    suffixes = [s for s in path.suffixes if s not in (".gz", ".xz", ".zst")]
    return suffixes[-1].lstrip(".") if suffixes else ""


def _read_rows(spec: EvalSetSpec, base_dir: Path) -> tuple[list, str]:
    if spec.format == "hf":
        return _read_hf(spec), "json"
    path = Path(spec.path).expanduser()
    path = path if path.is_absolute() else base_dir / path
    if not path.is_file():
        raise CurateError(
            f"eval set {spec.name}: {path} does not exist", hint="paths are relative to the recipe"
        )
    fmt = spec.format if spec.format != "auto" else _bare_suffix(path)
    try:
        with _open_text(path) as fh:
            if fmt == "jsonl":
                return [json.loads(line) for line in fh if line.strip()], fmt
            if fmt == "json":
                data = json.load(fh)
                rows = data.get("data", data.get("rows")) if isinstance(data, dict) else data
                if not isinstance(rows, list):
                    raise CurateError(f"eval set {spec.name}: {path} is JSON but not a list of items")
                return rows, fmt
            if fmt in ("csv", "mmlu"):
                rows = list(csv.reader(fh))
                if fmt == "mmlu" or (rows and _looks_like_mmlu(rows[0])):
                    return rows, "mmlu"
                header, body = rows[0], rows[1:]
                return [dict(zip(header, r, strict=False)) for r in body], "csv"
    except (json.JSONDecodeError, UnicodeDecodeError, csv.Error, OSError, EOFError) as exc:
        raise CurateError(f"eval set {spec.name}: cannot read {path}: {exc}") from None
    raise CurateError(
        f"eval set {spec.name}: cannot tell the format of {path.name}",
        hint="set format: jsonl, json, csv or mmlu",
    )


def _looks_like_mmlu(first_row: list[str]) -> bool:
    # MMLU's CSVs have no header: six columns, the last one the answer letter.
    return len(first_row) == 6 and first_row[5].strip() in ("A", "B", "C", "D")


def _read_hf(spec: EvalSetSpec) -> list[dict]:
    import datasets

    name = spec.path[len("hf:") :]
    try:
        data = datasets.load_dataset(name, spec.config, split=spec.split)
    except Exception as exc:  # the hub client raises many types; the user needs the message
        raise CurateError(
            f"eval set {spec.name}: cannot load {spec.path} (split {spec.split}): {exc}",
            hint="check the dataset name, config and split, or download it and give a file path",
        ) from None
    return list(data)
