"""Progress for long build steps: a rich bar on a terminal, a log line every 10% otherwise."""

from __future__ import annotations

import logging
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

log = logging.getLogger("export.progress")


class StageProgress:
    """``with StageProgress("teacher fine-tune", total=steps) as bar: bar.advance(status=...)``."""

    def __init__(self, description: str, total: int, visible: bool = True):
        self.description = description
        self.total = max(1, total)
        self.done = 0
        self.visible = visible
        self._started = time.perf_counter()
        self._next_log = 0.1
        self._bar: Progress | None = None
        if visible and Console(stderr=True).is_terminal:
            self._bar = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[status]}"), TimeRemainingColumn(),
                console=Console(stderr=True),
            )
            self._task = self._bar.add_task(description, total=self.total, status="")

    def __enter__(self) -> StageProgress:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._bar is not None:
            self._bar.stop()
        elif self.visible:
            log.info("%s: done, %d steps in %.0f s", self.description, self.done,
                     time.perf_counter() - self._started)

    def advance(self, status: str = "") -> None:
        self.done += 1
        if self._bar is not None:
            self._bar.update(self._task, advance=1, status=status)
            return
        if self.visible and self.done / self.total >= self._next_log and self.done < self.total:
            self._next_log += 0.1
            log.info("%s: %d/%d %s (%.0f s)", self.description, self.done, self.total, status,
                     time.perf_counter() - self._started)
