"""``unisd doctor``: preflight checks of a model, its tokenizer and a dataset before a long run."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import typer

from ..config import RunConfig, load_config
from ..errors import UsageError
from ..ops.doctor import exit_code, run_doctor
from ..plugins import UnisdPluginManager
from .errors import cli_errors

MARKS = {"pass": "PASS", "warn": "WARN", "fail": "FAIL", "skip": "SKIP"}


def register(app: typer.Typer, pm: UnisdPluginManager) -> None:
    @app.command("doctor")
    def doctor_command(
        model: str = typer.Option(None, "--model", help="The model to check (as for `unisd train --model`)."),
        task: str = typer.Option(None, "--task", help="A registered task: its examples are checked."),
        data: Path = typer.Option(None, "--data", help="A JSONL training file: its examples are checked."),
        config: Path = typer.Option(None, "--config", help="A run config TOML (e.g. a run's config.toml); flags override it."),
        batch_size: int = typer.Option(None, "--batch-size", help="Micro-batch size of the self-test and memory estimate."),
        grad_accum: int = typer.Option(None, "--grad-accum", help="Micro-batches per step (generation batch)."),
        max_new_tokens: int = typer.Option(None, "--max-new-tokens", help="Completion budget (default: the task's)."),
        max_prompt_tokens: int = typer.Option(None, "--max-prompt-tokens", help="Student prompt budget (1024)."),
        max_teacher_prompt_tokens: int = typer.Option(None, "--max-teacher-prompt-tokens",
                                                      help="Teacher prompt budget (default: prompt + completion budgets)."),
        lora: bool = typer.Option(None, "--lora/--full", help="Check the LoRA (default) or full fine-tuning teacher."),
        backend: str = typer.Option(None, "--backend", help="Generation backend to check (hf)."),
        dtype: str = typer.Option(None, "--dtype", help="auto, float32, bfloat16 or float16."),
        as_json: bool = typer.Option(False, "--json", help="Print the checks as JSON."),
    ) -> None:
        """Preflight checks: chat template, EOS/pad, vocab, teacher-prompt budget, zero-divergence
        self-test, generation backend and memory. Exit code 1 when a check fails."""
        with cli_errors():
            cfg = load_config(config) if config is not None else RunConfig()
            flags = {
                "model": model, "task": task, "data": str(data) if data else None, "batch_size": batch_size,
                "grad_accum": grad_accum, "max_new_tokens": max_new_tokens, "max_prompt_tokens": max_prompt_tokens,
                "max_teacher_prompt_tokens": max_teacher_prompt_tokens, "lora": lora, "backend": backend,
                "dtype": dtype,
            }
            given = {k: v for k, v in flags.items() if v is not None}
            for key in ("max_new_tokens", "max_prompt_tokens", "max_teacher_prompt_tokens"):
                if key in given and given[key] < 1:
                    raise UsageError(f"--{key.replace('_', '-')} must be ≥ 1, got {given[key]}")
            if ("task" in given or "data" in given) and config is not None:
                cfg = dataclasses.replace(cfg, task=None, data=None)  # the flag's source replaces the file's
            cfg = dataclasses.replace(cfg, **given)
            cfg.validate()
            progress = None if as_json else (lambda msg: typer.echo(msg, err=True))
            checks = run_doctor(cfg, pm, progress=progress)
        if as_json:
            typer.echo(json.dumps({"model": cfg.model, "ok": exit_code(checks) == 0,
                                   "checks": [dataclasses.asdict(c) for c in checks]}, indent=2, default=str))
        else:
            for c in checks:
                typer.echo(f"[{MARKS.get(c.status, c.status)}] {c.name}: {c.message}")
                if c.status in ("warn", "fail") and c.fix:
                    typer.echo(f"       fix: {c.fix}")
            failed = sum(c.status == "fail" for c in checks)
            warned = sum(c.status == "warn" for c in checks)
            typer.echo(f"{failed} failed, {warned} warning(s), {len(checks) - failed - warned} other check(s).")
        raise typer.Exit(exit_code(checks))
