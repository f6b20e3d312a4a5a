"""Stages, one per file; importing this package registers every stage under its recipe name.

Other packages add stages through the `curate.stages` entry point group (`name = "module:Class"`, a
`Stage` subclass whose `name` is that name). That is the only way a recipe reaches code outside
curate: a recipe names stages, it never holds code, and nothing is imported from a path it gives.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import pkgutil

from curate.stages.base import STAGES, Decisions, Drop, GlobalStage, Stage, StageContext

# Each module in this package registers its stage on import; base holds the contract itself.
for _info in pkgutil.iter_modules(__path__):
    if _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")

BUILT_IN = frozenset(STAGES)


def _load_plugins() -> dict[str, str]:
    """Register the stages installed packages declare; {name: problem} for those that could not be."""
    problems = {}
    for entry in importlib.metadata.entry_points(group="curate.stages"):
        try:
            cls = entry.load()
        except Exception as exc:  # noqa: BLE001 - a broken plugin is reported, never fatal to curate
            problems[entry.name] = f"{entry.value} failed to import: {type(exc).__name__}: {exc}"
            continue
        if not (
            isinstance(cls, type) and issubclass(cls, Stage) and getattr(cls, "name", None) == entry.name
        ):
            problems[entry.name] = f"{entry.value} is not a curate Stage subclass named {entry.name!r}"
        elif entry.name in BUILT_IN:
            problems[entry.name] = f"{entry.value} would replace the built-in stage {entry.name!r}"
        elif not hasattr(cls, "Config"):
            problems[entry.name] = f"{entry.value} has no Config class"
        else:
            STAGES[entry.name] = cls
    return problems


PLUGIN_PROBLEMS = _load_plugins()

__all__ = ["PLUGIN_PROBLEMS", "STAGES", "Decisions", "Drop", "GlobalStage", "Stage", "StageContext"]
