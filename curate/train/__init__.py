"""The bundled QLoRA trainer and its evaluation gates (torch and friends load only when called)."""

from __future__ import annotations

from pathlib import Path


def run_training(
    recipe_path: str | Path | None,
    data_version: str | Path,
    out_dir: str | Path,
    overrides: dict | None = None,
) -> dict:
    """Fine-tune with QLoRA on a dataset version; writes adapter/, metrics.json, loss.png; returns metrics."""
    from curate.train.trainer import run_training as _run

    return _run(recipe_path, data_version, out_dir, overrides)


def run_eval(
    recipe_path: str | Path | None,
    adapter_dir: str | Path,
    data_version: str | Path | None = None,
    out_dir: str | Path | None = None,
) -> dict:
    """Run the evaluation gates on a trained adapter beside its base model; returns the gate report."""
    from curate.train.evaluation import run_eval as _run

    return _run(recipe_path, adapter_dir, data_version, out_dir)
