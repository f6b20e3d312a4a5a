"""Progress for long work: rich bars on stderr, and nothing at all in --json mode."""

from __future__ import annotations

from collections.abc import Callable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as RichProgress


class Task:
    """One bar: `advance(n)` as work is done, `status(text)` to say how it goes (after the count),
    `done()` when it ends."""

    def __init__(
        self,
        advance: Callable[[int], None],
        done: Callable[[], None],
        status: Callable[[str], None] = lambda text: None,
    ) -> None:
        self.advance = advance
        self.done = done
        self.status = status


class Progress:
    """Bars on stderr; `enabled=False` keeps stdout and stderr clean for machine-readable output."""

    def __init__(self, enabled: bool = True, console: Console | None = None) -> None:
        self.enabled = enabled
        self.console = console or Console(stderr=True)
        self._bars: RichProgress | None = None

    def __enter__(self) -> Progress:
        if self.enabled:
            self._bars = RichProgress(
                TextColumn("[bold]{task.description:<14}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[unit]}"),
                TimeElapsedColumn(),
                console=self.console,
                transient=False,
            )
            self._bars.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._bars is not None:
            self._bars.__exit__(*exc)
            self._bars = None

    def task(self, name: str, total: int | None, unit: str = "") -> Task:
        if self._bars is None:
            return Task(lambda n=1: None, lambda: None)
        bars = self._bars
        task_id = bars.add_task(name, total=total, unit=unit)

        def done() -> None:
            completed = bars.tasks[task_id].completed if total is None else total
            bars.update(task_id, total=max(completed, 1), completed=completed)

        return Task(lambda n=1: bars.advance(task_id, n), done, lambda text: bars.update(task_id, unit=text))

    def note(self, message: str) -> None:
        if self.enabled:
            self.console.print(f"[dim]{message}[/dim]")
