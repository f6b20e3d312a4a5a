"""The bundled QLoRA trainer (curate.train.trainer) and its evaluation gates (curate.train.evaluation);
import them only after `require_training_extra`, so a missing extra is one clear error."""

from __future__ import annotations

import importlib.util

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
