"""Collect run directories into one results table (markdown + CSV); :mod:`unisd.ops.plots` draws them.

A run directory is anything ``unisd train`` (or ``unisd sweep``) wrote: ``config.toml``,
``metrics.jsonl``, ``eval/before.json`` and ``eval/after.json`` (the privileged gap), and
``eval/TASK/results.json`` from ``unisd eval``. Every file is optional and read tolerantly: a run
with a cut-off metrics line, an unknown config key or a results file of another shape still reports
what can be read. Passing a folder that is not itself a run (e.g. a sweep's output root) collects
every run below it.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..runlog import MetricsLog

RUN_FILES = ("config.toml", "metrics.jsonl", "sweep_job.json")
SKIP_DIRS = {"checkpoints", "final", "eval", "jobs", "logs", ".cache"}


@dataclass
class RunSummary:
    """What the report knows about one run."""

    path: Path
    name: str = ""
    task: str = ""
    method: str = ""
    components: str = ""
    steps: int = 0
    final_loss: float = math.nan
    final_divergence: float = math.nan
    scores: dict[str, float] = field(default_factory=dict)  # e.g. "demo/accuracy", "after/privileged_gap"
    records: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def privileged_gap(self) -> float:
        for key in ("after/privileged_gap", *sorted(k for k in self.scores if k.endswith("/privileged_gap"))):
            if key in self.scores:
                return self.scores[key]
        return math.nan


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str) and value.lower() in ("nan", "inf", "-inf"):
        return float(value)  # runlog writes non-finite floats as strings
    return None


def _read_json(path: Path, notes: list[str]) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        notes.append(f"{path.name}: unreadable ({exc.__class__.__name__})")
        return None


def _numeric_leaves(data: Any, prefix: str) -> dict[str, float]:
    """Numbers at the top level of a results object and inside a ``metrics`` (or ``summary``) table."""
    out: dict[str, float] = {}
    if not isinstance(data, dict):
        return out
    for key, value in data.items():
        num = _number(value)
        if num is not None:
            out[f"{prefix}/{key}"] = num
    for nested in ("metrics", "summary", "scores"):
        if isinstance(data.get(nested), dict):
            out.update(_numeric_leaves(data[nested], prefix))
    return out


def is_run_dir(path: Path) -> bool:
    return any((path / f).is_file() for f in RUN_FILES) or (path / "eval").is_dir()


def find_runs(paths: list[Path]) -> list[Path]:
    """The given run directories, and every run directory below a given folder that is not one."""
    found: list[Path] = []
    for path in paths:
        if not path.is_dir():
            raise UsageError(f"{path}: no such run directory")
        if is_run_dir(path):
            found.append(path)
            continue
        below = []
        for dirpath, dirnames, _ in os.walk(path):
            dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
            here = Path(dirpath)
            if here != path and is_run_dir(here):
                below.append(here)
                dirnames[:] = []  # a run's subfolders are not runs
        if not below:
            raise UsageError(f"{path}: no run directories found (expected config.toml, metrics.jsonl or eval/)")
        found.extend(below)
    unique = list(dict.fromkeys(p.resolve() for p in found))
    return unique


def load_run(path: Path) -> RunSummary:
    """Read one run directory; missing or malformed files become notes, never errors."""
    run = RunSummary(path=path)
    config: dict[str, Any] = {}
    if (path / "config.toml").is_file():
        try:
            config = tomllib.loads((path / "config.toml").read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            run.notes.append(f"config.toml: unreadable ({exc.__class__.__name__})")
    job = _read_json(path / "sweep_job.json", run.notes) if (path / "sweep_job.json").is_file() else None
    job = job if isinstance(job, dict) else {}
    data = config.get("data")
    run.task = str(config.get("task") or (Path(data).stem if data else "") or job.get("dataset")
                   or job.get("eval_task") or "")
    comps = config.get("components") if isinstance(config.get("components"), dict) else {}
    run.components = "; ".join(
        f"{name}({', '.join(f'{k}={v}' for k, v in sorted(opts.items()))})" if isinstance(opts, dict) and opts else name
        for name, opts in sorted(comps.items())
    )
    fallback = ("+".join(sorted(comps)) if comps else "plain") if config else "?"
    run.method = str(job.get("method") or config.get("preset") or fallback)

    run.records = MetricsLog(path / "metrics.jsonl").read()
    steps = [r for r in run.records if isinstance(r, dict) and "step" in r]
    if steps:
        last = steps[-1]
        run.steps = int(last.get("step", len(steps)))
        run.final_loss = _number(last.get("loss")) if _number(last.get("loss")) is not None else math.nan
        div = _number(last.get("divergence"))
        run.final_divergence = div if div is not None else math.nan

    eval_dir = path / "eval"
    if eval_dir.is_dir():
        for file in sorted(eval_dir.glob("*.json")):
            run.scores.update(_numeric_leaves(_read_json(file, run.notes), file.stem))
        for file in sorted(eval_dir.rglob("results.json")):
            name = file.parent.relative_to(eval_dir).as_posix()
            if name == ".":
                name = "eval"
            run.scores.update(_numeric_leaves(_read_json(file, run.notes), name))
    return run


def collect(paths: list[Path], baseline: Path | None = None) -> tuple[list[RunSummary], RunSummary | None]:
    """Load every run (the baseline too, if it is not among them) and give each a short unique name."""
    dirs = find_runs(paths)
    base_dir = None
    if baseline is not None:
        if not baseline.is_dir() or not is_run_dir(baseline):
            raise UsageError(f"--baseline {baseline}: not a run directory (no config.toml, metrics.jsonl or eval/)")
        base_dir = baseline.resolve()
        if base_dir not in dirs:
            dirs.insert(0, base_dir)
    runs = [load_run(d) for d in dirs]
    _name_runs(runs)
    base = next((r for r in runs if r.path == base_dir), None)
    return runs, base


def _name_runs(runs: list[RunSummary]) -> None:
    if len(runs) == 1:
        runs[0].name = runs[0].path.name
        return
    common = Path(os.path.commonpath([str(r.path) for r in runs]))
    for r in runs:
        rel = r.path.relative_to(common).as_posix()
        r.name = rel if rel != "." else r.path.name


def score_columns(runs: list[RunSummary]) -> list[str]:
    """Score columns in a stable order: evaluation results first, then before/after, then the rest."""
    keys = sorted({k for r in runs for k in r.scores})

    def rank(key: str) -> tuple[int, str]:
        head = key.split("/", 1)[0]
        return ({"after": 1, "before": 2}.get(head, 0), key)

    return sorted(keys, key=rank)


def main_metric(runs: list[RunSummary], requested: str | None = None) -> str:
    """The score the ablation chart shows: ``requested``, else the first accuracy, else the final loss."""
    columns = score_columns(runs)
    if requested:
        if requested not in columns and requested not in ("final_loss", "privileged_gap"):
            raise UsageError(f"--metric {requested}: no run has it; available: {', '.join(columns) or 'final_loss'}")
        return requested
    for key in columns:
        if key.endswith("/accuracy") or key.endswith("/student_accuracy"):
            return key
    return columns[0] if columns else "final_loss"


def value_of(run: RunSummary, column: str) -> float:
    if column == "final_loss":
        return run.final_loss
    if column == "final_divergence":
        return run.final_divergence
    if column == "privileged_gap":
        return run.privileged_gap
    return run.scores.get(column, math.nan)


def table_rows(runs: list[RunSummary], baseline: RunSummary | None) -> tuple[list[str], list[dict[str, Any]]]:
    """Rows of plain values plus ``delta <column>`` (run − baseline) for every numeric column."""
    numeric = ["final_loss", "final_divergence", *score_columns(runs), "privileged_gap"]
    rows = []
    for r in runs:
        row: dict[str, Any] = {"run": r.name, "task": r.task, "method": r.method, "components": r.components,
                               "steps": r.steps}
        for col in numeric:
            row[col] = value_of(r, col)
        if baseline is not None:
            for col in numeric:
                row[f"delta {col}"] = value_of(r, col) - value_of(baseline, col)
        rows.append(row)
    return numeric, rows


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def to_csv(runs: list[RunSummary], baseline: RunSummary | None) -> str:
    _, rows = table_rows(runs, baseline)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["run"], lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})
    return buf.getvalue()


def to_markdown(runs: list[RunSummary], baseline: RunSummary | None, metric: str) -> str:
    """A markdown table; numeric cells show ``value (±delta vs baseline)``."""
    numeric, rows = table_rows(runs, baseline)
    numeric = [c for c in numeric if any(not math.isnan(r[c]) for r in rows)]
    head = ["run", "task", "method", "components", "steps", *numeric]
    lines = ["# Results", ""]
    if baseline is not None:
        lines.append(f"Deltas in parentheses are against the baseline run `{baseline.name}`.")
    lines.append(f"Main metric: `{metric}`.")
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = []
        for col in head:
            text = _fmt(row[col]).replace("|", "\\|")
            delta = row.get(f"delta {col}")
            if col in numeric and baseline is not None and isinstance(delta, float) and text and not math.isnan(delta):
                text += f" ({delta:+.4g})"
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"- `{r.name}`: {n}" for r in runs for n in r.notes]
    if notes:
        lines += ["", "Notes:", *notes]
    return "\n".join(lines) + "\n"


def write_report(runs: list[RunSummary], baseline: RunSummary | None, output: Path, metric: str | None = None,
                 plots: bool = True) -> list[Path]:
    """Write results.md, results.csv, report.json and (with ``plots``) the PNG figures; returns the files."""
    if not runs:
        raise UsageError("no runs to report")
    if plots:
        from .plots import require_matplotlib

        require_matplotlib()  # fail before writing anything
    chosen = main_metric(runs, metric)
    output.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in (("results.md", to_markdown(runs, baseline, chosen)), ("results.csv", to_csv(runs, baseline))):
        (output / name).write_text(text, encoding="utf-8")
        written.append(output / name)
    _, rows = table_rows(runs, baseline)
    clean = [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()} for row in rows]
    data = {"metric": chosen, "baseline": baseline.name if baseline else None, "runs": clean}
    (output / "report.json").write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    written.append(output / "report.json")
    if plots:
        from .plots import plot_all

        written += plot_all(runs, baseline, chosen, output)
    return written
