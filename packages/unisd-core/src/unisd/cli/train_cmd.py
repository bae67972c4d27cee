"""``unisd train``: run (or resume) on-policy self-distillation."""

from __future__ import annotations

import dataclasses
import os
import time
from importlib import resources
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from ..components import make_options, parse_option_flags, resolve_selection
from ..config import RunConfig, load_config, read_toml
from ..errors import UsageError
from ..io.model_card import write_model_card
from ..io.reporting import RichReporter
from ..loop import train
from ..model.export import check_repo_id, push_run
from ..parallel import distributed, threads
from ..plugins import UnisdPluginManager
from ..recipes import apply_unless_set, named_run_settings, recipe_task
from .command_line import command_line
from .errors import cli_errors
from .train_flags import TRAIN_FLAGS, declare_flags, run_settings


def demo_config() -> RunConfig:
    path = resources.files("unisd") / "data" / "demo.toml"
    with resources.as_file(path) as p:
        return load_config(p)


def register(app: typer.Typer, pm: UnisdPluginManager) -> None:
    @app.command("train")
    @declare_flags(TRAIN_FLAGS)
    def train_command(ctx: typer.Context, **values: Any) -> None:
        """Train a model by on-policy self-distillation.

        With no arguments: the built-in demo (SmolLM2-135M-Instruct on task 'demo', its settings in
        unisd/data/demo.toml; about 8 minutes on 2 CPU cores).
        """
        console = Console(stderr=False)
        if values["num_processes"] > 1 and "WORLD_SIZE" not in os.environ:
            raise typer.Exit(relaunch(values["num_processes"]))
        with cli_errors():
            if values["push_to_hub"] is not None:
                check_repo_id(values["push_to_hub"])  # before hours of training, not after
            cfg = _run_config(values, pm, console)
            began = time.perf_counter()
            try:
                run_dir = train(cfg, pm, RichReporter(console, every=cfg.log_every), resume=values["resume"])
            except BaseException:
                distributed.shutdown(clean=False)
                raise
            is_main = distributed.current().is_main
            distributed.shutdown()
            if is_main:
                _after_training(ctx, console, run_dir, time.perf_counter() - began, values["push_to_hub"])


def _run_config(values: dict[str, Any], pm: UnisdPluginManager, console: Console) -> RunConfig:
    """The run's settings from the flags: a resumed run's saved config (with the few flags that may change
    it), or a new run's defaults < recipe < preset < --config file < flags, with its components resolved."""
    given = run_settings(TRAIN_FLAGS, values)
    with_, option, resume = values["with_"], values["option"], values["resume"]
    if resume is not None:
        cfg, given = _resume_settings(resume, values["config"], given, with_, option, pm)
        return dataclasses.replace(cfg, **given)
    cfg, file_keys = _starting_config(values["config"], given, bool(with_) or bool(values["preset"]), console)
    cfg = dataclasses.replace(cfg, **given)
    regs = pm.registries
    cfg.components = resolve_selection(
        list(with_ or []), parse_option_flags(list(option or [])), regs.components, regs.presets,
        preset=cfg.preset, base=cfg.components,
    )
    apply_named_settings(cfg, regs, set(given) | file_keys, console)
    return cfg


def _resume_settings(resume: Path, config: Path | None, given: dict[str, Any], with_: list[str] | None,
                     option: list[str] | None, pm: UnisdPluginManager) -> tuple[RunConfig, dict[str, Any]]:
    """The saved config of the run to resume, and the flags that may change it (any other flag must repeat
    its saved value, e.g. the command that started the run)."""
    if config is not None:  # silently ignoring it would let a user believe new settings apply
        raise UsageError(f"--config is not used with --resume: the run continues its saved "
                         f"{Path(resume) / 'config.toml'}; only --steps, --save-every, --eval-every, "
                         "--report-to, --shard and --deepspeed may change")
    cfg = _resume_config(resume)
    # what may change: the run's length and bookkeeping, and how it is spread over processes
    allowed = {"steps", "save_every", "eval_every", "shard", "deepspeed", "report_to"}
    changed = sorted(k for k in set(given) - allowed if not _same_setting(k, given[k], getattr(cfg, k)))
    other_components = bool(with_ or option) and not _same_components(cfg, with_, option, pm.registries)
    if changed or other_components:
        described = ", ".join(f"{k} (saved {getattr(cfg, k)!r}, given {given[k]!r})" for k in changed)
        if other_components:
            described = ", ".join(filter(None, [described, f"--with/-o (saved {cfg.components!r})"]))
        raise UsageError(
            f"--resume continues the saved config.toml; only --steps, --save-every, --eval-every, --report-to, "
            f"--shard and --deepspeed may change (got {described})"
        )
    return cfg, {k: v for k, v in given.items() if k in allowed}


def _starting_config(config: Path | None, given: dict[str, Any], components_given: bool,
                     console: Console) -> tuple[RunConfig, set[str]]:
    """A new run's config before the flags apply: the --config file (and the keys it sets), the built-in
    demo when nothing says what to train, else the defaults."""
    if config is not None:
        return load_config(config), _toml_keys(config)
    if not any(given.get(k) for k in ("model", "task", "data")) and not components_given:
        cfg = demo_config()
        console.print(
            f"No --model/--task/--data given: running the built-in demo, {cfg.steps} steps of "
            "self-distillation of SmolLM2-135M-Instruct on task 'demo' with held-out evaluations before "
            "and after (about 8 minutes on 2 CPU cores; Ctrl-C stops with a checkpoint). "
            "`unisd train --help` lists the options.", highlight=False, soft_wrap=True)
        return cfg, set()
    return RunConfig(), set()


def _after_training(ctx: typer.Context, console: Console, run_dir: Path, seconds: float, push_to_hub: str | None) -> None:
    """The model card, the closing line, and the Hub upload when asked (main process)."""
    write_model_card(run_dir, run_dir / "final", command_line(ctx))
    console.print(f"Done in {seconds:.0f} s. Run directory: {run_dir} "
                  f"(adapter/weights and model card in {run_dir / 'final'})", highlight=False)
    if push_to_hub:
        console.print(f"Pushed to {push_run(run_dir, push_to_hub)}", highlight=False)


def apply_named_settings(cfg: RunConfig, regs: Any, explicit: set[str], console: Console) -> None:
    """The recipe's and the preset's run settings, where neither a flag nor the --config file set the key.

    Precedence: defaults < recipe < preset < config file < flags (see unisd.recipes).
    """
    preset_run = regs.presets.get(cfg.preset).run if cfg.preset else {}
    settings = named_run_settings(cfg.recipe, cfg.task, preset_run)
    task = recipe_task(cfg.recipe, cfg.task)
    if task != cfg.task:
        console.print(f"--recipe {cfg.recipe}: training task '{task}' for '{cfg.task}' (the paper's training set)",
                      highlight=False)
        cfg.task = task
    apply_unless_set(cfg, settings, explicit)


def _same_components(cfg: RunConfig, with_: list[str] | None, option: list[str] | None, regs: Any) -> bool:
    """Whether --with/-o (over the run's preset) select the components and typed options the run was saved with."""
    given = resolve_selection(list(with_ or []), parse_option_flags(list(option or [])), regs.components,
                              regs.presets, preset=cfg.preset)
    if set(given) != set(cfg.components):
        return False
    return all(make_options(regs.components.get(name), given[name])
               == make_options(regs.components.get(name), cfg.components[name]) for name in given)


def _toml_keys(path: Path) -> set[str]:
    return set(read_toml(path))


def relaunch(num_processes: int) -> int:
    """Run this same command under torch.distributed.run with N processes; returns its exit code."""
    import subprocess
    import sys

    args = list(sys.argv[1:])
    for i, arg in enumerate(args):  # drop our own flag so the children do not relaunch again
        if arg == "--num-processes":
            del args[i : i + 2]
            break
        if arg.startswith("--num-processes="):
            del args[i]
            break
    # --standalone: a local rendezvous on a port the launcher picks itself. The launcher runs in a child
    # process of its own, whose error report is shortened to the workers' exit code: their own messages
    # (e.g. "Error: ..." and exit code 2 for bad input) are what the user needs.
    launcher = (
        "import sys\n"
        "from torch.distributed.elastic.multiprocessing.errors import ChildFailedError\n"
        "from torch.distributed.run import parse_args, run\n"
        "try:\n"
        "    run(parse_args(sys.argv[1:]))\n"
        "except ChildFailedError as exc:\n"
        "    codes = [f.exitcode for f in exc.failures.values()]\n"
        "    sys.exit(max(codes, key=lambda c: (c > 0, c)) if codes else 1)\n"
    )
    cmd = [sys.executable, "-c", launcher, "--standalone", f"--nproc-per-node={num_processes}", "-m", "unisd", *args]
    return subprocess.call(cmd, env=threads.share_threads(os.environ, num_processes))


PATH_SETTINGS = {"model", "data", "task_data", "output", "deepspeed"}


def _same_setting(key: str, given: object, saved: object) -> bool:
    """Whether a flag repeats the saved value (paths compare by the file they name)."""
    if given == saved:
        return True
    if key in PATH_SETTINGS and isinstance(given, str) and isinstance(saved, str):
        return os.path.abspath(os.path.expanduser(given)) == os.path.abspath(os.path.expanduser(saved))
    return False


def _resume_config(resume: Path) -> RunConfig:
    from ..io.checkpoint import resume_target

    run_dir, _ = resume_target(resume)
    if not (run_dir / "config.toml").is_file():
        raise UsageError(f"--resume {resume}: {run_dir / 'config.toml'} is missing")
    return load_config(run_dir / "config.toml")
