"""The sweep file (TOML) and the jobs it expands to. :mod:`unisd.ops.scheduler` runs them.

A sweep crosses models × training sets × methods × option grids. Every combination is one training
run, followed by its evaluations. Example (every key is optional except a model and something to
train on)::

    output_root = "runs/ablation"       # default: runs/<sweep file stem>, next to the sweep file
    models = ["smollm2"]                # --model values (hub ids, directories, .gguf files)
    tasks = ["demo"]                    # registered training tasks ...
    data = ["train.jsonl"]              # ... and/or data files or Hub dataset ids; each is one dataset axis value
    presets = ["ema", "unisd-star"]     # one method per preset
    seeds = [1, 2, 3]                   # train every combination once per seed (run dirs end in -s1, -s2, ...)

    [run]                               # RunConfig settings of every training job (scalars)
    steps = 200
    batch_size = 4
    max_new_tokens = 256

    [grid]                              # RunConfig settings swept for every method: all combinations
    alpha = [0.0, 0.5]

    [methods.clip]                      # a method of your own: components and their option grids
    with = ["clip"]                     # component names (and/or preset = "NAME")
    options = { "clip.max_value" = [5.0, 10.0] }   # NAME.KEY = value, or a list = a grid axis
    run = { lr = 1e-5 }                 # run settings of this method (a list = a grid axis)

    [eval]
    tasks = ["demo"]                    # default: each job's training task (none for data files); [] for none
    args = ["--limit", "64"]            # extra arguments passed to `unisd eval`
    untrained = false                   # also evaluate every model before training

``seeds`` repeats every training run with each seed (``RunConfig.seed``); without it each run uses the
``seed`` of ``[run]`` (default 42) and its directory has no seed suffix, as before. `unisd report` groups
runs that differ only in seed and reports their mean with a 95% confidence interval.

With neither ``presets`` nor ``[methods.*]`` there is one method, ``plain``: self-distillation alone.
Settings stack up, later winning: RunConfig defaults < the recipe's (``recipe = "paper"`` in ``[run]``,
per task) < the preset's run settings < ``[run]`` < the method's ``run`` < grid values. Relative paths (data files, ``output_root``, model directories)
are taken relative to the sweep file.

Layout (as the research orchestrator's, see the design notes §6.3)::

    OUTPUT_ROOT/{method}/{dataset}/[{grid values}/]{model}[-s{seed}]/   one training run (unisd train --output)
    OUTPUT_ROOT/{method}/.../{model}/eval/{TASK}/results.json     its evaluation (unisd eval --output)
    OUTPUT_ROOT/untrained/{model}/eval/{TASK}/results.json        the untrained model ([eval] untrained = true)
    OUTPUT_ROOT/jobs/…/{model}.toml                               the exact config each run trains with
    OUTPUT_ROOT/logs/…                                            one log per job attempt
    OUTPUT_ROOT/failed_jobs.md, OUTPUT_ROOT/sweep_state.json

Methods with the ``contrastive`` component get a cache job ``unisd cache negatives`` per model and
training set (skipped when ``contrastive.cache`` names a file). Runs that evaluate before and after
training (``eval_before_after``) get two cache jobs per group of runs with the same model, items and
budget, which generate the base model's held-out completions (the student's side and the teacher's) into
the base-completion cache once, side by side, before any of those runs starts. ``{dataset}`` is the task name or the data file's stem, with ``-max{N}`` when ``limit = N`` is set;
``{grid values}`` joins every grid axis as ``key{value}`` (``comp.key{value}`` for component options).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import itertools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..components import make_options, resolve_selection
from ..config import RunConfig, config_from_mapping, read_toml
from ..data.datafiles import looks_like_hub_id
from ..errors import ConfigError
from ..plugins import UnisdPluginManager
from ..recipes import recipe_settings, recipe_task

TOP_LEVEL = ("output_root", "models", "tasks", "data", "presets", "seeds", "run", "grid", "methods", "eval")
METHOD_KEYS = ("with", "preset", "options", "run")
EVAL_KEYS = ("tasks", "args", "untrained")
# These are the sweep's own axes (or set by the sweep); a [run]/[grid] table must not set them.
RESERVED_RUN_KEYS = ("model", "task", "data", "output", "preset", "components")
PHASES = ("cache", "train", "eval")


@dataclass
class Method:
    """One way of training: a preset and/or components, their option grids and run settings."""

    name: str
    preset: str | None = None
    with_: list[str] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)  # "comp.key" -> value or list (grid axis)
    run: dict[str, Any] = field(default_factory=dict)  # RunConfig key -> value or list (grid axis)


@dataclass
class EvalSpec:
    tasks: list[str] | None = None
    args: list[str] = field(default_factory=list)
    untrained: bool = False  # also evaluate each model before training


@dataclass
class SweepSpec:
    """A parsed sweep file."""

    path: Path
    output_root: Path
    models: list[str]
    tasks: list[str]
    data: list[Path]
    methods: list[Method]
    run: dict[str, Any]
    grid: dict[str, list[Any]]
    eval: EvalSpec
    seeds: list[int] | None = None  # None: one run per combination, with the configured seed


@dataclass
class Job:
    """One unit of work: a subprocess ``python ARGV`` that is finished once ``marker`` exists."""

    id: str
    phase: str  # "cache" | "train" | "eval"
    argv: list[str]  # after the Python executable; train jobs rebuild it at launch (see train_argv)
    marker: Path  # exists ⇔ the job's output is complete
    label: str
    depends: list[str] = field(default_factory=list)
    run_dir: Path | None = None  # train and eval jobs: the run directory
    config: RunConfig | None = None  # train and base-evaluation jobs: the run's full config
    config_path: Path | None = None  # where that config is written before launch
    meta: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# Reading the sweep file


def _unknown(keys: Any, allowed: tuple[str, ...], where: str) -> None:
    for key in keys:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=2)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise ConfigError(f"{where}: unknown key '{key}'.{hint} Allowed: {', '.join(allowed)}")


def _str_list(value: Any, where: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: expected a list of strings, got {value!r}")
    return list(value)


def _table(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a table, got {value!r}")
    return dict(value)


def _check_run_keys(values: dict[str, Any], where: str) -> None:
    for key in values:
        if key in RESERVED_RUN_KEYS:
            raise ConfigError(
                f"{where}: '{key}' is set by the sweep itself; use the top-level models/tasks/data/presets "
                "lists or a [methods.NAME] table instead"
            )
    # Type-check every value (each element of a list) against RunConfig now, not in a job hours later.
    for key, value in values.items():
        for v in value if isinstance(value, list) else [value]:
            config_from_mapping({key: v}, where)


def _resolve_path(base: Path, value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path


def load_sweep(path: str | Path, output_root: str | Path | None = None) -> SweepSpec:
    """Parse and check a sweep file (names are checked against the plugins later, in :func:`plan`)."""
    path = Path(path)
    raw = read_toml(path, "sweep file")
    where = str(path)
    _unknown(raw, TOP_LEVEL, where)
    base = path.parent
    models = _models(raw, base, where)
    tasks = _str_list(raw.get("tasks", []), f"{where}: tasks")
    data = _data_files(raw, base, where)
    if not tasks and not data:
        raise ConfigError(f"{where}: nothing to train on; give tasks = [...] and/or data = [\"file.jsonl\"]")
    run = _run_table(raw, where)
    grid = _grid_table(raw, where)
    methods = _methods(raw, where)
    eval_spec = _eval_spec(raw, where)
    root = _output_root(raw, path, output_root)
    seeds = _seeds(raw, run, grid, methods, where)
    return SweepSpec(path, root, models, tasks, data, methods, run, grid, eval_spec, seeds)


def _models(raw: dict[str, Any], base: Path, where: str) -> list[str]:
    """The models: at least one. A model that names a directory or file next to the sweep file means that path."""
    models = _str_list(raw.get("models", []), f"{where}: models")
    if not models:
        raise ConfigError(f"{where}: 'models' is empty; name at least one model, e.g. models = [\"smollm2\"]")
    return [str(_resolve_path(base, m)) if _resolve_path(base, m).exists() else m for m in models]


def _data_files(raw: dict[str, Any], base: Path, where: str) -> list[Path]:
    """Data files are relative to the sweep file; a Hub dataset id (no such file there) stays as written."""
    return [Path(d) if looks_like_hub_id(d) and not _resolve_path(base, d).exists() else _resolve_path(base, d)
            for d in _str_list(raw.get("data", []), f"{where}: data")]


def _run_table(raw: dict[str, Any], where: str) -> dict[str, Any]:
    """[run]: settings of every training job, one value each (swept values belong in [grid])."""
    run = _table(raw.get("run", {}), f"{where}: [run]")
    for key, value in run.items():
        if isinstance(value, list):
            raise ConfigError(f"{where}: [run] {key} is a list; put swept values in [grid]")
    _check_run_keys(run, f"{where}: [run]")
    return run


def _grid_table(raw: dict[str, Any], where: str) -> dict[str, list[Any]]:
    """[grid]: the values of each swept setting (a single value is a one-value axis), never none."""
    grid = _table(raw.get("grid", {}), f"{where}: [grid]")
    grid = {k: v if isinstance(v, list) else [v] for k, v in grid.items()}
    for key, values in grid.items():
        if not values:
            raise ConfigError(f"{where}: [grid] {key} is an empty list")
    _check_run_keys(grid, f"{where}: [grid]")
    return grid


def _methods(raw: dict[str, Any], where: str) -> list[Method]:
    """One method per preset, then one per [methods.NAME] table; ``plain`` when there is neither. Each
    name once: it names the methods' run directories."""
    methods = [Method(name=preset, preset=preset) for preset in _str_list(raw.get("presets", []), f"{where}: presets")]
    for name, table in _table(raw.get("methods", {}), f"{where}: [methods]").items():
        methods.append(_method(name, table, f"{where}: [methods.{name}]"))
    if not methods:
        methods = [Method(name="plain")]
    seen: set[str] = set()
    for m in methods:
        if m.name in seen:
            raise ConfigError(f"{where}: method '{m.name}' is defined twice (a preset and a [methods] table?)")
        seen.add(m.name)
    return methods


def _method(name: str, table: Any, where: str) -> Method:
    """One [methods.NAME] table (``where`` names it in errors)."""
    table = _table(table, where)
    _unknown(table, METHOD_KEYS, where)
    options = _table(table.get("options", {}), f"{where} options")
    for key in options:
        if "." not in key:
            raise ConfigError(f"{where}: option '{key}' must be written COMPONENT.KEY, e.g. \"ema.beta\"")
    run = _table(table.get("run", {}), f"{where} run")
    _check_run_keys(run, where)
    preset = table.get("preset")
    if preset is not None and not isinstance(preset, str):
        raise ConfigError(f"{where}: preset must be a string")
    return Method(name, preset, _str_list(table.get("with", []), f"{where} with"), options, run)


def _eval_spec(raw: dict[str, Any], where: str) -> EvalSpec:
    """[eval]: the tasks to evaluate on (None: each job's training task), extra arguments, untrained."""
    ev = _table(raw.get("eval", {}), f"{where}: [eval]")
    _unknown(ev, EVAL_KEYS, f"{where}: [eval]")
    return EvalSpec(
        tasks=_str_list(ev["tasks"], f"{where}: [eval] tasks") if "tasks" in ev else None,
        args=_str_list(ev.get("args", []), f"{where}: [eval] args"),
        untrained=bool(ev.get("untrained", False)),
    )


def _output_root(raw: dict[str, Any], path: Path, output_root: str | Path | None) -> Path:
    """The caller's output root, else the file's ``output_root`` (relative to it), else runs/<file stem>."""
    base = path.parent
    if output_root is not None:
        return Path(output_root)
    if "output_root" in raw:  # normalised: "../runs/x" next to examples/ prints as runs/x
        return Path(os.path.normpath(_resolve_path(base, str(raw["output_root"]))))
    return base / "runs" / path.stem


def only_methods(spec: SweepSpec, names: list[str]) -> SweepSpec:
    """The sweep restricted to the named methods (``unisd sweep --only``), in the file's order.

    Their run directories are the same as in the whole sweep, so a subset run now and the rest later
    make one sweep, and ``unisd report`` reads them together.
    """
    if not names:
        return spec
    known = [m.name for m in spec.methods]
    unknown = [n for n in names if n not in known]
    if unknown:
        hint = difflib.get_close_matches(unknown[0], known, n=1)
        raise ConfigError(f"--only {unknown[0]}: {spec.path} has no such method"
                          + (f" (did you mean '{hint[0]}'?)" if hint else "") + f"; its methods: {', '.join(known)}")
    return dataclasses.replace(spec, methods=[m for m in spec.methods if m.name in names])


def _seeds(raw: dict[str, Any], run: dict[str, Any], grid: dict[str, list[Any]], methods: list[Method],
           where: str) -> list[int] | None:
    """The ``seeds`` axis: distinct integers. It replaces any other way of setting the seed, so a run's
    seed is never decided by two places at once."""
    if "seeds" not in raw:
        return None
    seeds = raw["seeds"]
    if (not isinstance(seeds, list) or not seeds
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)):
        raise ConfigError(f"{where}: seeds must be a non-empty list of integers ≥ 0, e.g. seeds = [1, 2, 3]; "
                          f"got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"{where}: seeds lists a seed twice: {seeds}")
    places = [f"[{table}]" for table, values in (("run", run), ("grid", grid)) if "seed" in values]
    places += [f"[methods.{m.name}] run" for m in methods if "seed" in m.run]
    if places:
        raise ConfigError(f"{where}: the seed is set both by seeds = [...] and in {', '.join(places)}; keep one")
    return list(seeds)


# ----------------------------------------------------------------------------------------------
# Expanding into jobs


def _fmt(value: Any) -> str:
    text = ("true" if value else "false") if isinstance(value, bool) else str(value)
    return re.sub(r"[^A-Za-z0-9._+-]", "-", text)


def model_tag(model: str) -> str:
    """The directory name of a model: its basename (hub ids: the part after the owner)."""
    return _fmt(Path(model.rstrip("/")).name or model)


def _axes(method: Method, grid: dict[str, list[Any]]) -> list[tuple[str, list[Any]]]:
    axes = [(k, v) for k, v in grid.items()]
    axes += [(k, v) for k, v in method.run.items() if isinstance(v, list)]
    axes += [(k, v) for k, v in method.options.items() if isinstance(v, list)]
    return axes


def _nested(options: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for key, value in options.items():
        comp, _, name = key.partition(".")
        out.setdefault(comp, {})[name] = value
    return out


def plan(spec: SweepSpec, pm: UnisdPluginManager) -> list[Job]:
    """Every job of the sweep, in phase order (cache, train, eval). Names are checked here."""
    regs = pm.registries
    _check_task_names(spec, regs)
    root = spec.output_root
    cache_jobs = _cache_jobs(spec, root)
    cache_ids = {j.meta["key"]: j.id for j in cache_jobs}

    train_jobs: list[Job] = []
    eval_jobs: list[Job] = []
    by_dir: dict[Path, str] = {}
    datasets: list[tuple[str | None, Path | None]] = [(t, None) for t in spec.tasks] + [(None, d) for d in spec.data]
    for method in spec.methods:
        axes = _axes(method, spec.grid)
        names = [a[0] for a in axes]
        for values in itertools.product(*[a[1] for a in axes]):
            point = dict(zip(names, values, strict=True))
            cfg_values = _run_values(method, spec, point, regs)
            selection = _selection(method, point, regs)
            hparam = "_".join(f"{_fmt(k)}{_fmt(v)}" for k, v in point.items())
            for (task, data), model, seed in itertools.product(datasets, spec.models, spec.seeds or [None]):
                cfg = _config({**cfg_values, **({"seed": seed} if seed is not None else {})}, selection, model,
                              task, data)
                dataset = task or data.stem  # type: ignore[union-attr]
                if cfg.limit is not None:
                    dataset += f"-max{cfg.limit}"
                run_name = model_tag(model) + (f"-s{seed}" if seed is not None else "")
                rel = Path(method.name) / dataset / (hparam or ".") / run_name
                rel = Path(*[p for p in rel.parts if p != "."])
                run_dir = root / rel
                if run_dir in by_dir:
                    raise ConfigError(
                        f"{spec.path}: two jobs would write {run_dir} ({by_dir[run_dir]}); rename a data file "
                        "or a model directory so their names differ"
                    )
                cfg.output = str(run_dir)
                job_id = f"train:{rel.as_posix()}"
                by_dir[run_dir] = job_id
                deps = [cache_ids[k] for k in (("model", model), ("task", task)) if k in cache_ids]
                negatives = _negatives_job(cfg, root, deps)
                if negatives is not None:
                    if negatives.id not in {j.id for j in cache_jobs}:
                        cache_jobs.append(negatives)
                    deps = [*deps, negatives.id]
                label = (f"{method.name} | {dataset} | {model_tag(model)}" + (f" | {hparam}" if hparam else "")
                         + (f" | seed {seed}" if seed is not None else ""))
                meta = {"method": method.name, "preset": method.preset, "dataset": dataset, "model": model,
                        "task": task, "data": str(data) if data else None, "hparams": point, "seed": cfg.seed}
                # with_name, not with_suffix: a model tag such as Qwen2.5-0.5B has dots of its own.
                train = Job(job_id, "train", [], run_dir / "final", label, deps, run_dir, cfg,
                            root / "jobs" / rel.with_name(rel.name + ".toml"), meta)
                train.argv = train_argv(train)
                train_jobs.append(train)
                for ev_task in spec.eval.tasks if spec.eval.tasks is not None else ([task] if task else []):
                    eval_jobs.append(_eval_job(spec, ev_task, run_dir / "final", run_dir, [job_id], meta, rel))
    if spec.seeds:
        train_jobs, eval_jobs = _seed_major(train_jobs, spec.seeds), _seed_major(eval_jobs, spec.seeds)
    cache_jobs += _base_eval_jobs(train_jobs, root)
    if spec.eval.untrained:
        eval_jobs += _untrained_eval_jobs(spec, root, cache_ids)
    return cache_jobs + train_jobs + eval_jobs


def _check_task_names(spec: SweepSpec, regs: Any) -> None:
    """Every training and evaluation task is registered: an unknown name fails now, with suggestions."""
    for task in spec.tasks:
        regs.tasks.get(task)
    for task in set(spec.eval.tasks or []):
        regs.tasks.get(task)


def _seed_major(jobs: list[Job], seeds: list[int]) -> list[Job]:
    """Seed-major order: a sweep stopped part-way has every method at the first seeds, rather than all
    seeds of the first methods (sorted() is stable, so the order within a seed is unchanged)."""
    rank = {seed: i for i, seed in enumerate(seeds)}
    return sorted(jobs, key=lambda j: rank[j.meta["seed"]])


def _untrained_eval_jobs(spec: SweepSpec, root: Path, cache_ids: dict[Any, str]) -> list[Job]:
    """[eval] untrained = true: each model evaluated as it is, under OUTPUT_ROOT/untrained/{model}/."""
    ev_tasks = spec.eval.tasks if spec.eval.tasks is not None else list(spec.tasks)
    jobs = []
    for model in spec.models:
        rel = Path("untrained") / model_tag(model)
        deps = [cache_ids[("model", model)]] if ("model", model) in cache_ids else []
        meta = {"method": "untrained", "model": model, "dataset": None, "task": None, "hparams": {}}
        for ev_task in ev_tasks:
            jobs.append(_eval_job(spec, ev_task, Path(model), root / rel, deps, meta, rel))
    return jobs


def _run_values(method: Method, spec: SweepSpec, point: dict[str, Any], regs: Any) -> dict[str, Any]:
    values: dict[str, Any] = {}
    if method.preset:
        values.update(regs.presets.get(method.preset).run)
    values.update(spec.run)
    values.update({k: v for k, v in method.run.items() if not isinstance(v, list)})
    values.update({k: v for k, v in point.items() if "." not in k})
    return values


def _selection(method: Method, point: dict[str, Any], regs: Any) -> dict[str, dict[str, Any]]:
    options = {k: v for k, v in method.options.items() if not isinstance(v, list)}
    options.update({k: v for k, v in point.items() if "." in k})
    selection = resolve_selection(list(method.with_), _nested(options), regs.components, regs.presets, preset=method.preset)
    for comp, values in selection.items():  # type-check option values now, not inside a job
        make_options(regs.components.get(comp), values)
    return selection


def _config(values: dict[str, Any], selection: dict[str, dict[str, Any]], model: str, task: str | None,
            data: Path | None) -> RunConfig:
    # A recipe's settings depend on the task, so they join here, under everything else (unisd.recipes).
    recipe = values.get("recipe")
    values = {**recipe_settings(recipe, task), **values}
    cfg = config_from_mapping(values, "sweep")
    cfg = dataclasses.replace(cfg, model=model, task=recipe_task(recipe, task), data=str(data) if data else None,
                              components=selection)
    cfg.validate()
    return cfg


def _eval_job(spec: SweepSpec, task: str, model: Path, run_dir: Path, deps: list[str], meta: dict[str, Any],
              rel: Path) -> Job:
    out = run_dir / "eval" / task
    # --overwrite: the sweep owns this folder, and a job is only rerun when its results.json (written last)
    # is missing, so what is there is an interrupted attempt's predictions.jsonl
    argv = ["-m", "unisd", "eval", task, "--model", str(model), "--output", str(out), "--overwrite", *spec.eval.args]
    label = f"{task} | {rel.as_posix()}"
    return Job(f"eval:{rel.as_posix()}:{task}", "eval", argv, out / "results.json", label, deps, run_dir,
               meta={**meta, "eval_task": task})


def _cache_jobs(spec: SweepSpec, root: Path) -> list[Job]:
    """Fetch/convert each model and load each task once, before parallel jobs race to do it."""
    jobs = []
    for model in spec.models:
        if Path(model).is_dir():
            continue  # a local Hugging Face directory needs no preparation
        slug = _fmt(model)
        jobs.append(Job(f"cache:model:{slug}", "cache", ["-m", "unisd.ops.prepare", "--model", model],
                        root / ".cache" / f"model-{slug}.done", f"prepare model {model}", meta={"key": ("model", model)}))
    limit = spec.run.get("limit")
    for task in spec.tasks:
        argv = ["-m", "unisd.ops.prepare", "--task", task] + (["--limit", str(limit)] if limit else [])
        jobs.append(Job(f"cache:task:{task}", "cache", argv, root / ".cache" / f"task-{_fmt(task)}.done",
                        f"prepare task {task}", meta={"key": ("task", task)}))
    return jobs


def _negatives_job(cfg: RunConfig, root: Path, deps: list[str]) -> Job | None:
    """The contrastive component reads wrong demonstrations from `unisd cache negatives` (unless its
    ``cache`` option names a file): build them once per model and training set, before training."""
    opts = cfg.components.get("contrastive")
    if opts is None or opts.get("cache"):
        return None
    source = ["--data", cfg.data] if cfg.data else ["--task", str(cfg.task)]
    limit = ["--limit", str(cfg.limit)] if cfg.limit is not None else []
    slug = _fmt(f"{model_tag(cfg.model)}-{Path(source[1]).stem}" + (f"-max{cfg.limit}" if cfg.limit else ""))
    argv = ["-m", "unisd", "cache", "negatives", "--model", cfg.model, *source, *limit]
    return Job(f"cache:negatives:{slug}", "cache", argv, root / ".cache" / f"negatives-{slug}.done",
               f"negatives for {cfg.model} on {source[1]}", list(deps), meta={"key": ("negatives", slug)})


# What a run's held-out evaluation of the base model depends on, beyond the model and the items: runs that
# agree on these decode the same prompts with the same weights (unisd.evaluation.base_cache keys the rest).
_BASE_EVAL_FIELDS = ("model", "task", "task_data", "eval_limit", "max_new_tokens", "system_prompt", "chat_template",
                     "allow_no_chat_template", "dtype", "attn_implementation", "tf32", "lora",
                     "merge_adapter_for_generation")


def _base_eval_jobs(train_jobs: list[Job], root: Path) -> list[Job]:
    """Runs that evaluate before and after training all decode the held-out items with the base model
    first (and with an adapter-off teacher, after too). Two cache jobs per group of such runs, the
    student's side and the teacher's, generate those completions once, side by side, before any run
    starts; otherwise the first runs, started together, would each generate them (minutes per run)."""
    groups: dict[str, list[Job]] = {}
    for job in train_jobs:
        cfg = job.config
        if cfg is None or not cfg.eval_before_after or cfg.task is None:  # (--data runs evaluate nothing)
            continue
        fields = {name: getattr(cfg, name, None) for name in _BASE_EVAL_FIELDS}
        groups.setdefault(json.dumps(fields, sort_keys=True, default=str), []).append(job)
    jobs = []
    for fields, members in groups.items():
        first = members[0]
        assert first.config is not None and first.run_dir is not None
        # Named by what it generates, so that --only or an edited budget never finds another group's marker.
        digest = hashlib.sha256(fields.encode()).hexdigest()[:8]
        slug = _fmt(f"{model_tag(first.config.model)}-{first.config.task}-{digest}")
        config = dataclasses.replace(first.config, components={}, preset=None, output=None)
        config_path = root / ".cache" / f"base-eval-{slug}.toml"
        deps = [d for d in first.depends if d.startswith(("cache:model:", "cache:task:"))]
        for side in ("student", "teacher"):
            argv = ["-m", "unisd.ops.prepare", "--base-eval", str(config_path), "--side", side]
            job = Job(f"cache:base-eval:{slug}:{side}", "cache", argv, root / ".cache" / f"base-eval-{slug}-{side}.done",
                      f"base model's {side} evaluation for {first.meta['dataset']} ({model_tag(first.config.model)})",
                      deps, config=config, config_path=config_path, meta={"key": ("base-eval", slug, side)})
            jobs.append(job)
            for member in members:
                member.depends = [*member.depends, job.id]
    return jobs


def train_argv(job: Job) -> list[str]:
    """The train command as things stand on disk: resume from a checkpoint when the run left one."""
    from ..io.checkpoint import latest_checkpoint

    assert job.run_dir is not None and job.config is not None and job.config_path is not None
    if latest_checkpoint(job.run_dir) is not None:
        return ["-m", "unisd", "train", "--resume", str(job.run_dir), "--steps", str(job.config.steps)]
    return ["-m", "unisd", "train", "--config", str(job.config_path), "--output", str(job.run_dir)]
