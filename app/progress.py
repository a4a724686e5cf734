"""The progress bar of `once` and `eval`, the same on both engines: files finished of the total, the rate, time."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from stages.paths import shown


class BinningProgress:
    """A bar over ``total`` files; ``advance`` per finished file, ``phase`` names what is happening, ``add_total``
    (from any thread, before the bar is shown too) counts files the scan found."""

    def __init__(self, total: int | None, show: bool, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.show = show
        self._bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                             TextColumn("{task.fields[rate]:.1f} img/s"), TimeElapsedColumn(), TimeRemainingColumn(),
                             console=self.console, disable=not show)
        self._total = total
        self._task: TaskID | None = None
        self._total_lock = threading.Lock()

    @contextmanager
    def shown(self, first_phase: str) -> Iterator[BinningProgress]:
        with self._bar:
            with self._total_lock:
                self._task = self._bar.add_task(_described(first_phase), total=self._total, rate=0.0)
            yield self

    def phase(self, description: str) -> None:
        if self._task is not None:
            self._bar.update(self._task, description=_described(description))

    def add_total(self, more: int) -> None:
        """The scan found ``more`` files to do."""
        if not more:
            return
        with self._total_lock:
            self._total = (self._total or 0) + more
            if self._task is not None:
                self._bar.update(self._task, total=self._total)

    def advance(self, rate: float) -> None:
        if self._task is not None:
            self._bar.update(self._task, advance=1, rate=rate)


def _described(text: str) -> str:
    """A phase for the bar: what it names is ``shown`` (no control characters reach the terminal), never markup."""
    return escape(shown(text))
