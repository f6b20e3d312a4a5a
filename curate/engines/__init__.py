"""Execution engines: how the same recipe's work is spread over cores (local) or machines (later: Ray)."""

from curate.engines.local import LocalEngine

__all__ = ["LocalEngine"]
