"""The bundled QLoRA trainer and its evaluation gates (torch and friends load only when called)."""

from curate.train.evaluation import run_eval
from curate.train.trainer import run_training

__all__ = ["run_eval", "run_training"]
