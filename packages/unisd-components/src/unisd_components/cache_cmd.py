"""``unisd cache negatives``: build the contrastive component's negative-demonstration cache."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer


def _cache_group(app: typer.Typer) -> typer.Typer:
    """The ``cache`` sub-app, shared with other plugins that add ``unisd cache ...`` commands."""
    for info in app.registered_groups:
        if info.name == "cache" and info.typer_instance is not None:
            return info.typer_instance
    group = typer.Typer(help="Build caches a run reads (negatives, ...).", no_args_is_help=True)
    app.add_typer(group, name="cache")
    return group


def register(app: typer.Typer) -> None:
    group = _cache_group(app)

    @group.command("negatives")
    def negatives_command(
        ctx: typer.Context,
        model: str = typer.Option("smollm2", "--model", help="The model that writes the negatives (the student's)."),
        task: str = typer.Option(None, "--task", help="A registered task to read training examples from."),
        data: Path = typer.Option(None, "--data", help="Or a JSONL file of {id, prompt, reference, meta}."),
        split: str = typer.Option("train", "--split", help="Split of --task."),
        output: Path = typer.Option(None, "--output", help="Cache file (JSONL; default under the unisd cache dir)."),
        num_negatives: int = typer.Option(4, "--num-negatives", help="Negatives per example."),
        kind: str = typer.Option("auto", "--kind", help="mcqa, code, tooluse, generic, or auto (from the data)."),
        limit: int = typer.Option(None, "--limit", help="Only the first N examples."),
        max_new_tokens: int = typer.Option(512, "--max-new-tokens", help="Token budget per negative."),
        temperature: float = typer.Option(0.7, "--temperature", help="Sampling temperature."),
        seed: int = typer.Option(42, "--seed", help="Random seed."),
    ) -> None:
        """Have the model write convincing wrong demonstrations (resumable: finished examples are skipped)."""
        from unisd.cli.errors import cli_errors

        with cli_errors():
            _run(ctx.obj, model, task, data, split, output, num_negatives, kind, limit, max_new_tokens, temperature, seed)


def _run(pm: Any, model: str, task_name: str | None, data: Path | None, split: str, output: Path | None,
         num_negatives: int, kind: str, limit: int | None, max_new_tokens: int, temperature: float, seed: int) -> None:
    import torch
    from rich.console import Console
    from rich.progress import Progress

    from unisd.errors import ConfigError
    from unisd.models import load_model, load_tokenizer, resolve_model
    from unisd.prompts import encode, render_chat
    from unisd.rollout import HFBackend, SamplingParams
    from unisd.tasks import load_jsonl_examples

    from .negatives import KINDS, build_negatives, default_cache_path

    if (task_name is None) == (data is None):
        raise ConfigError("give exactly one of --task NAME or --data FILE.jsonl")
    if kind not in KINDS:
        raise ConfigError(f"--kind {kind}: expected one of {', '.join(KINDS)}")
    if num_negatives < 1:
        raise ConfigError("--num-negatives must be ≥ 1")
    task = None
    if data is not None:
        examples = load_jsonl_examples(data, limit=limit)
    else:
        task = pm.registries.tasks.get(task_name)()
        examples = task.load(split, limit=limit)
    output = output or default_cache_path(model, str(data) if data is not None else task_name)

    console = Console()
    torch.manual_seed(seed)
    source = resolve_model(model, progress=console.print)
    tokenizer = load_tokenizer(source)
    lm = load_model(source)
    backend = HFBackend(lm, tokenizer)
    params = SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens)

    def generate(texts: list[str]) -> list[str]:
        prompts = [encode(tokenizer, render_chat(tokenizer, t)) for t in texts]
        return [tokenizer.decode(c.ids, skip_special_tokens=True) for c in backend.generate(prompts, params)]

    with Progress(console=console, disable=not console.is_terminal) as bar:
        def progress(items):
            tid = bar.add_task("negatives", total=len(items))
            for item in items:
                yield item
                bar.advance(tid)

        stats = build_negatives(examples, generate, output, num_negatives=num_negatives, kind=kind, task=task,
                                progress=progress)
    console.print(f"negatives: {stats['written']} example(s) written, {stats['skipped']} already done -> {output}",
                  highlight=False)
