"""`curate eval --adapter DIR`: load a trained adapter onto its base model and run the gates again."""

from __future__ import annotations

import json
from pathlib import Path

from curate.errors import CurateError
from curate.train.data import encode_all, load_version, split_holdout
from curate.train.recipe import load_recipe


def _saved_run(adapter_dir: Path) -> dict:
    for candidate in (adapter_dir / "train_recipe.json", adapter_dir.parent / "train_recipe.json"):
        if candidate.is_file():
            return json.loads(candidate.read_text())
    raise CurateError(
        f"{adapter_dir}: no train_recipe.json beside the adapter",
        hint="pass the adapter/ folder written by `curate train`, or give the training recipe",
    )


def run_eval(
    recipe_path: str | Path | None,
    adapter_dir: str | Path,
    data_version: str | Path | None = None,
    out_dir: str | Path | None = None,
    show_progress: bool = True,
    verbose: bool = False,
) -> dict:
    """Gates for an adapter; the held-out split comes from `data_version` (default: the one it trained on).
    Output as in `curate.train.trainer.run_training`."""
    from curate.train.console import TrainConsole

    with TrainConsole(show_progress, verbose) as console:
        return _evaluate(recipe_path, adapter_dir, data_version, out_dir, console)


def _evaluate(
    recipe_path: str | Path | None,
    adapter_dir: str | Path,
    data_version: str | Path | None,
    out_dir: str | Path | None,
    console,
) -> dict:
    from peft import PeftModel
    from transformers import AutoTokenizer

    from curate.train import gates
    from curate.train.model import Base, load_model
    from curate.train.session import BaseKey, BaseModel
    from curate.train.trainer import template_object

    adapter = Path(adapter_dir)
    if not (adapter / "adapter_config.json").is_file():
        raise CurateError(f"{adapter} is not an adapter folder (no adapter_config.json)")
    saved = _saved_run(adapter)
    stored = saved["recipe"]
    if recipe_path is not None:
        recipe = load_recipe(recipe_path)
        recipe.base_model, recipe.template = stored["base_model"], stored["template"]
    else:
        recipe = load_recipe({k: v for k, v in stored.items() if v is not None})
        recipe.base_dir = Path(saved["base_dir"])
    version = load_version(data_version or saved["version"])
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    tmpl = template_object(stored["template"], tokenizer)
    _, held_idx = split_holdout(
        version, recipe.holdout.fraction, recipe.holdout.max_records, recipe.holdout.salt
    )
    held, _ = encode_all(
        [version.conversations[i] for i in held_idx],
        [version.ids[i] for i in held_idx],
        tokenizer,
        tmpl,
        recipe.sequence_len,
        "drop",
    )
    if not held:
        raise CurateError("the held-out split of this version is empty", hint="pass a larger --data version")
    base = load_model(stored["base_model"], recipe, tokenizer)
    loaded = BaseModel(
        BaseKey.of(Base(stored["base_model"], str(adapter)), stored["template"], recipe),
        recipe,
        base,
        tokenizer,
        [],
    )
    model = PeftModel.from_pretrained(base, adapter)
    if recipe.load_in_4bit:
        _adapter_dtype_as_trained(model)
    result = gates.evaluate(model, loaded, tmpl, recipe, held, version, console)
    result["adapter"] = str(adapter)
    result["version"] = str(version.path)
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "gates.json").write_text(json.dumps(result, indent=1))
    return result


def _adapter_dtype_as_trained(model) -> None:
    # TRL trains QLoRA adapters in bf16 (the QLoRA paper's recipe); peft loads them back in fp32.
    # Matching the trained numerics makes the gates here reproduce the ones written after training.
    import torch

    for name, param in model.named_parameters():
        if "lora_" in name or "trainable_tokens" in name:
            param.data = param.data.to(torch.bfloat16)
