"""What `curate train` and `curate eval` show: one progress display, and nothing from the libraries
underneath unless asked (-v).

Besides what curate.quiet silences, the trainer prints a log dict per step (transformers'
PrinterCallback, on stdout, which broke `--json`); a run inside `TrainConsole` shows one bar per
phase instead and restores the libraries' settings afterwards. Everything it measured is in
metrics.json.
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace
from typing import Any

from curate.quiet import quiet_libraries


class TrainConsole:
    """The terminal of a training or eval run: `task()` for bars, `prepare(trainer)` for training."""

    def __init__(self, show_progress: bool = True, verbose: bool = False) -> None:
        self.verbose = verbose
        self._progress = _progress() if show_progress else None
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> TrainConsole:
        if not self.verbose:
            self._stack.enter_context(quiet_libraries())
        if self._progress is not None:
            self._stack.enter_context(self._progress)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.__exit__(*exc)

    def task(self, name: str, total: int | None, unit: str = "") -> Any:
        """A bar (curate.progress.Task), or one that shows nothing when progress is off."""
        if self._progress is None:
            return SimpleNamespace(advance=lambda n=1: None, done=lambda: None, status=lambda text: None)
        return self._progress.task(name, total, unit)

    def note(self, text: str) -> None:
        """A line for the user (on stderr, beside the bars; nothing when progress is off)."""
        if self._progress is not None:
            self._progress.note(text)

    def prepare(self, trainer: Any) -> None:
        """Our bar instead of the trainer's own output (its log dicts stay with -v)."""
        from transformers.trainer_callback import PrinterCallback, ProgressCallback

        trainer.add_callback(_progress_callback(self))
        if not self.verbose:
            trainer.remove_callback(PrinterCallback)
            trainer.remove_callback(ProgressCallback)


def _progress_callback(console: TrainConsole) -> Any:
    """One bar over the optimizer steps, with the last train and held-out loss after the count.
    (transformers is imported here, not at the top: importing it loads bitsandbytes, whose notice
    must find its logger quiet already.)"""
    from transformers import TrainerCallback

    class TrainProgress(TrainerCallback):
        def __init__(self) -> None:
            self.task = None
            self.loss: float | None = None
            self.heldout: float | None = None

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.task = console.task("training", state.max_steps, "steps")

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self.task is not None:
                self.task.advance(1)

        def on_log(
            self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any
        ) -> None:
            logs = logs or {}
            if "loss" in logs:
                self.loss = float(logs["loss"])
            if "eval_heldout_loss" in logs:
                self.heldout = float(logs["eval_heldout_loss"])
            if self.task is not None and self.loss is not None:
                held = f", held-out {self.heldout:.3f}" if self.heldout is not None else ""
                self.task.status(f"steps  loss {self.loss:.3f}{held}")

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self.task is not None:
                self.task.done()
                self.task = None

    return TrainProgress()


def _progress() -> Any:
    """curate's rich bars, or None where rich is missing (the GPU image installs no extras)."""
    try:
        from curate.progress import Progress
    except ImportError:
        return None
    return Progress()
