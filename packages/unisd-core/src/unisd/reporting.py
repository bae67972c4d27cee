"""How a run talks to the person watching: a rich progress bar on a terminal, quiet otherwise."""

from __future__ import annotations

from typing import Any


class Reporter:
    """Silent reporter (tests, library use). Subclasses show progress."""

    def info(self, message: str) -> None:
        pass

    def start(self, total: int, completed: int) -> None:
        pass

    def step(self, record: dict[str, Any]) -> None:
        pass

    def stop(self) -> None:
        pass


class RichReporter(Reporter):
    def __init__(self, console: Any):
        self.console = console
        self.progress = None
        self.task_id = None

    def info(self, message: str) -> None:
        self.console.print(message, highlight=False)

    def start(self, total: int, completed: int) -> None:
        if not self.console.is_terminal:
            return  # no progress bar in logs and pipes
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  {task.fields[tps]} tok/s"), TimeRemainingColumn(),
            console=self.console, transient=False,
        )
        self.progress.start()
        self.task_id = self.progress.add_task("train", total=total, completed=completed, loss="-", tps="-")

    def step(self, record: dict[str, Any]) -> None:
        if self.progress is None:
            return
        self.progress.update(
            self.task_id, completed=record["step"], loss=f"{record['loss']:.4f}", tps=f"{record['tokens_per_s']:.0f}"
        )

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
