"""How a run talks to the person watching: a rich progress bar on a terminal, plain lines in logs and pipes.

Either way the person gets a start-up summary (what is being trained, on what, for how long), every
evaluation's numbers as they come, and the last step's numbers. On a terminal the bar shows the rest;
in a log (``unisd train ... > train.log``), a plain line every ``log_every`` steps does.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypeVar

T = TypeVar("T")

LINES_PER_RUN = 20  # the plain-line cadence when log_every is 0 (auto)


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

    def track(self, items: Iterable[T], total: int, label: str) -> Iterable[T]:
        """``items``, shown as a progress bar (``label``) where the reporter can show one."""
        return items


def step_line(record: dict[str, Any], total: int) -> str:
    """One plain log line for a step's metrics record."""
    parts = [f"step {record['step']}/{total}", f"loss {record['loss']:.4g}"]
    for key, label, fmt in (("divergence", "divergence", ".4g"), ("leakage", "leakage", ".3f"),
                            ("grad_norm", "grad-norm", ".3g"), ("learning_rate", "lr", ".3g"),
                            ("completion_length", "completion", ".1f"), ("tokens_per_s", "tok/s", ".0f"),
                            ("step_s", "s/step", ".2f")):
        if isinstance(record.get(key), int | float):
            parts.append(f"{label} {record[key]:{fmt}}")
    elapsed, step_s = record.get("elapsed_s"), record.get("step_s")
    if isinstance(elapsed, int | float):
        parts.append(f"elapsed {elapsed:.0f} s")
    if isinstance(step_s, int | float) and total > record["step"]:
        parts.append(f"eta {step_s * (total - record['step']):.0f} s")
    return " | ".join(parts)


def eval_line(record: dict[str, Any]) -> str | None:
    """The evaluation results a step's record holds (``eval/TASK/...``), as one line; None if none."""
    found = {k: v for k, v in record.items() if k.startswith("eval/") and isinstance(v, int | float)}
    if not found:
        return None
    shown = ", ".join(f"{k.removeprefix('eval/')} {v:.3f}" for k, v in found.items() if not k.endswith("/n"))
    return f"step {record['step']} evaluation: {shown}"


def startup_summary(
    model: str, trainable: int, total_params: int, examples: int, config: Any, components: list[Any], output: Any
) -> str:
    """What the run is about to do, in a few lines: read once at the top of a log."""
    effective = config.batch_size * config.grad_accum
    chosen = []
    for comp in components:
        options = getattr(comp, "options", None)
        fields = getattr(options, "__dataclass_fields__", {})
        shown = ", ".join(f"{name}={getattr(options, name)!r}" for name in fields)
        chosen.append(f"{comp.name}({shown})" if shown else comp.name)
    share = 100.0 * trainable / total_params if total_params else 0.0
    data = config.data or config.task or "demo"
    control = getattr(config, "reference_control", "none")
    if control != "none":  # a control run must say so at the top of its log
        data += f" (control: {control} references)"
    return "\n".join([
        f"Training {model}: {trainable:,} trainable parameters of {total_params:,} ({share:.2f}%, "
        f"{'LoRA r=' + str(config.lora_r) if config.lora else 'full fine-tuning'})",
        f"Data: {data}, {examples} examples | {config.steps} steps x effective batch {effective} "
        f"({config.batch_size} x {config.grad_accum} accumulation{_generations(config, effective)}) | lr {config.lr:g} | "
        f"seed {config.seed}",
        f"Components: {'; '.join(chosen) if chosen else 'none (plain self-distillation)'}",
        f"Output: {output}",
    ])


def _generations(config: Any, effective: int) -> str:
    g = getattr(config, "num_generations", 1)
    return f"; {effective // g} prompts x {g} completions each" if g > 1 else ""


class RichReporter(Reporter):
    """The CLI's reporter: a progress bar on a terminal, plain lines every ``every`` steps otherwise."""

    def __init__(self, console: Any, every: int = 0):
        self.console = console
        self.every = every
        self.total = self.first = 0
        self.progress = None
        self.task_id = None

    def info(self, message: str) -> None:
        self.console.print(message, highlight=False, soft_wrap=True)  # a log line is never folded

    def start(self, total: int, completed: int) -> None:
        self.total, self.first = total, completed + 1
        if self.every <= 0:
            self.every = max(1, total // LINES_PER_RUN)
        if not self.console.is_terminal:
            return  # no progress bar in logs and pipes: step() prints plain lines instead
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  {task.fields[tps]} tok/s"), TimeRemainingColumn(),
            console=self.console, transient=False,
        )
        self.progress.start()
        self.task_id = self.progress.add_task("train", total=total, completed=completed, loss="-", tps="-")

    def step(self, record: dict[str, Any]) -> None:
        evaluation = eval_line(record)
        if self.progress is not None:
            self.progress.update(
                self.task_id, completed=record["step"], loss=f"{record['loss']:.4f}", tps=f"{record['tokens_per_s']:.0f}"
            )
            if evaluation:
                self.progress.console.print(evaluation, highlight=False)  # printed above the bar
            return
        step = record["step"]
        if step in (self.first, self.total) or step % self.every == 0:
            self.console.print(step_line(record, self.total), highlight=False, soft_wrap=True)
        if evaluation:
            self.console.print(evaluation, highlight=False, soft_wrap=True)

    def track(self, items: Iterable[T], total: int, label: str) -> Iterable[T]:
        """A bar on a terminal (long set-up work: measuring a large data file's prompts); a line elsewhere."""
        if not self.console.is_terminal:
            self.console.print(f"{label}...", highlight=False, soft_wrap=True)
            return items
        from rich.progress import track

        return track(items, total=total, description=label, console=self.console, transient=True)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
