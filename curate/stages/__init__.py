"""Stages, one per file; importing this package registers every stage under its recipe name."""

from __future__ import annotations

import importlib
import pkgutil

from curate.stages.base import STAGES, Decisions, Drop, GlobalStage, Stage, StageContext

# Each module in this package registers its stage on import; base holds the contract itself.
for _info in pkgutil.iter_modules(__path__):
    if _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["STAGES", "Decisions", "Drop", "GlobalStage", "Stage", "StageContext"]
