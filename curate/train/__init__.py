"""The bundled QLoRA trainer and its evaluation gates (torch and friends load only when called)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from curate.errors import CurateError

# What `curate train` and `curate eval` import, as the training extra installs it.
TRAINING_PACKAGES = ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate")


def require_training_extra() -> None:
    """A clear error, before anything loads, when the training extra is not installed."""
    missing = [name for name in TRAINING_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise CurateError(
            f"training needs packages that are not installed: {', '.join(missing)}",
            hint="pip install 'curate[train]' (without a GPU, install torch's CPU build first, as the "
            "README does: pip install torch==2.13.0)",
        )


def run_training(
    recipe_path: str | Path | None,
    data_version: str | Path,
    out_dir: str | Path,
    overrides: dict | None = None,
    show_progress: bool = True,
    verbose: bool = False,
) -> dict:
    """Train a QLoRA adapter on a version (see curate.train.trainer)."""
    require_training_extra()
    from curate.train.trainer import run_training as train

    return train(recipe_path, data_version, out_dir, overrides, show_progress, verbose)


def run_eval(
    recipe_path: str | Path | None,
    adapter_dir: str | Path,
    data_version: str | Path | None = None,
    out_dir: str | Path | None = None,
    show_progress: bool = True,
    verbose: bool = False,
) -> dict:
    """The evaluation gates of an adapter (see curate.train.evaluation)."""
    require_training_extra()
    from curate.train.evaluation import run_eval as evaluate

    return evaluate(recipe_path, adapter_dir, data_version, out_dir, show_progress, verbose)


__all__ = ["TRAINING_PACKAGES", "require_training_extra", "run_eval", "run_training"]
