"""``unisd cache negatives``: build the contrastive component's negative-demonstration cache."""

from __future__ import annotations

import time
from dataclasses import dataclass
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
        max_new_tokens: int = typer.Option(
            None, "--max-new-tokens",
            help="Token budget per negative (default: the method's 1024 for MCQA, code and tool use; "
                 "otherwise the task's completion budget plus room for the JSON)."),
        max_retries: int = typer.Option(2, "--max-retries", help="Regenerations of a rejected sample."),
        backend: str = typer.Option("auto", "--backend", help="hf, vllm (guided JSON), or auto (vllm on a GPU if installed)."),
        batch_examples: int = typer.Option(8, "--batch-examples", help="Examples sampled together."),
        temperature: float = typer.Option(0.7, "--temperature", help="Sampling temperature."),
        seed: int = typer.Option(42, "--seed", help="Random seed."),
    ) -> None:
        """Have the model write convincing wrong demonstrations, each validated before it is cached
        (resumable: finished examples are skipped). A task that supplies its own (demo) needs none."""
        from unisd.commands import cli_errors

        with cli_errors():
            _run(ctx.obj, Request(model, task, data, split, output, num_negatives, kind, limit, max_new_tokens,
                                  max_retries, backend, batch_examples, temperature, seed))


@dataclass
class Request:
    """The command's settings, as given."""

    model: str
    task: str | None
    data: Path | None
    split: str
    output: Path | None
    num_negatives: int
    kind: str
    limit: int | None
    max_new_tokens: int | None
    max_retries: int
    backend: str
    batch_examples: int
    temperature: float
    seed: int


def _check(req: Request) -> None:
    """Refuse inconsistent settings before anything loads."""
    from unisd.errors import ConfigError

    from .negatives import KINDS
    from .negatives_gen import BACKENDS

    if (req.task is None) == (req.data is None):
        raise ConfigError("give exactly one of --task NAME or --data FILE.jsonl")
    if req.kind not in KINDS:
        raise ConfigError(f"--kind {req.kind}: expected one of {', '.join(KINDS)}")
    if req.backend not in BACKENDS:
        raise ConfigError(f"--backend {req.backend}: expected one of {', '.join(BACKENDS)}")
    for flag, value, low in (("--num-negatives", req.num_negatives, 1), ("--max-retries", req.max_retries, 0),
                             ("--batch-examples", req.batch_examples, 1), ("--max-new-tokens", req.max_new_tokens, 1)):
        if value is not None and value < low:
            raise ConfigError(f"{flag} must be ≥ {low}")


def _say(text: str) -> None:
    """One plain line, flushed: readable in a log or a pipe (no progress bar redraws)."""
    print(text, flush=True)


class Progress:
    """Plain progress lines: after the first generation call, then at most every ``every`` seconds, and
    when the last example is done."""

    def __init__(self, todo: int, every: float = 10.0, say: Any = None):
        self.todo, self.every, self.say = todo, every, say or _say
        self.start = self.last = time.monotonic()
        self.lines = 0

    def __call__(self, stats: Any) -> None:
        now = time.monotonic()
        if self.lines and now - self.last < self.every and stats.written < self.todo:
            return
        self.last, self.lines = now, self.lines + 1
        rejected = sum(stats.rejected.values())
        self.say(f"negatives: {stats.written}/{self.todo} example(s) done, {stats.without} without a negative, "
             f"{stats.sampled} sample(s) generated, {rejected} rejected, {now - self.start:.0f}s")


def _run(pm: Any, req: Request) -> None:
    import torch

    from unisd.data.tasks import load_jsonl_examples
    from unisd.model.models import load_model, load_tokenizer, resolve_model
    from unisd.model.rollout import SamplingParams

    from .negatives import build_negatives, default_cache_path, negative_budget, negative_kind
    from .negatives_gen import hf_generator, pick_backend, vllm_generator

    _check(req)
    task = None
    if req.data is not None:
        examples = load_jsonl_examples(req.data, limit=req.limit)
    else:
        task = pm.registries.tasks.get(req.task)()
        examples = task.load(req.split, limit=req.limit)
    output = req.output or default_cache_path(req.model, str(req.data) if req.data is not None else req.task)

    # A task that writes its own negatives (Task.negative) needs no model for those examples.
    own = {e.id for e in examples if task is not None and task.negative(e)}
    if own:
        _say(f"negatives: task {req.task} supplies its own negatives for {len(own)} of {len(examples)} example(s); "
             "the contrastive component uses them without a cache")
        examples = [e for e in examples if e.id not in own]
    if not examples:
        return

    kinds = {negative_kind(e, task, req.kind) for e in examples}
    budget = req.max_new_tokens or max(negative_budget(task, k) for k in kinds)
    backend = pick_backend(req.backend)
    torch.manual_seed(req.seed)
    source = resolve_model(req.model, progress=_say)
    tokenizer = load_tokenizer(source)
    params = SamplingParams(temperature=req.temperature, max_new_tokens=budget)
    if backend == "vllm":
        generate = vllm_generator(source, tokenizer, params, req.seed)
    else:
        generate = hf_generator(load_model(source), tokenizer, params)
    _say(f"negatives: {len(examples)} example(s) x {req.num_negatives}, up to {budget} new tokens each, "
         f"backend {backend} -> {output}")
    stats = build_negatives(examples, generate, output, num_negatives=req.num_negatives, kind=req.kind, task=task,
                            max_retries=req.max_retries, batch_examples=req.batch_examples,
                            progress=Progress(len(examples)))
    rejected = ", ".join(f"{n} {reason}" for reason, n in sorted(stats["rejected"].items())) or "none"
    _say(f"negatives: {stats['written']} example(s) written, {stats['skipped']} already done, "
         f"{stats['without']} without any valid negative -> {output}")
    _say(f"negatives: {stats['negatives']} negative(s) cached; rejected samples: {rejected}")
