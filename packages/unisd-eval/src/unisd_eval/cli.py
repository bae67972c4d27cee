"""``unisd eval TASK``: score a model's generations, or a file of predictions, on a benchmark task.

Writes ``results.json`` (metrics, config, timings) and ``predictions.jsonl`` (one record per
completion) into the output directory, each file atomically, and prints the metrics as a table.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from unisd import atomic
from unisd.cli.errors import cli_errors
from unisd.errors import DataError, UsageError
from unisd.tasks import Example, Score, Task, iter_jsonl

SAMPLING_TEMPERATURE = 0.7  # the method's sampling temperature, used for pass@k with --samples > 1


def read_predictions(path: Path) -> dict[str, list[str]]:
    """``{"id": ..., "completion": ...}`` per line → completions per id (several = several samples)."""
    if not path.is_file():
        raise DataError(f"--predictions {path}: no such file (expected JSONL with 'id' and 'completion')")
    by_id: dict[str, list[str]] = defaultdict(list)
    for where, record in iter_jsonl(path, "with 'id' and 'completion'"):
        if "id" not in record or not isinstance(record.get("completion"), str):
            raise DataError(f"{where}: each line needs 'id' and a string 'completion', e.g. "
                            '{"id": "HumanEval/0", "completion": "..."}')
        by_id[str(record["id"])].append(record["completion"])
    if not by_id:
        raise DataError(f"--predictions {path}: no records found")
    return dict(by_id)


def match_predictions(task: str, split: str, examples: list[Example], by_id: dict[str, list[str]]) -> list[tuple[Example, str]]:
    """Pair every prediction with its example; unknown ids are an error naming a few valid ones."""
    known = {ex.id: ex for ex in examples}
    unknown = [i for i in by_id if i not in known]
    if unknown:
        sample = ", ".join(list(known)[:3])
        raise UsageError(
            f"--predictions: {len(unknown)} id(s) are not in task '{task}' split '{split}' "
            f"(first: {unknown[0]!r}). Ids look like: {sample}. Check --split and --limit."
        )
    return [(known[i], c) for i, completions in by_id.items() for c in completions]


def generate(model_ref: str, examples: list[Example], samples: int, max_new_tokens: int,
             batch_size: int, console: Console) -> list[tuple[Example, str]]:
    """Greedy completions (samples == 1) or ``samples`` sampled ones per example, with a progress bar."""
    from rich.progress import Progress

    from unisd.models import load_model, load_tokenizer, resolve_model
    from unisd.prompts import encode, render_chat
    from unisd.rollout import HFBackend, SamplingParams

    source = resolve_model(model_ref, progress=console.print)
    tokenizer = load_tokenizer(source)
    model = load_model(source)
    flat = [ex for ex in examples for _ in range(samples)]
    params = SamplingParams(temperature=0.0 if samples == 1 else SAMPLING_TEMPERATURE, max_new_tokens=max_new_tokens)
    backend = HFBackend(model, tokenizer, batch_size=batch_size)
    out: list[tuple[Example, str]] = []
    with Progress(console=console, transient=True) as progress:
        bar = progress.add_task("generating", total=len(flat))
        for start in range(0, len(flat), batch_size):
            chunk = flat[start : start + batch_size]
            prompts = [encode(tokenizer, render_chat(tokenizer, ex.prompt)) for ex in chunk]
            for ex, completion in zip(chunk, backend.generate(prompts, params), strict=True):
                out.append((ex, tokenizer.decode(completion.ids, skip_special_tokens=True)))
            progress.advance(bar, len(chunk))
    return out


def summarize(task: Task, examples: list[Example], scores: list[Score]) -> dict[str, float]:
    """The task's summary metrics: ``summarize(examples, scores)`` when it has one, else ``aggregate``."""
    fn = getattr(task, "summarize", None)
    return dict(fn(examples, scores)) if callable(fn) else dict(task.aggregate(scores))


def write_outputs(output: Path, results: dict[str, Any], pairs: list[tuple[Example, str]], scores: list[Score]) -> None:
    """results.json and predictions.jsonl, each replaced atomically."""
    seen: dict[str, int] = defaultdict(int)
    lines = []
    for (ex, completion), score in zip(pairs, scores, strict=True):
        lines.append(json.dumps({
            "id": ex.id, "sample": seen[ex.id], "prompt": ex.prompt, "completion": completion,
            "extracted": score.extracted, "verdict": score.verdict, "value": score.value, "error": score.error,
        }, ensure_ascii=False))
        seen[ex.id] += 1
    atomic.write_text(output / "predictions.jsonl", "".join(line + "\n" for line in lines))
    atomic.write_text(output / "results.json", json.dumps(results, indent=2, default=str) + "\n")


def print_table(console: Console, task: str, metrics: dict[str, float]) -> None:
    table = Table(title=f"unisd eval {task}", title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    console.print(table)


def eval_command(
    ctx: typer.Context,
    task: str = typer.Argument(..., help="A registered task, e.g. humaneval, mbpp, gsm8k (see `unisd plugins`)."),
    model: str = typer.Option(None, "--model", help="HF hub id, local HF directory, .gguf file, or 'smollm2'."),
    predictions: Path = typer.Option(None, "--predictions", help='JSONL of {"id": ..., "completion": ...} to score.'),
    split: str = typer.Option(None, "--split", help="Dataset split (default: the task's evaluation split)."),
    limit: int = typer.Option(None, "--limit", help="Only the first N items of the split."),
    samples: int = typer.Option(1, "--samples", help="Completions per item with --model: 1 = greedy, n>1 = sampled (pass@k)."),
    output: Path = typer.Option(None, "--output", help="Output directory (default runs/eval-TASK-TIMESTAMP)."),
    max_new_tokens: int = typer.Option(None, "--max-new-tokens", help="Generation budget (default: the task's)."),
    data_file: Path = typer.Option(None, "--data-file", help="Local JSON/JSONL/CSV/Parquet file in the hub layout."),
    batch_size: int = typer.Option(16, "--batch-size", help="Generation batch size."),
) -> None:
    """Evaluate a model (--model) or scored predictions (--predictions) on a benchmark task."""
    console = Console()
    with cli_errors():
        pm = ctx.find_root().obj
        began = time.perf_counter()
        if (model is None) == (predictions is None):
            raise UsageError("give exactly one of --model M (generate) or --predictions FILE.jsonl (score)")
        if samples < 1:
            raise UsageError(f"--samples must be >= 1, got {samples}")
        if predictions is not None and samples != 1:
            raise UsageError("--samples applies to --model; with --predictions, give several records per id instead")
        task_obj: Task = pm.registries.tasks.get(task)()
        split = split or task_obj.eval_split
        examples = task_obj.load(split, path=str(data_file) if data_file else None, limit=limit)
        if not examples:
            raise DataError(f"task '{task}' split '{split}' has no examples")
        loaded = time.perf_counter()
        max_new = max_new_tokens or task_obj.max_new_tokens
        if predictions is not None:
            pairs = match_predictions(task, split, examples, read_predictions(predictions))
        else:
            pairs = generate(model, examples, samples, max_new, batch_size, console)
        generated = time.perf_counter()
        scores = task_obj.score_batch([ex for ex, _ in pairs], [c for _, c in pairs])
        scored = time.perf_counter()
        metrics = summarize(task_obj, [ex for ex, _ in pairs], scores)
        metrics["items"] = float(len({ex.id for ex, _ in pairs}))
        metrics["completions"] = float(len(pairs))
        if predictions is not None:
            metrics["items_without_prediction"] = float(len(examples) - metrics["items"])
        output = output or Path("runs") / f"eval-{task}-{time.strftime('%Y%m%d-%H%M%S')}"
        results = {
            "task": task, "split": split, "metrics": metrics,
            "config": {"model": model, "predictions": str(predictions) if predictions else None,
                       "limit": limit, "samples": samples, "max_new_tokens": max_new,
                       "temperature": 0.0 if samples == 1 else SAMPLING_TEMPERATURE,
                       "data_file": str(data_file) if data_file else None, "batch_size": batch_size},
            "timings": {"load_s": loaded - began, "generate_s": generated - loaded, "score_s": scored - generated,
                        "total_s": time.perf_counter() - began},
        }
        write_outputs(output, results, pairs, scores)
    print_table(console, task, metrics)
    console.print(f"Wrote {output / 'results.json'} and {output / 'predictions.jsonl'}", highlight=False)
