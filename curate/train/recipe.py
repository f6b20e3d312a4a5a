"""Training recipes: YAML checked against schemas/train.schema.json, defaults filled, paths resolved.

A recipe is short and Axolotl-like (base model, 4-bit, LoRA, lengths, batch, schedule, budget,
gates). Overrides (the CLI's `--set key=value`) use dotted keys (`lora.r=8`) and are checked by the
same schema, so a typo fails before any model loads.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from curate.errors import RecipeError

_SCHEMA_NAME = "train.schema.json"


@lru_cache(maxsize=1)
def schema() -> dict:
    """The training-recipe JSON Schema (curate/schemas links to the repository's schemas/)."""
    path = Path(__file__).resolve().parents[1] / "schemas" / _SCHEMA_NAME
    if not path.is_file():
        raise RecipeError(f"{_SCHEMA_NAME} not found in the curate package", hint="reinstall curate")
    return json.loads(path.read_text())


@dataclass
class Lora:
    r: int = 16
    alpha: float = 32
    dropout: float = 0.05
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class Holdout:
    fraction: float = 0.05
    max_records: int = 500
    salt: str = "curate-holdout"


@dataclass
class Gates:
    max_eval_loss: float | None = None
    max_perplexity: float | None = None
    min_task_accuracy: float | None = None
    min_format_compliance: float | None = 1.0
    min_stop_rate: float | None = 0.95
    min_refusal_rate: float | None = 0.8
    max_latency_ms_per_token: float | None = None
    fail_if_worse_than_base: bool = True
    max_new_tokens: int = 256
    max_items: int = 50
    batch_size: int = 16
    generate_batch_size: int = 64
    capability: list[dict] = field(default_factory=list)  # [{name, path, layout, subject, max_items}]
    capability_margin: float = 0.02


@dataclass
class TrainRecipe:
    """A validated training recipe; `base_dir` is where its relative paths are read from."""

    base_model: str
    name: str = "train"
    tokenizer: str | None = None
    template: str | None = None
    load_in_4bit: bool = True
    bnb_4bit_quant_type: str = "nf4"
    bnb_4bit_use_double_quant: bool = True
    bnb_4bit_compute_dtype: str = "bfloat16"
    lora: Lora = field(default_factory=Lora)
    sequence_len: int = 2048
    micro_batch_size: int = 2
    gradient_accumulation_steps: int = 8
    learning_rate: float = 2e-4
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    num_epochs: float = 1
    max_tokens: int | None = None
    max_steps: int | None = None
    seed: int = 0
    packing: bool = True
    gradient_checkpointing: bool = True
    kernels: str = "auto"
    compile: bool = False
    fully_masked: str = "error"
    holdout: Holdout = field(default_factory=Holdout)
    eval_steps: int | None = None
    save_steps: int | None = None
    checkpoint_minutes: float = 10.0
    logging_steps: int = 1
    merge: bool = False
    eval_sets: list[dict] | None = None
    gates: Gates = field(default_factory=Gates)
    base_dir: Path = field(default_factory=Path.cwd)
    raw: dict = field(default_factory=dict)

    def path(self, value: str | None) -> str | None:
        """A recipe path made absolute against the recipe's folder, if it names an existing file there."""
        if value is None:
            return None
        local = (self.base_dir / value).resolve()
        return str(local) if local.exists() else value


def _set_dotted(data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise RecipeError(f"--set {key}: '{part}' is not a section")
    node[parts[-1]] = value


def _numbers_from_text(data: dict, node: dict) -> None:
    """YAML 1.1 reads `2e-4` as text; where the schema wants a number, read such text as one."""
    for key, value in list(data.items()):
        prop = node.get("properties", {}).get(key, {})
        kinds = prop.get("type", [])
        kinds = [kinds] if isinstance(kinds, str) else kinds
        if isinstance(value, dict):
            _numbers_from_text(value, prop)
        elif isinstance(value, str) and "number" in kinds:
            try:
                data[key] = float(value)
            except ValueError:
                pass


def load_recipe(source: str | Path | dict | None, overrides: dict | None = None) -> TrainRecipe:
    """Read, override, validate and fill a training recipe (a YAML path, a dict, or None: defaults)."""
    import jsonschema

    base_dir = Path.cwd()
    if source is None:
        data: dict = {}
    elif isinstance(source, dict):
        data = copy.deepcopy(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise RecipeError(f"training recipe not found: {path}", hint="see train/qlora-default.yaml")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise RecipeError(f"{path}: not valid YAML: {exc}") from None
        base_dir = path.resolve().parent
    if not isinstance(data, dict):
        raise RecipeError("a training recipe must be a YAML mapping")
    for key, value in (overrides or {}).items():
        _set_dotted(data, key, value)
    _numbers_from_text(data, schema())
    errors = sorted(jsonschema.Draft202012Validator(schema()).iter_errors(data), key=lambda e: list(e.path))
    if errors:
        err = errors[0]
        where = ".".join(str(p) for p in err.path) or "(top level)"
        raise RecipeError(f"training recipe, {where}: {err.message}", hint="see schemas/train.schema.json")
    data = copy.deepcopy(data)
    lora = Lora(**data.pop("lora", {}))
    holdout = Holdout(**data.pop("holdout", {}))
    gates = Gates(**data.pop("gates", {}))
    raw = copy.deepcopy({**data, "lora": vars(lora), "holdout": vars(holdout), "gates": vars(gates)})
    return TrainRecipe(**data, lora=lora, holdout=holdout, gates=gates, base_dir=base_dir, raw=raw)
