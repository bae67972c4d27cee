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
from ..parallel import distributed
from ..plugins import UnisdPluginManager
from ..recipes import apply_unless_set, named_run_settings, recipe_task
from .command_line import command_line
from .errors import cli_errors


def _default(name: str) -> str:
    """A setting's default as ``--help`` shows it (the options themselves default to None: "not given")."""
    return str(getattr(RunConfig(), name))


def _data_source(data: str | None) -> str | None:
    """A local path as pathlib spells it (so `--resume` compares ./x.jsonl and x.jsonl equal); a Hub id as given."""
    if not data:
        return None
    return str(Path(data)) if Path(data).exists() else data


def _help(text: str, default: str) -> str:
    return f"{text}  [default: {default}]"


def _module_list(text: str | None) -> list[str] | None:
    if text is None:
        return None
    return [name.strip() for name in text.split(",") if name.strip()]


def demo_config() -> RunConfig:
    path = resources.files("unisd") / "data" / "demo.toml"
    with resources.as_file(path) as p:
        return load_config(p)


def register(app: typer.Typer, pm: UnisdPluginManager) -> None:
    # train_command is over 60 lines only by its signature: Typer reads one parameter per CLI option there.
    @app.command("train")
    def train_command(
        ctx: typer.Context,
        model: str = typer.Option(None, "--model", metavar="MODEL", help="HF hub id, local HF directory, .gguf file, or 'smollm2' (bundled)."),
        task: str = typer.Option(None, "--task", metavar="TASK", help="A registered task (see `unisd plugins`)."),
        data: str = typer.Option(None, "--data", metavar="FILE|DIR|HUB_ID", help="Training data: a .jsonl/.json/.csv/.parquet file, a dataset folder, or a Hub dataset OWNER/NAME[:CONFIG]; records with prompt and reference, or chat 'messages'."),
        data_split: str = typer.Option(None, "--data-split", metavar="SPLIT", help=_help("The split of a dataset folder or Hub dataset.", _default("split"))),
        prompt_column: str = typer.Option(None, "--prompt-column", metavar="NAME", help=_help("The field holding the student's text.", _default("prompt_column"))),
        reference_column: str = typer.Option(None, "--reference-column", metavar="NAME", help=_help("The field holding the teacher's demonstration (chat records: default the last assistant turn).", _default("reference_column"))),
        system_prompt: str = typer.Option(None, "--system-prompt", metavar="TEXT", help="A system turn for student and teacher (and the evaluations), on examples without one of their own."),
        task_data: Path = typer.Option(None, "--task-data", metavar="FILE", help="Local file in the task's own field layout (with --task)."),
        with_: list[str] = typer.Option(None, "--with", metavar="COMPONENT", help="Add a component (repeatable), e.g. --with ema."),
        preset: str = typer.Option(None, "--preset", metavar="PRESET", help="A named set of components and options, e.g. unisd-star."),
        recipe: str = typer.Option(None, "--recipe", metavar="RECIPE", help="'paper': the research runner's run settings for every method (prompts 3072, 1024 new tokens, full MBPP, tool-use masking)."),
        option: list[str] = typer.Option(None, "-o", "--option", metavar="NAME.KEY=VALUE", help="Component option (repeatable)."),
        config: Path = typer.Option(None, "--config", metavar="FILE", help="TOML run config; flags override it."),
        output: Path = typer.Option(None, "--output", metavar="DIR", help="Run directory (default runs/TASK-TIMESTAMP)."),
        steps: int = typer.Option(None, "--steps", metavar="N", help=_help("Total optimiser steps of the run (also when resuming).", _default("steps"))),
        batch_size: int = typer.Option(None, "--batch-size", metavar="N", help=_help("Examples per micro-batch (per process).", _default("batch_size"))),
        grad_accum: int = typer.Option(None, "--grad-accum", metavar="N", help=_help("Micro-batches per optimiser step.", _default("grad_accum"))),
        num_generations: int = typer.Option(None, "--num-generations", metavar="G", help=_help("Completions sampled per prompt (must divide batch size × grad accum); the teacher runs each prompt once for all of them.", _default("num_generations"))),
        lr: float = typer.Option(None, "--lr", metavar="LR", help=_help("Peak learning rate (cosine schedule with warm-up).", _default("lr"))),
        lora: bool = typer.Option(None, "--lora/--full", help=_help("LoRA adapter (teacher = adapter off) or full fine-tuning (teacher = frozen copy).", "--lora")),
        lora_r: int = typer.Option(None, "--lora-r", metavar="R", help=_help("LoRA rank.", _default("lora_r"))),
        lora_alpha: int = typer.Option(None, "--lora-alpha", metavar="ALPHA", help=_help("LoRA scaling numerator (scale = alpha / r).", _default("lora_alpha"))),
        lora_dropout: float = typer.Option(None, "--lora-dropout", metavar="P", help=_help("Dropout on the LoRA path.", _default("lora_dropout"))),
        lora_target_modules: str = typer.Option(None, "--lora-target-modules", metavar="NAMES", help=_help("Comma-separated module names, e.g. q_proj,v_proj.", "all attention and MLP projections")),
        dtype: str = typer.Option(None, "--dtype", metavar="DTYPE", help=_help("Weights: auto (bf16 on GPUs under LoRA, else float32), float32, bfloat16 or float16.", _default("dtype"))),
        backend: str = typer.Option(None, "--backend", metavar="NAME", help=_help("Generation backend: hf, vllm, vllm-server, or a plugin's.", _default("backend"))),
        attn_implementation: str = typer.Option(None, "--attn-implementation", metavar="NAME", help="sdpa, eager or flash_attention_2 (needs flash-attn)."),
        eval_task: str = typer.Option(None, "--eval-task", metavar="TASK", help="Evaluate this task during training."),
        eval_every: int = typer.Option(None, "--eval-every", metavar="N", help=_help("Evaluate every N steps.", "never")),
        eval_limit: int = typer.Option(None, "--eval-limit", metavar="N", help=_help("Items of the eval split to use.", _default("eval_limit"))),
        save_every: int = typer.Option(None, "--save-every", metavar="N", help=_help("Checkpoint every N steps (always at the end).", "at the end only")),
        max_new_tokens: int = typer.Option(None, "--max-new-tokens", metavar="N", help=_help("Completion budget.", "the task's")),
        temperature: float = typer.Option(None, "--temperature", metavar="T", help=_help("Sampling and divergence temperature.", _default("temperature"))),
        alpha: float = typer.Option(None, "--alpha", metavar="A", help=_help("Divergence: 0 forward KL(teacher‖student), 1 reverse KL, between: scaled generalized JSD.", _default("alpha"))),
        allow_no_chat_template: bool = typer.Option(None, "--allow-no-chat-template", help="Train a model whose tokenizer has no chat template (a base model) on plain-text prompts."),
        resume: Path = typer.Option(None, "--resume", metavar="RUN", help="Continue a run directory (or one of its checkpoints) exactly."),
        seed: int = typer.Option(None, "--seed", metavar="N", help=_help("Random seed.", _default("seed"))),
        num_processes: int = typer.Option(1, "--num-processes", metavar="N", help="Data-parallel processes on this machine (relaunches under torch.distributed.run)."),
        shard: str = typer.Option(None, "--shard", metavar="MODE", help=_help("Multi-process: fsdp shards weights, gradients and optimizer state (FSDP2); none replicates them; auto follows an accelerate FSDP/DeepSpeed config.", _default("shard"))),
        deepspeed: Path = typer.Option(None, "--deepspeed", metavar="FILE", help="DeepSpeed JSON config: its ZeRO stage and offload select the equivalent FSDP2 sharding."),
        report_to: list[str] = typer.Option(None, "--report-to", metavar="TRACKER", help="Also send metrics, config and evaluations to tensorboard, wandb, trackio or mlflow (repeatable; each an extra: pip install 'unisd-core[wandb]')."),
        reference_control: str = typer.Option(None, "--reference-control", metavar="none|shuffled", help=_help("A control run: 'shuffled' shows each example's teacher another example's reference, to separate the right reference's effect from the format's.", _default("reference_control"))),
        build_cache: bool = typer.Option(None, "--build-cache/--no-build-cache", help=_help("Let components build a missing cache (contrastive's negatives, with the run's model) instead of stopping.", _default("build_cache"))),
        push_to_hub: str = typer.Option(None, "--push-to-hub", metavar="REPO", help="After training, upload final/ and its model card to this Hub repository (OWNER/NAME)."),
    ) -> None:
        """Train a model by on-policy self-distillation.

        With no arguments: the built-in demo (SmolLM2-135M-Instruct on task 'demo', its settings in
        unisd/data/demo.toml; about 8 minutes on 2 CPU cores).
        """
        console = Console(stderr=False)
        if num_processes > 1 and "WORLD_SIZE" not in os.environ:
            raise typer.Exit(relaunch(num_processes))
        with cli_errors():
            flags = {
                "model": model, "task": task, "data": _data_source(data), "split": data_split,
                "prompt_column": prompt_column, "reference_column": reference_column, "system_prompt": system_prompt,
                "task_data": str(task_data) if task_data else None, "output": str(output) if output else None,
                "steps": steps, "batch_size": batch_size, "grad_accum": grad_accum, "num_generations": num_generations,
                "lr": lr, "lora": lora,
                "dtype": dtype, "backend": backend, "attn_implementation": attn_implementation, "eval_task": eval_task, "eval_every": eval_every, "eval_limit": eval_limit, "save_every": save_every,
                "max_new_tokens": max_new_tokens, "temperature": temperature, "alpha": alpha, "seed": seed,
                "preset": preset, "recipe": recipe, "shard": shard, "deepspeed": str(deepspeed) if deepspeed else None,
                "allow_no_chat_template": allow_no_chat_template, "lora_r": lora_r, "lora_alpha": lora_alpha,
                "lora_dropout": lora_dropout, "lora_target_modules": _module_list(lora_target_modules),
                "report_to": list(report_to) if report_to else None, "reference_control": reference_control,
                "build_cache": build_cache,
            }
            given = {k: v for k, v in flags.items() if v is not None}
            if push_to_hub is not None:
                check_repo_id(push_to_hub)  # before hours of training, not after
            if resume is not None:
                cfg, given = _resume_settings(resume, config, given, with_, option, pm)
                file_keys: set[str] = set()
            else:
                cfg, file_keys = _starting_config(config, given, bool(with_) or bool(preset), console)
            cfg = dataclasses.replace(cfg, **given)
            if resume is None:
                regs = pm.registries
                cfg.components = resolve_selection(
                    list(with_ or []), parse_option_flags(list(option or [])), regs.components, regs.presets,
                    preset=cfg.preset, base=cfg.components,
                )
                apply_named_settings(cfg, regs, set(given) | file_keys, console)
            began = time.perf_counter()
            try:
                run_dir = train(cfg, pm, RichReporter(console, every=cfg.log_every), resume=resume)
            except BaseException:
                distributed.shutdown(clean=False)
                raise
            is_main = distributed.current().is_main
            distributed.shutdown()
            if is_main:
                _after_training(ctx, console, run_dir, time.perf_counter() - began, push_to_hub)


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
    return subprocess.call(cmd)


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
