"""Compiling a run's kernels while it starts, in a second process, once per install.

The text kernels are compiled by numba on first use and cached on disk, so only a first run pays:
22 s of the demo's first 24 on 2 cores, most of it dedup's MinHash kernel. While the runner reads
the inputs and runs the first stage, one background process per later stage runs that stage on a
few made-up records, which compiles (and caches) exactly the kernels and type specialisations its
options need; each stage waits for its own warm-up before it starts, and then finds its kernels in
the cache. A marker per stage and options, in the shared cache, keeps later runs from starting a
process at all; the marker names the install's folder, since numba's cache lives beside the
modules and a new install (or clone) compiles again.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import queue as queue_mod
from pathlib import Path
from typing import Any

import numba

from curate.cache import digest, module_fingerprint

_INSTALLED_AT = str(Path(__file__).resolve().parent)

# made-up records: enough words for shingles, n-grams and content keys, and two near copies (so
# that the kernels which compare candidate pairs run too)
_QUESTION = (
    "Explain how the gears of a bicycle work on a steep hill, in simple terms, for a child who has "
    "just learned to ride and wants to climb the long hill behind the school without stopping."
)
_ANSWER = "A lower gear turns the back wheel less for each turn of the pedals, so climbing is easier."
_TEXTS = [
    (_QUESTION, _ANSWER),
    (_QUESTION + " Thanks!", _ANSWER),
    ("Write a haiku about autumn rain falling on a quiet city street.", "Grey drops on the stones."),
]


def tiny_records():
    from curate.records import RECORD_SCHEMA, make_record, message, to_table

    source = {"name": "warm", "path": "warm.jsonl", "row": 0, "format": "messages"}
    rows = [
        make_record([message("user", q), message("assistant", a)], {**source, "row": i})
        for i, (q, a) in enumerate(_TEXTS)
    ]
    return to_table(rows).cast(RECORD_SCHEMA)


def _warm(index: int, name: str, config: Any, context: Any, done: Any, last: bool) -> None:
    """In a background process: run one stage on the made-up records, then say so."""
    from curate.stages import STAGES
    from curate.versions import train_lines

    table = tiny_records()
    try:
        cls = STAGES[name]
        stage = cls(cls.warmup_config(config), context)
        stage.setup()
        stage.apply(table)
        if last:
            train_lines(table)  # the train.jsonl kernel, for the version
    except Exception:  # noqa: BLE001 - a failed warm-up only means the run compiles on its own
        pass
    done.put(index)


class Warmer:
    """The background warm-up of a run's later stages (nothing at all when their markers exist)."""

    def __init__(self, stages: list[tuple[int, str, Any, Any]], shared_cache: Path) -> None:
        self.folder = shared_cache / "kernels"
        self.pending = {
            i: (name, config, ctx) for i, name, config, ctx in stages if not self._marked(name, config)
        }
        self.done: set[int] = set()
        self._processes: dict[int, Any] = {}
        self._queue = None

    def _marker(self, name: str, config: Any) -> Path:
        from curate.stages import STAGES

        key = digest(
            name,
            dataclasses.asdict(config),
            module_fingerprint(STAGES[name].__module__),
            numba.__version__,
            os.uname().machine,
            _INSTALLED_AT,  # numba caches beside the modules: another install compiles again
        )
        return self.folder / key

    def _marked(self, name: str, config: Any) -> bool:
        return self._marker(name, config).is_file()

    def start(self) -> list[str]:
        """Start compiling; the names of the stages being warmed (none if all were compiled before)."""
        if not self.pending or os.environ.get("CURATE_WARM", "1") == "0":
            return []
        ctx = multiprocessing.get_context("spawn")
        self._queue = ctx.Queue()
        last = max(self.pending)
        try:
            for index, (name, config, context) in sorted(self.pending.items()):
                process = ctx.Process(
                    target=_warm, args=(index, name, config, context, self._queue, index == last), daemon=True
                )
                process.start()
                self._processes[index] = process
        except (OSError, RuntimeError):  # cannot start processes here: the run compiles on its own
            self.stop()
            return []
        return [name for name, _, _ in self.pending.values()]

    def wait_for(self, index: int) -> None:
        """Block until the warm-up of stage `index` is over (or its process is gone)."""
        process = self._processes.get(index)
        while process is not None and index not in self.done:
            try:
                self.done.add(self._queue.get(timeout=1.0))
            except queue_mod.Empty:
                if not process.is_alive():
                    return

    def finish(self) -> None:
        """After a run: wait for the warm-ups to end, and mark the stages they compiled."""
        if not self._processes:
            return
        for index in self._processes:
            self.wait_for(index)
        self.folder.mkdir(parents=True, exist_ok=True)
        for index in self.done & set(self.pending):
            name, config, _ = self.pending[index]
            self._marker(name, config).touch()
        for process in self._processes.values():
            process.join(timeout=30)
        self.stop()

    def stop(self) -> None:
        """Stop warm-ups that still run (a run that failed does not wait for them)."""
        for process in self._processes.values():
            if process.is_alive():
                process.terminate()
        self._processes = {}
