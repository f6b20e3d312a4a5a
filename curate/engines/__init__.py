"""Execution engines: the same stages run in this process (serial), on every core (local), later on Ray."""

from curate.engines.base import Engine
from curate.engines.local import LocalEngine
from curate.engines.serial import SerialEngine

ENGINES = {"local": LocalEngine, "serial": SerialEngine}

__all__ = ["ENGINES", "Engine", "LocalEngine", "SerialEngine"]
