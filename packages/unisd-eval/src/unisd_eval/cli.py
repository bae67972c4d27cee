"""``unisd eval TASK``: score a model's generations, or a file of predictions, on a benchmark task.

Writes ``results.json`` (metrics, config, timings, environment) and ``predictions.jsonl`` (one record
per completion, with the gold reference) into the output directory, each file atomically, and prints
the metrics as a table with the headline score and its denominator. ``unisd eval retention`` measures
instead how far a trained model moved from its base (:mod:`unisd_eval.retention`).
"""

from __future__ import annotations

import json
import math
import subprocess
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from unisd.commands import cli_errors
from unisd.config import DTYPE_CHOICES as DTYPES
from unisd.config import EVAL_BATCH_SIZE
from unisd.data.tasks import Example, Score, Task, iter_jsonl_lines
from unisd.errors import DataError, UnisdError, UsageError
from unisd.evaluation.leakage import leakage_flags, leakage_rate, overrun_flags, share
from unisd.io import atomic

from .protocols import DEFAULT, check_protocol, retry_rounds, retry_unparsed, use_protocol
from .protocols import describe as describe_protocol
from .retention import RETENTION, base_of, check_same_vocabulary, measure, prompts_task_of

SAMPLING_TEMPERATURE = 0.7  # the method's sampling temperature, used for pass@k with --samples > 1
MISSING_POLICIES = ("error", "fail")
MISSING_VERDICT = "missing"
SCORING_ERROR_VERDICT = "scoring-error"
OUTPUT_FILES = ("results.json", "predictions.jsonl")
COUNT_METRICS = ("items", "completions", "items_without_prediction", "problems", "samples_per_problem",
                 "retries/items", "retries/recovered", "tokens_forward", "tokens_reverse")
STDERR_METRICS = ("accuracy", "pass@1")  # means of per-item 0/1 scores: binomial standard error
HEADLINE_METRICS = ("pass@1", "accuracy")
BACKENDS = ("hf", "vllm")
VERSIONED = {"unisd": "unisd-core", "unisd_eval": "unisd-eval", "torch": "torch", "transformers": "transformers"}
SHOWN_IDS = 5  # ids named in an error message

Row = tuple[Example, str | None]  # a completion, or None for an item without a prediction


# ----------------------------------------------------------------------------------------------
# Reading and matching predictions


def utf8_lines(path: Path) -> Iterator[str]:
    """The file's lines, decoded one at a time so that a non-UTF-8 byte is reported with its line.

    Text-mode reading decodes in blocks: the error would name no line, and the block may start lines
    before the bad one. A UTF-8 byte-order mark at the start is dropped (some editors write one).
    """
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                yield raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(
                    f"{path}:{lineno}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}); "
                    "save the predictions file as UTF-8"
                ) from None


def read_predictions(path: Path) -> dict[str, list[str]]:
    """``{"id": ..., "completion": ...}`` per line → completions per id (several = several samples)."""
    if not path.is_file():
        raise DataError(f"--predictions {path}: no such file (expected JSONL with 'id' and 'completion')")
    by_id: dict[str, list[str]] = defaultdict(list)
    for where, record in iter_jsonl_lines(utf8_lines(path), str(path), "with 'id' and 'completion'"):
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


def missing_items(examples: list[Example], by_id: dict[str, list[str]]) -> list[Example]:
    """The examples of the split (after --limit) that no prediction answers, in split order."""
    return [ex for ex in examples if ex.id not in by_id]


def missing_error(task: str, split: str, examples: list[Example], missing: list[Example]) -> UsageError:
    """The default --missing policy's error: how many and which items lack a prediction, and the ways out."""
    ids = ", ".join(ex.id for ex in missing[:SHOWN_IDS]) + (", ..." if len(missing) > SHOWN_IDS else "")
    covered = len(examples) - len(missing)
    # Predictions made for the first N items (a --limit run elsewhere) are the common case: name that N.
    prefix = {ex.id for ex in examples[:covered]}.isdisjoint(ex.id for ex in missing)
    limit_hint = f"--limit {covered} (the predictions cover the first {covered} items)" if prefix else "--limit N"
    return UsageError(
        f"--predictions: no prediction for {len(missing)} of {len(examples)} items of task '{task}' "
        f"split '{split}' ({ids}). Scoring only the predicted items would inflate the score: use "
        f"--missing fail to count them as failed, or {limit_hint} to evaluate fewer items."
    )


def missing_rows(missing: list[Example], by_id: dict[str, list[str]]) -> list[Row]:
    """Placeholder rows for ``--missing fail``: each missing item as failed samples.

    As many samples as the least-sampled predicted item, so pass@k for every k the predictions allow is
    still reported (with the missing items at 0) instead of collapsing to pass@1.
    """
    per_item = min((len(c) for c in by_id.values()), default=1)
    return [(ex, None) for ex in missing for _ in range(per_item)]


# ----------------------------------------------------------------------------------------------
# Generating and scoring


class Generator:
    """A loaded model that completes examples' prompts: greedy, or sampled at a temperature."""

    def __init__(self, model_ref: str, max_new_tokens: int, batch_size: int, console: Console, dtype: str = "auto"):
        from unisd.model.models import load_model, load_tokenizer, resolve_model

        source = resolve_model(model_ref, progress=console.print)
        self.tokenizer = load_tokenizer(source)
        self.model = load_model(source, dtype=dtype)
        self.max_new_tokens, self.batch_size, self.console = max_new_tokens, batch_size, console

    def complete(self, examples: list[Example], temperature: float) -> list[str]:
        """One completion per example (in order), with a progress bar."""
        from rich.progress import Progress

        from unisd.evaluation.evaluate import generate_texts

        with Progress(console=self.console, transient=True) as progress:
            bar = progress.add_task("generating", total=len(examples))
            return generate_texts(self.model, self.tokenizer, [ex.prompt for ex in examples], self.max_new_tokens,
                                  self.batch_size, systems=[ex.system for ex in examples], temperature=temperature,
                                  progress=lambda n: progress.advance(bar, n))


def generate(generator: Generator, examples: list[Example], samples: int) -> list[tuple[Example, str]]:
    """Greedy completions (samples == 1) or ``samples`` sampled ones per example."""
    flat = [ex for ex in examples for _ in range(samples)]
    temperature = 0.0 if samples == 1 else SAMPLING_TEMPERATURE
    return list(zip(flat, generator.complete(flat, temperature), strict=True))


def score_apart(task: Task, examples: list[Example], completions: list[str], exc: Exception) -> list[Score]:
    """Scores of a batch on which ``score_batch`` raised ``exc``: its halves apart, down to single items.

    One odd completion (e.g. a lone surrogate the scorer cannot encode) must not cost the whole
    evaluation: its item becomes a failed Score carrying the exception, the others keep their verdicts.
    Halving keeps the scorer's batch parallelism (a sandbox pool) for the items that work. Typed unisd
    errors are the user's input problems and still stop the run.
    """
    if len(examples) == 1:
        return [Score(0.0, None, SCORING_ERROR_VERDICT, f"scoring raised {type(exc).__name__}: {exc}")]
    mid = len(examples) // 2
    out: list[Score] = []
    for part in (slice(0, mid), slice(mid, None)):
        try:
            out += task.score_batch(examples[part], completions[part])
        except UnisdError:
            raise
        except Exception as part_exc:  # any scorer failure is narrowed down to its item(s)
            out += score_apart(task, examples[part], completions[part], part_exc)
    return out


def score_rows(task: Task, rows: list[Row], console: Console) -> list[Score]:
    """Scores of every row: the task's verdict for completions, a failed "missing" one for the rest."""
    scored = [i for i, (_, c) in enumerate(rows) if c is not None]
    examples = [rows[i][0] for i in scored]
    completions = [rows[i][1] or "" for i in scored]
    try:
        found = task.score_batch(examples, completions)
    except UnisdError:
        raise
    except Exception as exc:  # narrowed down to the failing items, then judged below
        found = score_apart(task, examples, completions, exc)
        errors = [ex.id for ex, s in zip(examples, found, strict=True) if s.verdict == SCORING_ERROR_VERDICT]
        if len(errors) == len(found) > 1:
            raise  # every item failed: the scorer is broken, not one completion
        if errors:
            console.print(f"warning: scoring raised for {len(errors)} completion(s) (first: {errors[0]}); "
                          "they count as failed, the error is in predictions.jsonl", markup=False, highlight=False)
    scores = [Score(0.0, None, MISSING_VERDICT, "no prediction for this item") for _ in rows]
    for i, score in zip(scored, found, strict=True):
        scores[i] = score
    return scores


# ----------------------------------------------------------------------------------------------
# Metrics


def summarize(task: Task, examples: list[Example], scores: list[Score]) -> dict[str, float]:
    """The task's summary metrics: ``summarize(examples, scores)`` when it has one, else ``aggregate``."""
    fn = getattr(task, "summarize", None)
    return dict(fn(examples, scores)) if callable(fn) else dict(task.aggregate(scores))


def leakage_metrics(task: Task, rows: list[Row]) -> dict[str, float]:
    """``leakage`` (the share of completions holding text only the teacher saw: its template, spans of the
    reference) and ``overrun`` (the share that reproduce the reference's ending and go on writing), as
    training's held-out evaluation counts them (:mod:`unisd.evaluation.leakage`); items without a
    completion are left out."""
    present = [(ex, c) for ex, c in rows if c is not None]
    if not present:
        return {}
    examples, completions = [ex for ex, _ in present], [c for _, c in present]
    return {"leakage": leakage_rate(leakage_flags(examples, completions, task)),
            "overrun": share(overrun_flags(examples, completions))}


def per_item_values(rows: list[Row], scores: list[Score]) -> list[float]:
    """Each item's mean score over its samples (its pass rate for code tasks)."""
    values: dict[str, list[float]] = defaultdict(list)
    for (ex, _), score in zip(rows, scores, strict=True):
        values[ex.id].append(score.value)
    return [sum(v) / len(v) for v in values.values()]


def standard_error(values: list[float]) -> float:
    """Standard error of the mean, ``sqrt(var / n)``; for 0/1 values that is ``sqrt(p(1-p)/n)``."""
    if not values:
        return 0.0
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / len(values) / len(values))


def with_stderrs(metrics: dict[str, Any], item_values: list[float]) -> dict[str, Any]:
    """``METRIC_stderr`` right after each mean-type headline metric (items are the sampling unit)."""
    stderr = standard_error(item_values)
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        out[key] = value
        if key in STDERR_METRICS:
            out[f"{key}_stderr"] = stderr
    return out


def integer_counts(metrics: dict[str, Any]) -> dict[str, Any]:
    """Counts as ints (tasks report them as floats), so results.json and the table read ``164``."""
    return {k: int(v) if k in COUNT_METRICS and float(v).is_integer() else v for k, v in metrics.items()}


def headline_key(metrics: dict[str, Any]) -> str | None:
    """The task's main score among its metrics (pass@1 for code, accuracy otherwise), or None."""
    return next((k for k in HEADLINE_METRICS if k in metrics), None)


def headline(metrics: dict[str, Any], scores: list[Score]) -> str | None:
    """``pass@1 = 0.0061 (1/164 items)``: the main score beside its denominator."""
    key = headline_key(metrics)
    if key is None:
        return None
    items = metrics["items"]
    if len(scores) == items:  # one completion per item: the numerator is a count
        return f"{key} = {metrics[key]:.4f} ({round(sum(s.value for s in scores))}/{items} items)"
    return f"{key} = {metrics[key]:.4f} over {items} items ({len(scores)} samples)"


# ----------------------------------------------------------------------------------------------
# Output


def check_output(output: Path, overwrite: bool) -> None:
    """Refuse to replace an earlier evaluation's files unless --overwrite: checked before any work."""
    if output.exists() and not output.is_dir():
        raise UsageError(f"--output {output}: exists and is not a directory")
    found = [name for name in OUTPUT_FILES if (output / name).exists()]
    if found and not overwrite:
        raise UsageError(f"--output {output}: already holds {' and '.join(found)} from an earlier evaluation; "
                         "choose another directory or pass --overwrite to replace them")


def git_commit(cwd: Path) -> str | None:
    """The checkout's HEAD commit when ``cwd`` is in a git checkout; None without git or a checkout."""
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = done.stdout.strip() if done.returncode == 0 else ""
    return commit or None


def sandbox_description(task: Task) -> dict[str, Any] | None:
    """How a code task's programs were contained on this machine (None for tasks that run no code)."""
    sandbox = getattr(task, "sandbox", None)
    describe = getattr(sandbox, "describe", None)
    return describe() if callable(describe) else None


def environment(cwd: Path) -> dict[str, Any]:
    """What a result should be reproducible from: the date (UTC), package versions, the git commit."""
    versions = {}
    for key, dist in VERSIONED.items():
        try:
            versions[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return {"date": datetime.now(UTC).isoformat(timespec="seconds"), "versions": versions,
            "git_commit": git_commit(cwd)}


def json_line(record: dict[str, Any]) -> str:
    """One JSONL line, readable UTF-8 when possible.

    A lone surrogate (a completion with JSON "\\ud800") has no UTF-8 form: that record is written with
    ASCII escapes instead, which read back to the same string.
    """
    line = json.dumps(record, ensure_ascii=False)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        line = json.dumps(record, ensure_ascii=True)
    return line


def write_outputs(output: Path, results: dict[str, Any], rows: list[Row], scores: list[Score]) -> None:
    """results.json and predictions.jsonl, each replaced atomically (results.json last: it marks completion)."""
    seen: dict[str, int] = defaultdict(int)
    lines = []
    for (ex, completion), score in zip(rows, scores, strict=True):
        lines.append(json_line({
            "id": ex.id, "sample": seen[ex.id], "prompt": ex.prompt, "completion": completion,
            "reference": ex.reference, "extracted": score.extracted, "verdict": score.verdict,
            "value": score.value, "error": score.error,
        }))
        seen[ex.id] += 1
    atomic.write_text(output / "predictions.jsonl", "".join(line + "\n" for line in lines))
    # ensure_ascii (the default) also covers surrogates in paths or metric names.
    atomic.write_text(output / "results.json", json.dumps(results, indent=2, default=str) + "\n")


def print_table(console: Console, task: str, metrics: dict[str, Any]) -> None:
    table = Table(title=f"unisd eval {task}", title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    console.print(table)


# ----------------------------------------------------------------------------------------------
# The command


def run_retention(pm: Any, model: str, base: str | None, prompts_from: str | None, split: str | None,
                  limit: int | None, max_new_tokens: int | None, data_file: Path | None, batch_size: int,
                  output: Path, console: Console) -> None:
    """``unisd eval retention``: the trained model against its base on a task's prompts (§5.5)."""
    from unisd.model.models import load_model, load_tokenizer, resolve_model

    began = time.perf_counter()
    base_ref = base_of(model, base)
    task_name, why = prompts_task_of(model, prompts_from)
    task_obj: Task = pm.registries.tasks.get(task_name)()
    split = split or task_obj.eval_split
    examples = task_obj.load(split, path=str(data_file) if data_file else None, limit=limit)
    if not examples:
        raise DataError(f"task '{task_name}' split '{split}' has no examples")
    console.print(f"Retention of {model} against {base_ref} on {len(examples)} prompts of task '{task_name}' "
                  f"split '{split}' ({why})", highlight=False)
    source = resolve_model(model, progress=console.print)
    base_source = resolve_model(base_ref, progress=console.print)
    tokenizer = load_tokenizer(source)
    trained, base_model = load_model(source), load_model(base_source)
    check_same_vocabulary(trained, base_model, model, base_ref)
    max_new = max_new_tokens or task_obj.max_new_tokens
    metrics, items = measure(trained, base_model, tokenizer, examples, max_new, batch_size)
    metrics = integer_counts(metrics)
    results = {
        "task": RETENTION, "prompts": {"task": task_name, "split": split, "source": why}, "metrics": metrics,
        "config": {"model": model, "base": base_ref, "limit": limit, "max_new_tokens": max_new, "temperature": 0.0,
                   "data_file": str(data_file) if data_file else None, "batch_size": batch_size},
        "environment": environment(Path.cwd()),
        "timings": {"total_s": time.perf_counter() - began},
    }
    atomic.write_text(output / "predictions.jsonl", "".join(json_line(r) + "\n" for r in items))
    atomic.write_text(output / "results.json", json.dumps(results, indent=2, default=str) + "\n")
    print_table(console, RETENTION, metrics)
    console.print(f"Wrote {output / 'results.json'} and {output / 'predictions.jsonl'}", highlight=False)


def eval_command(
    ctx: typer.Context,
    task: str = typer.Argument(None, help="A registered task, e.g. humaneval, mbpp, gsm8k (see `unisd plugins`), several "
                               "separated by commas (humaneval,mbpp), or 'retention': the model against its base "
                               "(--base) on a task's prompts."),
    tasks: str = typer.Option(None, "--tasks", metavar="A,B", help="Several tasks in one call (the model loads once); "
                              "each writes OUTPUT/TASK/, and OUTPUT/summary.json lists their headline scores."),
    model: str = typer.Option(None, "--model", help="HF hub id, local HF directory, .gguf file, or 'smollm2'."),
    predictions: Path = typer.Option(None, "--predictions", help='JSONL of {"id": ..., "completion": ...} to score.'),
    split: str = typer.Option(None, "--split", help="Dataset split (default: the task's evaluation split)."),
    limit: int = typer.Option(None, "--limit", help="Only the first N items of the split."),
    samples: int = typer.Option(1, "--samples", help="Completions per item with --model: 1 = greedy, n>1 = sampled (pass@k)."),
    missing: str = typer.Option("error", "--missing", help="Items of the split without a prediction: "
                                "'error' (default) stops, 'fail' scores each as a failed completion."),
    output: Path = typer.Option(None, "--output", help="Output directory (default runs/eval-TASK-TIMESTAMP)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace results.json/predictions.jsonl already in --output."),
    max_new_tokens: int = typer.Option(None, "--max-new-tokens", help="Generation budget (default: the task's)."),
    data_file: Path = typer.Option(None, "--data-file", help="Local JSON/JSONL/CSV/Parquet file in the hub layout."),
    batch_size: int = typer.Option(EVAL_BATCH_SIZE, "--batch-size", help="Generation batch size."),
    dtype: str = typer.Option("auto", "--dtype", help="Weights' dtype with --model: auto, float32, bfloat16 or float16."),
    backend: str = typer.Option("hf", "--backend", help="Generation with --model: 'hf' (transformers) or 'vllm' "
                                "(needs vLLM; a LoRA run's final/ is served as its base plus the adapter)."),
    base: str = typer.Option(None, "--base", help="retention: the base model (default: the one an adapter records)."),
    prompts_from: str = typer.Option(None, "--prompts-from", help="retention: the task whose prompts to use "
                                     "(default: the run's task, else demo)."),
    protocol: str = typer.Option(DEFAULT, "--protocol", help="Scoring protocol: 'default', or 'research' (the "
                                 "research code's MCQA extraction order and tool-use retries, for comparing "
                                 "with the paper)."),
) -> None:
    """Evaluate a model (--model) or scored predictions (--predictions) on one or more benchmark tasks."""
    console = Console()
    with cli_errors():
        pm = ctx.find_root().obj
        names = task_names(task, tasks)
        check_options(model, predictions, samples, missing, backend, dtype, protocol)
        check_task_options(pm, names, base, prompts_from, predictions, split, data_file)
        stamp = time.strftime('%Y%m%d-%H%M%S')
        root = output or Path("runs") / (f"eval-{names[0]}-{stamp}" if len(names) == 1 else f"eval-{stamp}")
        outputs = {name: root if len(names) == 1 else root / name for name in names}
        for out in outputs.values():
            check_output(out, overwrite)  # before the dataset, the model and scoring: fail in seconds
        if names == [RETENTION]:
            check_retention_options(model, predictions, samples, protocol)
            run_retention(pm, model, base, prompts_from, split, limit, max_new_tokens, data_file, batch_size,
                          root, console)
            return
        settings = EvalSettings(model, predictions, split, limit, samples, missing, max_new_tokens, data_file,
                                batch_size, protocol, backend)
        generator = make_generator(model, backend, batch_size, dtype, console) if model is not None else None
        summary = {name: evaluate_task(pm, name, settings, generator, outputs[name], console) for name in names}
        if len(names) > 1:
            atomic.write_text(root / "summary.json", json.dumps(
                {"model": model, "tasks": summary, "environment": environment(Path.cwd())}, indent=2, default=str) + "\n")
    if len(names) > 1:
        print_summary(console, summary, root)


def make_generator(model: str, backend: str, batch_size: int, dtype: str, console: Console) -> Any:
    """What generates the completions with --model: transformers, or vLLM (loaded once for every task)."""
    if backend == "vllm":
        from .vllm_generator import VLLMGenerator

        return VLLMGenerator(model, 0, batch_size, console, dtype=dtype)
    return Generator(model, 0, batch_size, console, dtype=dtype)


@dataclass(frozen=True)
class EvalSettings:
    """The settings of one `unisd eval` call that every task it evaluates shares."""

    model: str | None
    predictions: Path | None
    split: str | None
    limit: int | None
    samples: int
    missing: str
    max_new_tokens: int | None
    data_file: Path | None
    batch_size: int
    protocol: str
    backend: str = "hf"


def task_names(task: str | None, tasks: str | None) -> list[str]:
    """The tasks of the call, from the argument or --tasks (one of them), commas separating names."""
    if (task is None) == (tasks is None):
        raise UsageError("name the task(s): `unisd eval TASK` or `unisd eval --tasks A,B` (one of the two)")
    names = [n.strip() for n in (task or tasks or "").split(",") if n.strip()]
    if not names:
        raise UsageError("no task named: give e.g. `unisd eval humaneval` or `--tasks humaneval,mbpp`")
    if len(set(names)) < len(names):
        raise UsageError(f"a task is named twice in {task or tasks!r}")
    return names


def check_options(model: str | None, predictions: Path | None, samples: int, missing: str, backend: str,
                  dtype: str, protocol: str) -> None:
    """The options every call checks, before anything loads: one source of completions, known values."""
    if (model is None) == (predictions is None):
        raise UsageError("give exactly one of --model M (generate) or --predictions FILE.jsonl (score)")
    if samples < 1:
        raise UsageError(f"--samples must be >= 1, got {samples}")
    if predictions is not None and samples != 1:
        raise UsageError("--samples applies to --model; with --predictions, give several records per id instead")
    if missing not in MISSING_POLICIES:
        raise UsageError(f"--missing must be one of {', '.join(MISSING_POLICIES)}, got {missing!r}")
    if backend not in BACKENDS:
        raise UsageError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if dtype not in DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    check_protocol(protocol)


def check_task_options(pm: Any, names: list[str], base: str | None, prompts_from: str | None,
                       predictions: Path | None, split: str | None, data_file: Path | None) -> None:
    """The options that belong to one kind of call: --base and --prompts-from to retention; --predictions,
    --split and --data-file to a single task. With several tasks every name is checked here, before the
    model loads."""
    if (base or prompts_from) and names != [RETENTION]:
        raise UsageError(f"--base and --prompts-from apply to `unisd eval {RETENTION}`, not to task {','.join(names)!r}")
    if len(names) > 1:
        given = [flag for flag, value in (("--predictions", predictions), ("--split", split),
                                          ("--data-file", data_file)) if value is not None]
        if given or RETENTION in names:
            raise UsageError(f"several tasks in one call take --model and shared settings; {given[0] if given else RETENTION} "
                             "belongs to one task: evaluate that task on its own")
        for name in names:
            pm.registries.tasks.get(name)


def check_retention_options(model: str | None, predictions: Path | None, samples: int, protocol: str) -> None:
    """`unisd eval retention` compares the greedy answers of a model and its base: it needs --model, and
    the scoring options do not apply."""
    if model is None or predictions is not None:
        raise UsageError(f"`unisd eval {RETENTION}` needs --model RUN/final (and --base BASE), not --predictions")
    if samples != 1 or protocol != DEFAULT:
        raise UsageError(f"`unisd eval {RETENTION}` compares greedy answers: --samples and --protocol do not apply")


def evaluate_task(pm: Any, task: str, s: EvalSettings, generator: Any, output: Path,
                  console: Console) -> dict[str, Any]:
    """Evaluate one task (generating with ``generator``, or scoring ``s.predictions``), write its files,
    print its table, and return its headline numbers."""
    began = time.perf_counter()
    task_obj: Task = use_protocol(pm.registries.tasks.get(task)(), s.protocol)
    split = s.split or task_obj.eval_split
    examples = task_obj.load(split, path=str(s.data_file) if s.data_file else None, limit=s.limit)
    if not examples:
        raise DataError(f"task '{task}' split '{split}' has no examples")
    loaded = time.perf_counter()
    max_new = s.max_new_tokens or task_obj.max_new_tokens
    rows, absent = task_rows(task, split, examples, s, generator, max_new)
    rounds = retry_rounds(task_obj, s.protocol, generating=s.predictions is None)
    if rounds:
        rows, retries = retry_unparsed(task_obj, rows, generator.complete, rounds)  # type: ignore[union-attr]
    generated = time.perf_counter()
    scores = score_rows(task_obj, rows, console)
    scored = time.perf_counter()
    metrics = summarize(task_obj, [ex for ex, _ in rows], scores)
    metrics = with_stderrs(metrics, per_item_values(rows, scores))
    metrics.update(leakage_metrics(task_obj, rows))
    if absent and any(k.startswith("verdict/") for k in metrics):  # the verdict shares still sum to 1
        metrics["verdict/missing"] = sum(sc.verdict == MISSING_VERDICT for sc in scores) / len(scores)
    metrics["items"] = len({ex.id for ex, _ in rows})
    metrics["completions"] = sum(c is not None for _, c in rows)
    if s.predictions is not None:
        metrics["items_without_prediction"] = len(absent)
    if rounds:
        metrics.update(retries.metrics())
    metrics = integer_counts(metrics)
    results = {
        "task": task, "split": split, "protocol": describe_protocol(s.protocol, rounds), "metrics": metrics,
        "missing": {"policy": s.missing, "items": len(absent), "ids": [ex.id for ex in absent]},
        "scoring_errors": sum(sc.verdict == SCORING_ERROR_VERDICT for sc in scores),
        "config": run_settings(s, max_new),
        "environment": environment(Path.cwd()),
        "sandbox": sandbox_description(task_obj),
        "timings": {"load_s": loaded - began, "generate_s": generated - loaded, "score_s": scored - generated,
                    "total_s": time.perf_counter() - began},
    }
    write_outputs(output, results, rows, scores)
    print_task_result(console, task, metrics, scores, len(absent), output)
    key = headline_key(metrics)
    return {"metric": key, "value": metrics.get(key), "stderr": metrics.get(f"{key}_stderr"),
            "items": metrics["items"], "output": str(output)}


def task_rows(task: str, split: str, examples: list[Example], s: EvalSettings, generator: Any,
              max_new: int) -> tuple[list[Row], list[Example]]:
    """Each item's completions, from --predictions (with the items that have none) or generated."""
    if s.predictions is None:
        assert generator is not None
        generator.max_new_tokens = max_new
        return list(generate(generator, examples, s.samples)), []
    by_id = read_predictions(s.predictions)
    rows = list(match_predictions(task, split, examples, by_id))
    absent = missing_items(examples, by_id)
    if absent and s.missing == "error":
        raise missing_error(task, split, examples, absent)
    return rows + missing_rows(absent, by_id), absent


def run_settings(s: EvalSettings, max_new: int) -> dict[str, Any]:
    """results.json's "config": what produced these numbers."""
    return {"model": s.model, "predictions": str(s.predictions) if s.predictions else None,
            "limit": s.limit, "samples": s.samples, "missing": s.missing, "max_new_tokens": max_new,
            "temperature": 0.0 if s.samples == 1 else SAMPLING_TEMPERATURE,
            "data_file": str(s.data_file) if s.data_file else None, "batch_size": s.batch_size,
            "backend": s.backend if s.model is not None else None}


def print_task_result(console: Console, task: str, metrics: dict[str, Any], scores: list[Score], absent: int,
                      output: Path) -> None:
    """One task's table, its headline line, and where its files are."""
    print_table(console, task, metrics)
    line = headline(metrics, scores)
    if line:
        console.print(line, highlight=False)
    if absent:
        console.print(f"{absent} item(s) had no prediction and count as failed (--missing fail)", highlight=False)
    console.print(f"Wrote {output / 'results.json'} and {output / 'predictions.jsonl'}", highlight=False)


def print_summary(console: Console, summary: dict[str, dict[str, Any]], root: Path) -> None:
    """One line per task: its headline score ± standard error, over how many items."""
    table = Table(title="unisd eval: summary", title_justify="left")
    for col in ("task", "metric", "value", "stderr", "items"):
        table.add_column(col, justify="right" if col in ("value", "stderr", "items") else "left")
    for name, row in summary.items():
        value, stderr = row["value"], row["stderr"]
        table.add_row(name, row["metric"] or "-", "-" if value is None else f"{value:.4f}",
                      "-" if stderr is None else f"{stderr:.4f}", str(row["items"]))
    console.print(table)
    console.print(f"Wrote {root / 'summary.json'}", highlight=False)
