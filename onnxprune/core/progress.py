"""The one progress bar: rich on stderr while a person watches, nothing otherwise.

Every long step (calibration passes, training epochs, a recipe's runs) shows the same bar, and
none of them writes to stdout, so ``--json`` output stays one JSON object.
"""
from __future__ import annotations

import sys
from typing import Any
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class ProgressBar:
    """A bar of ``total`` steps with a free-text field (the current step, a loss ...).

    Disabled (``enabled=False``, or ``tty_only`` and stderr is not a terminal) it does nothing, so
    callers never branch on it. Use as a context manager.
    """

    def __init__(self, total: int, description: str, *, enabled: bool = True, tty_only: bool = False,
                 transient: bool = False) -> None:
        self.enabled = enabled and (not tty_only or sys.stderr.isatty())
        self.total, self.description, self.transient = total, description, transient
        self._bar: Any = None
        self._task: Any = None

    def __enter__(self) -> "ProgressBar":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> "ProgressBar":
        if self.enabled and self._bar is None:
            self._bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TextColumn("{task.fields[info]}"),
                                 console=Console(stderr=True), transient=self.transient)
            self._task = self._bar.add_task(self.description, total=self.total, info="")
            self._bar.start()
        return self

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def advance(self, n: int = 1, info: str | None = None) -> None:
        if self._bar is not None:
            self._bar.update(self._task, advance=n, **({"info": info} if info is not None else {}))

    def info(self, text: str) -> None:
        if self._bar is not None:
            self._bar.update(self._task, info=text)
