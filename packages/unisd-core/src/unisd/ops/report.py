"""Collect run directories into results tables (markdown + CSV); :mod:`unisd.ops.plots` draws them.

A run directory is anything ``unisd train`` (or ``unisd sweep``) wrote: ``config.toml``,
``metrics.jsonl``, ``eval/before.json`` and ``eval/after.json`` (the privileged gap), and
``eval/TASK/results.json`` from ``unisd eval``. Every file is optional and read tolerantly: a run
with a cut-off metrics line, an unknown config key or a results file of another shape still reports
what can be read. Passing a folder that is not itself a run (e.g. a sweep's output root) collects
every run below it.

Metric names (each usable as ``--metric``):

* ``before/KEY``, ``after/KEY``: ``eval/before.json`` / ``eval/after.json`` (student_accuracy,
  teacher_accuracy, privileged_gap, n); ``after/gap_closed`` = (after − before student accuracy) /
  (before teacher − before student accuracy), the fraction of the privileged gap training closed,
  where that gap is positive.
* ``eval/TASK/KEY``: the last value an evaluation during training (``--eval-task``) logged to
  metrics.jsonl; the whole series is drawn as a curve.
* ``TASK/KEY``: ``eval/TASK/results.json`` from ``unisd eval``.
* ``activity/NAME``: component NAME's ``activity`` (how much it acted: clip's clipped share, agreement's
  mean weight cut, ...) averaged over the run's steps.
* ``final_loss``, ``final_divergence``, and any other metrics.jsonl key (its last value).

Runs that differ only in their seed (every other key of config.toml equal) form a *group*; each
group is reported as mean, standard deviation and a 95% Student-t interval over its seeds
(:mod:`unisd.ops.stats`). When runs carry ``eval/before.json``, an extra group, the *untrained base*,
holds those before-training numbers under the ``after/…`` names, so it sits beside the trained
methods in every table and chart.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import re
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..io.runlog import MetricsLog
from .stats import CONFIDENCE, Summary, interval_description, summarize

RUN_FILES = ("config.toml", "metrics.jsonl", "sweep_job.json")
SKIP_DIRS = {"checkpoints", "final", "eval", "jobs", "logs", ".cache"}
# Failed attempts `unisd sweep` moved aside (NAME.partial-N, NAME.oom-N): the retry is the run.
ASIDE = re.compile(r".+\.(partial|oom)-\d+")
# Config keys that differ between the seeds of one experiment (or only say where it was written).
# The preset's name is left out too: config.toml records what it resolved to (every component option, the
# run settings), so a run started with --preset and one with the same components spelled out are one method.
NOT_IDENTITY = ("seed", "output", "preset")
# after/…, in this order: first-line and strict accuracy, the student's leakage and overrun, then the teacher and the gap
HELD_OUT = (
    "student_accuracy", "student_strict_accuracy", "leakage", "overrun", "teacher_accuracy", "privileged_gap", "gap_closed",
)
EVAL_HEADLINES = ("accuracy", "pass@1")  # the headline of a `unisd eval` results.json
# ... and what the tables show beside it (what a first-line accuracy alone would hide)
EVAL_SHOWN = (*EVAL_HEADLINES, "strict_accuracy", "leakage", "overrun")
UNTRAINED = "untrained (before training)"
SPECIAL = ("final_loss", "final_divergence", "privileged_gap")


@dataclass
class RunSummary:
    """What the report knows about one run."""

    path: Path
    name: str = ""
    task: str = ""
    model: str = ""
    method: str = ""
    components: str = ""
    steps: int = 0
    final_loss: float = math.nan
    final_divergence: float = math.nan
    scores: dict[str, float] = field(default_factory=dict)  # e.g. "demo/accuracy", "after/privileged_gap"
    records: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seed: int | None = None
    config: dict[str, Any] = field(default_factory=dict)
    identity: str = ""  # equal for runs that differ only in seed
    group: str = ""  # the label of its group (set by group_runs)

    @property
    def privileged_gap(self) -> float:
        for key in ("after/privileged_gap", *sorted(k for k in self.scores if k.endswith("/privileged_gap"))):
            if key in self.scores:
                return self.scores[key]
        return math.nan

    def logged(self, key: str) -> float:
        """The last numeric value of ``key`` in metrics.jsonl (NaN if it was never logged)."""
        for rec in reversed(self.records):
            value = _number(rec.get(key))
            if value is not None:
                return value
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
            dirnames[:] = sorted(d for d in dirnames
                                 if d not in SKIP_DIRS and not d.startswith(".") and not ASIDE.fullmatch(d))
            here = Path(dirpath)
            if here != path and is_run_dir(here):
                below.append(here)
                dirnames[:] = []  # a run's subfolders are not runs
        if not below:
            raise UsageError(f"{path}: no run directories found (expected config.toml, metrics.jsonl or eval/)")
        found.extend(below)
    unique = list(dict.fromkeys(p.resolve() for p in found))
    return unique


# ----------------------------------------------------------------------------------------------
# One run


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
    run.config = config
    _describe(run, config, job)
    run.records = MetricsLog(path / "metrics.jsonl").read()
    _read_training(run)
    _read_evaluations(run, path / "eval")
    return run


def _default_settings() -> dict[str, Any]:
    """Every RunConfig setting at its default (``components`` empty), as config.toml would write it."""
    from ..config import RunConfig

    return json.loads(json.dumps(dataclasses.asdict(RunConfig()), default=str))


def _describe(run: RunSummary, config: dict[str, Any], job: dict[str, Any]) -> None:
    """Task, method, components, seed and the identity that groups seeds (from config.toml/sweep_job.json)."""
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
    run.model = str(config.get("model") or job.get("model") or "")
    seed = config.get("seed", job.get("seed"))
    run.seed = seed if isinstance(seed, int) and not isinstance(seed, bool) else None
    source = config or job
    if source:
        if config:  # a setting an older config.toml lacks is that version's default: fill it in before comparing
            source = {**_default_settings(), **config}
        same = {k: v for k, v in source.items() if k not in NOT_IDENTITY and v is not None}
        # Two sweep methods with equal settings are still two methods (e.g. a control under another name).
        same["__sweep_method__"] = job.get("method")
        run.identity = json.dumps(same, sort_keys=True, default=str)
    else:
        run.identity = str(run.path)  # nothing says what it is: a group of its own


def _read_training(run: RunSummary) -> None:
    """Steps, final loss/divergence, and the last value of every evaluation logged during training."""
    steps = [r for r in run.records if isinstance(r, dict) and "step" in r]
    run.records = steps
    if steps:
        run.steps = int(steps[-1].get("step", len(steps)))
        run.final_loss = run.logged("loss")
        run.final_divergence = run.logged("divergence")
    for key in sorted({k for rec in steps for k in rec if k.startswith("eval/")}):
        value = run.logged(key)
        if not math.isnan(value):
            run.scores[key] = value
    # How much each component acted (unisd.activity): COMPONENT/activity averaged over the run's steps.
    for key in sorted({k for rec in steps for k in rec if k.endswith("/activity")}):
        values = [v for rec in steps if (v := _number(rec.get(key))) is not None and math.isfinite(v)]
        if values:
            run.scores[f"activity/{key.rsplit('/', 1)[0]}"] = sum(values) / len(values)


def _read_evaluations(run: RunSummary, eval_dir: Path) -> None:
    """before/after.json (and the fraction of the gap closed) and every `unisd eval` results.json."""
    if not eval_dir.is_dir():
        return
    for file in sorted(eval_dir.glob("*.json")):
        run.scores.update(_numeric_leaves(_read_json(file, run.notes), file.stem))
    for file in sorted(eval_dir.rglob("results.json")):
        name = file.parent.relative_to(eval_dir).as_posix()
        if name == ".":
            name = "eval"
        run.scores.update(_numeric_leaves(_read_json(file, run.notes), name))
    closed = gap_closed(run.scores)
    if closed is not None:
        run.scores["after/gap_closed"] = closed


def gap_closed(scores: dict[str, float]) -> float | None:
    """(after − before) / (teacher − before) on student accuracy, the teacher measured before training;
    None where there was no gap to close (teacher ≤ student before training) or a number is missing."""
    try:
        before, after = scores["before/student_accuracy"], scores["after/student_accuracy"]
        teacher = scores["before/teacher_accuracy"]
    except KeyError:
        return None
    if not teacher - before > 0:
        return None
    return (after - before) / (teacher - before)


# ----------------------------------------------------------------------------------------------
# Collecting and grouping


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


@dataclass
class Group:
    """Runs that differ only in seed (or one run), summarised together."""

    label: str
    runs: list[RunSummary]
    untrained: bool = False  # the before-training numbers of other runs
    shared: str = ""  # run-name parts every group has, left out of the label (e.g. "demo/smollm2")

    @property
    def method(self) -> str:
        return self.runs[0].method

    @property
    def seeds(self) -> list[int | None]:
        return [r.seed for r in self.runs]

    def values(self, column: str) -> list[float]:
        return [value_of(r, column) for r in self.runs]

    def stats(self, column: str, confidence: float = CONFIDENCE) -> Summary:
        return summarize(self.values(column), confidence)


def strip_seed(name: str, seed: int | None) -> str:
    """A run name without its seed: ``plain/demo/m-s1`` → ``plain/demo/m``, ``a/seed1_alpha0`` → ``a/alpha0``."""
    if seed is None:
        return name
    parts = []
    for part in name.split("/"):
        part = re.sub(rf"-s{seed}$", "", part)  # unisd sweep's seeds axis
        part = re.sub(rf"(^|_)seed-?{seed}(?=_|$)", "", part).strip("_")  # a [grid] seed axis
        if part:
            parts.append(part)
    return "/".join(parts)


def _label(members: list[RunSummary]) -> str:
    names = list(dict.fromkeys(strip_seed(r.name, r.seed) for r in members))
    if len(names) == 1:
        return names[0] or members[0].method
    text = " | ".join(names)  # hand-named run directories: say which they are
    return text if len(text) <= 60 else text[:57] + "..."


def group_runs(runs: list[RunSummary], baseline: RunSummary | None = None) -> list[Group]:
    """Groups in a stable order: the untrained base first, then the baseline's group, then the others in
    the order their first run was found. Each run's ``group`` is set to its group's label."""
    base_evals = [run for run in runs if is_base_evaluation(run)]
    by_identity: dict[str, list[RunSummary]] = {}
    for run in runs:
        if not is_base_evaluation(run):
            by_identity.setdefault(run.identity, []).append(run)
    groups = [Group(_label(members), members) for members in by_identity.values()]
    _drop_shared_parts(groups)
    if baseline is not None:
        groups.sort(key=lambda g: baseline not in g.runs)
    groups = untrained_groups(runs, base_evals) + groups
    seen: dict[str, int] = {}
    for group in groups:  # two groups with one label (differing only in an unnamed setting): number them
        seen[group.label] = seen.get(group.label, 0) + 1
        if seen[group.label] > 1:
            group.label += f" #{seen[group.label]}"
        for run in group.runs:
            run.group = group.label
    return groups


def _drop_shared_parts(groups: list[Group]) -> None:
    """Leave out of the labels the path parts every group shares (``plain/demo/smollm2`` and
    ``ema/demo/smollm2`` become ``plain`` and ``ema``): chart labels stay short. The parts left out
    are recorded in each group's ``shared``."""
    split = [g.label.split("/") for g in groups]
    if len(groups) < 2 or len({len(parts) for parts in split}) != 1:
        return
    keep = [i for i in range(len(split[0])) if len({parts[i] for parts in split}) > 1]
    if not keep:
        return
    shared = "/".join(part for i, part in enumerate(split[0]) if i not in keep)
    for group, parts in zip(groups, split, strict=True):
        group.label = "/".join(parts[i] for i in keep)
        group.shared = shared


def is_base_evaluation(run: RunSummary) -> bool:
    """A sweep's evaluation of a model as it is (``[eval] untrained = true``): no training run of its own."""
    return run.method == "untrained" and not run.config


def untrained_groups(runs: list[RunSummary], base_evals: Sequence[RunSummary] = ()) -> list[Group]:
    """The untrained base, from the runs' eval/before.json: one entry per seed, per model, task and item count;
    with the scores of the sweep's evaluations of that base model (``base_evals``: ``demo/accuracy`` ...).

    Its before-training numbers are stored under the ``after/…`` (and the periodic ``eval/TASK/…``) names,
    so they line up with the trained groups' columns; ``after/gap_closed`` is 0 by definition. Greedy
    evaluation of the same base weights gives the same numbers for every seed, so its spread is 0. A base
    model that only a sweep's evaluation measured is a group of one."""
    per_setting: dict[tuple[str, str, float], dict[int | None, RunSummary]] = {}
    for run in runs:
        if "before/student_accuracy" in run.scores:
            key = (run.model, run.task, run.scores.get("before/n", math.nan))
            per_setting.setdefault(key, {}).setdefault(run.seed, run)
    models = {model for model, _, _ in per_setting} | {r.model for r in base_evals}

    def label_of(model: str, task: str | None = None) -> str:  # names only what tells the groups apart
        return " ".join([UNTRAINED, *([model] if len(models) > 1 else []), *([task] if task else [])])

    groups = []
    for (model, task, _), by_seed in per_setting.items():
        label = label_of(model, task if len(per_setting) > 1 else None)
        members = [_untrained_run(run, label, _base_scores(base_evals, model)) for run in by_seed.values()]
        groups.append(Group(label, members, untrained=True))
    for model in sorted({r.model for r in base_evals} - {model for model, _, _ in per_setting}):
        label = label_of(model)
        scores = _base_scores(base_evals, model)
        member = RunSummary(path=next(r.path for r in base_evals if r.model == model), name=label, model=model,
                            method="untrained", scores=scores, identity=f"untrained:{model}", group=label)
        groups.append(Group(label, [member], untrained=True))
    return groups


def _base_scores(base_evals: Sequence[RunSummary], model: str) -> dict[str, float]:
    return {k: v for run in base_evals if run.model == model for k, v in run.scores.items()}


def _untrained_run(run: RunSummary, label: str, base_scores: dict[str, float]) -> RunSummary:
    before = {k.split("/", 1)[1]: v for k, v in run.scores.items() if k.startswith("before/")}
    scores = base_scores | {f"before/{k}": v for k, v in before.items()} | {f"after/{k}": v for k, v in before.items()}
    eval_task = run.config.get("eval_task")
    if eval_task and eval_task == run.task:  # the periodic evaluation's series starts from these numbers
        scores |= {f"eval/{eval_task}/{k}": v for k, v in before.items()}
    closed = gap_closed(scores)
    if closed is not None:
        scores["after/gap_closed"] = closed
    return RunSummary(path=run.path / "eval" / "before.json", name=label, task=run.task, model=run.model, method="untrained",
                      scores=scores, seed=run.seed, identity=f"untrained:{run.task}", group=label)


# ----------------------------------------------------------------------------------------------
# Columns and the main metric


def score_columns(runs: list[RunSummary]) -> list[str]:
    """Score columns in a stable order: `unisd eval` results, evaluations during training, after, before."""
    keys = sorted({k for r in runs for k in r.scores})

    def rank(key: str) -> tuple[int, str]:
        head = key.split("/", 1)[0]
        return ({"eval": 1, "after": 2, "before": 3}.get(head, 0), key)

    return sorted(keys, key=rank)


def value_of(run: RunSummary, column: str) -> float:
    """A run's value of any metric name (see the module docstring); NaN where it has none."""
    if column == "final_loss":
        return run.final_loss
    if column == "final_divergence":
        return run.final_divergence
    if column == "privileged_gap":
        return run.privileged_gap
    if column in run.scores:
        return run.scores[column]
    return run.logged(column)


def available_metrics(runs: list[RunSummary]) -> list[str]:
    """Every metric name some run has a number for: scores first, then metrics.jsonl keys."""
    logged = sorted({k for r in runs for rec in r.records for k, v in rec.items()
                     if k != "step" and _number(v) is not None})
    names = [*score_columns(runs), *SPECIAL, *logged]
    names = list(dict.fromkeys(names))
    return [n for n in names if any(not math.isnan(value_of(r, n)) for r in runs)]


def main_metric(runs: list[RunSummary], requested: str | None = None) -> str:
    """``requested`` (any name in :func:`available_metrics`), else held-out student accuracy, else the loss.

    Held-out student accuracy, in order of preference: after training (``after/student_accuracy``), the
    last evaluation during training (``eval/TASK/student_accuracy``), a `unisd eval` accuracy or pass@1."""
    if requested:
        if any(not math.isnan(value_of(r, requested)) for r in runs):
            return requested
        available = available_metrics(runs)
        close = [n for n in available if requested.split("/")[-1] in n]
        hint = f" Did you mean: {', '.join(close[:4])}?" if close else ""
        raise UsageError(f"--metric {requested}: no run has it.{hint} Available: {', '.join(available) or 'none'}")
    columns = score_columns(runs)
    preferences = [
        [c for c in columns if c == "after/student_accuracy"],
        [c for c in columns if c.startswith("eval/") and c.endswith("/student_accuracy")],
        [c for c in columns if c.split("/")[0] not in ("eval", "after", "before")
         and c.rsplit("/", 1)[-1] in EVAL_HEADLINES],
    ]
    for found in preferences:
        if found:
            return found[0]
    return "final_loss"


def headline_columns(runs: list[RunSummary], metric: str) -> list[str]:
    """The columns worth a reader's attention: the main metric, held-out metrics, the training loss.

    The last evaluation during training (``eval/TASK/…``) is shown only where after.json lacks that
    metric (where both exist they are usually the same measurement), and before-training numbers are
    the untrained base's group rather than a column."""
    columns = score_columns(runs)
    wanted = [metric]
    wanted += [f"after/{k}" for k in HELD_OUT]
    have_after = {k for k in HELD_OUT if any(f"after/{k}" in r.scores for r in runs)}
    wanted += [c for c in columns if c.startswith("eval/") and c.rsplit("/", 1)[-1] in set(HELD_OUT) - have_after]
    wanted += [c for c in columns if c.split("/")[0] not in ("eval", "after", "before")
               and c.rsplit("/", 1)[-1] in EVAL_SHOWN]
    wanted.append("final_loss")
    wanted += [c for c in columns if c.startswith("activity/")]  # beside the outcome: did each component act?
    wanted = list(dict.fromkeys(wanted))
    return [c for c in wanted if any(not math.isnan(value_of(r, c)) for r in runs)]


# ----------------------------------------------------------------------------------------------
# Tables


def table_rows(runs: list[RunSummary], baseline: RunSummary | None) -> tuple[list[str], list[dict[str, Any]]]:
    """Rows of plain values plus ``delta <column>`` (run − baseline) for every numeric column."""
    numeric = ["final_loss", "final_divergence", *score_columns(runs), "privileged_gap"]
    rows = []
    for r in runs:
        row: dict[str, Any] = {"run": r.name, "group": r.group, "task": r.task, "method": r.method,
                               "seed": "" if r.seed is None else r.seed, "components": r.components,
                               "steps": r.steps}
        for col in numeric:
            row[col] = value_of(r, col)
        if baseline is not None:
            for col in numeric:
                row[f"delta {col}"] = value_of(r, col) - value_of(baseline, col)
        rows.append(row)
    return numeric, rows


def num(value: float, digits: int = 3, sign: bool = False) -> str:
    """A number to ``digits`` significant digits, trailing zeros kept so columns line up (0.520, 0.00);
    '' for NaN."""
    if math.isnan(value):
        return ""
    return f"{value:{'+' if sign else ''}#.{digits}g}".replace(".e", "e")


def _fmt(value: Any) -> str:
    return num(value) if isinstance(value, float) else str(value)


def to_csv(runs: list[RunSummary], baseline: RunSummary | None) -> str:
    _, rows = table_rows(runs, baseline)
    return _csv(rows)


def _csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["run"], lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})
    return buf.getvalue()


def group_rows(groups: list[Group], columns: list[str], confidence: float = CONFIDENCE) -> list[dict[str, Any]]:
    """One row per group and metric: n, mean, sd and the interval (long format, for groups.csv/JSON)."""
    rows = []
    for group in groups:
        for col in columns:
            st = group.stats(col, confidence)
            if st.n == 0:
                continue
            rows.append({"group": group.label, "method": group.method, "metric": col, "n": st.n,
                         "seeds": " ".join(str(s) for s in group.seeds if s is not None), "mean": st.mean,
                         "sd": st.sd, "ci_low": st.low, "ci_high": st.high, "half_width": st.half_width,
                         "confidence": confidence, "interval": "Student t"})
    return rows


def _mean_pm(st: Summary) -> str:
    if st.n == 0:
        return ""
    return num(st.mean) + (f" ± {num(st.half_width)}" if st.n > 1 else "") + f" (n={st.n})"


def _md_table(head: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return lines


def _group_tables(groups: list[Group], columns: list[str], metric: str, base: Group | None) -> list[str]:
    pct = f"{CONFIDENCE * 100:g}%"
    rows = []
    for g in groups:
        st = g.stats(metric)
        delta = ""
        if base is not None and g is not base and st.n and base.stats(metric).n:
            delta = num(st.mean - base.stats(metric).mean, sign=True)
        seeds = ", ".join(str(s) for s in g.seeds if s is not None)
        ci = f"[{num(st.low)}, {num(st.high)}]" if st.n > 1 else ""
        rows.append([g.label, g.method, seeds, str(st.n), num(st.mean), num(st.sd), ci, delta])
    lines = [f"## `{metric}` by group", ""]
    lines += _md_table(["group", "method", "seeds", "n", "mean", "sd", f"{pct} CI", "Δ mean vs baseline"], rows)
    lines += ["", "## Held-out metrics, training loss and component activity by group (mean ± half-width, n seeds)",
              "", "`activity/NAME`: how much the component acted, averaged over the run's steps (see unisd.activity).", ""]
    lines += _md_table(["group", *columns], [[g.label, *(_mean_pm(g.stats(c)) for c in columns)] for g in groups])
    return lines


def _run_table(runs: list[RunSummary], baseline: RunSummary | None, columns: list[str]) -> list[str]:
    """Each run's headline numbers, with ``(±delta)`` against the baseline run."""
    head = ["run", "task", "method", "seed", "components", "steps", *columns]
    rows = []
    for r in runs:
        cells = [r.name, r.task, r.method, "" if r.seed is None else str(r.seed), r.components, str(r.steps)]
        for col in columns:
            text, value = num(value_of(r, col)), value_of(r, col)
            if baseline is not None and text and not math.isnan(value_of(baseline, col)):
                text += f" ({num(value - value_of(baseline, col), sign=True)})"
            cells.append(text)
        rows.append(cells)
    return _md_table(head, rows)


def to_markdown(runs: list[RunSummary], baseline: RunSummary | None, metric: str,
                groups: list[Group] | None = None) -> str:
    """results.md: the main metric and the headline metrics per group, then every run."""
    groups = groups if groups is not None else group_runs(runs, baseline)
    columns = headline_columns([r for g in groups for r in g.runs], metric)
    base = next((g for g in groups if baseline is not None and baseline in g.runs), None)
    lines = ["# Results", ""]
    lines.append(f"{len(runs)} run(s) in {sum(not g.untrained for g in groups)} group(s); runs that differ only in "
                 "their seed (every other setting in config.toml equal) form a group.")
    shared = next((g.shared for g in groups if g.shared), "")
    if shared:
        lines.append(f"Group names leave out what every group's runs share: `{shared}`.")
    lines.append(f"Main metric: `{metric}`.")
    if baseline is not None:
        lines.append(f"Deltas are against the baseline run `{baseline.name}` (per run) and its group (means).")
    lines.append(interval_description() + ".")
    if any(g.untrained for g in groups):
        lines.append(f"`{UNTRAINED}` holds each run's eval/before.json (the base model, greedy decoding: the same "
                     "for every seed) under the after/ names.")
    lines += ["", *_group_tables(groups, columns, metric, base), "", "## Runs", ""]
    if baseline is not None:
        lines.append(f"Deltas in parentheses are against the baseline run `{baseline.name}`.")
        lines.append("")
    lines += _run_table(runs, baseline, columns)
    notes = [f"- `{r.name}`: {n}" for r in runs for n in r.notes]
    for g in groups:  # the interval assumes independent seeds: say so when one is counted twice
        seeds = [s for s in g.seeds if s is not None]
        if not g.untrained and len(set(seeds)) < len(seeds):
            notes.append(f"- group `{g.label}` has runs with the same seed ({', '.join(map(str, seeds))}): "
                         "they are not independent repetitions")
    if notes:
        lines += ["", "Notes:", *notes]
    return "\n".join(lines) + "\n"


def summary_text(groups: list[Group], metric: str, columns: list[str]) -> list[str]:
    """What `unisd report` prints: per group, n seeds and mean, sd and interval of each headline metric."""
    pct = f"{CONFIDENCE * 100:g}%"
    lines = [f"Main metric: {metric}. Per group: n seeds, mean, sd, {pct} CI (Student t over seeds)."]
    shared = next((g.shared for g in groups if g.shared), "")
    if shared:
        lines.append(f"(every group's runs are {shared}; group names leave that out)")
    width = max((len(c) for c in columns), default=10)
    for g in groups:
        seeds = [s for s in g.seeds if s is not None]
        lines.append(f"{g.label}  (n={len(g.runs)}{'; seeds ' + ', '.join(map(str, seeds)) if seeds else ''})")
        for col in columns:
            st = g.stats(col)
            if st.n == 0:
                continue
            spread = (f"sd {num(st.sd):<6}  {pct} CI [{num(st.low)}, {num(st.high)}]" if st.n > 1
                      else "(one seed: no interval)")
            lines.append(f"  {col:<{width}}  mean {num(st.mean):<6}  {spread}")
    return lines


def write_report(runs: list[RunSummary], baseline: RunSummary | None, output: Path, metric: str | None = None,
                 plots: bool = True) -> tuple[list[Path], list[str]]:
    """Write results.md, results.csv, groups.csv, report.json and (with ``plots``) the PNG figures.

    Returns the files written and the summary lines to print."""
    if not runs:
        raise UsageError("no runs to report")
    if plots:
        from .plots import require_matplotlib

        require_matplotlib()  # fail before writing anything
    chosen = main_metric(runs, metric)
    groups = group_runs(runs, baseline)
    columns = headline_columns([r for g in groups for r in g.runs], chosen)
    stats_rows = group_rows(groups, columns)
    output.mkdir(parents=True, exist_ok=True)
    files = {
        "results.md": to_markdown(runs, baseline, chosen, groups),
        "results.csv": to_csv(runs, baseline),
        "groups.csv": _csv(stats_rows),
    }
    written = []
    for name, text in files.items():
        (output / name).write_text(text, encoding="utf-8")
        written.append(output / name)
    _, rows = table_rows(runs, baseline)
    data = {"metric": chosen, "baseline": baseline.name if baseline else None,
            "interval": interval_description(), "groups": _finite(stats_rows), "runs": _finite(rows)}
    (output / "report.json").write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    written.append(output / "report.json")
    if plots:
        from .plots import plot_all

        written += plot_all(groups, baseline, chosen, output)
    return written, summary_text(groups, chosen, columns)


def _finite(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """JSON has no NaN: undefined numbers become null."""
    return [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()} for row in rows]
