"""Execution engines: the same stages run in this process (serial), on every core (local), or on a
Ray cluster (ray, imported only when asked for: Ray is an optional extra)."""

from __future__ import annotations

from collections.abc import Callable

from curate.engines.base import Engine
from curate.engines.local import LocalEngine
from curate.engines.serial import SerialEngine
from curate.errors import CurateError


def _local(workers: int | None, address: str | None, generation_workers: int | None) -> Engine:
    return LocalEngine(workers)


def _serial(workers: int | None, address: str | None, generation_workers: int | None) -> Engine:
    return SerialEngine()


def _ray(workers: int | None, address: str | None, generation_workers: int | None) -> Engine:
    try:
        import ray  # noqa: F401 - only to tell whether it is installed
    except ImportError:
        raise CurateError(
            "the ray engine needs Ray, which is not installed", hint="pip install 'curate[ray]'"
        ) from None
    from curate.engines.ray import RayEngine

    return RayEngine(workers, address, generation_workers=generation_workers)


ENGINES: dict[str, Callable[[int | None, str | None, int | None], Engine]] = {
    "local": _local,
    "serial": _serial,
    "ray": _ray,
}


def make_engine(
    name: str, workers: int | None = None, address: str | None = None, generation_workers: int | None = None
) -> Engine:
    """The engine called `name`; `address` (a Ray cluster's) and `generation_workers` (the processes
    that send a generating stage's LLM requests) only for ray."""
    if address and name != "ray":
        raise CurateError(f"an address is for the ray engine, not {name}", hint="add --engine ray")
    if generation_workers is not None and name != "ray":
        raise CurateError(
            f"generation workers are for the ray engine, not {name} (it sends from one process)",
            hint="add --engine ray",
        )
    return ENGINES[name](workers, address, generation_workers)


__all__ = ["ENGINES", "Engine", "LocalEngine", "SerialEngine", "make_engine"]
