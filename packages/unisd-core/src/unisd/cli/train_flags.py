"""The flags of ``unisd train``, as one table.

Each flag is declared once, with the run setting it sets and how its text becomes that setting's value,
so the command's body stays the algorithm of starting a run instead of a 46-parameter signature and a
dict that repeats every name. ``declare_flags`` hands Typer the parameters it reads from a function's
signature.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import typer

from ..config import RunConfig

F = TypeVar("F", bound=Callable[..., Any])


def _default(name: str) -> str:
    """A setting's default as ``--help`` shows it (the options themselves default to None: "not given")."""
    return f"[default: {getattr(RunConfig(), name)}]"


def _data_source(data: str) -> str:
    """A local path as pathlib spells it (so `--resume` compares ./x.jsonl and x.jsonl equal); a Hub id as given."""
    return str(Path(data)) if Path(data).exists() else data


def _module_list(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


@dataclass(frozen=True)
class Flag:
    """One command-line option: the parameter Typer passes, its type and declaration, and the
    `RunConfig` field it sets (None: the command reads it itself, e.g. --resume)."""

    name: str
    type: Any
    option: Any  # typer.Option(...)
    setting: str | None = None
    convert: Callable[[Any], Any] = lambda value: value

    @staticmethod
    def run(name: str, type_: Any, *decls: str, help: str, setting: str | None = None,
            convert: Callable[[Any], Any] | None = None, metavar: str | None = None) -> Flag:
        """A flag that sets the run setting of the same name (or `setting`); not given is None."""
        option = typer.Option(None, *decls, metavar=metavar, help=help)
        return Flag(name, type_, option, setting or name, convert or (lambda value: value))


def declare_flags(flags: Sequence[Flag]) -> Callable[[F], F]:
    """Decorate ``def command(ctx: typer.Context, **values)`` so Typer sees one parameter per flag.

    Typer reads a command's options from `inspect.signature` and the type hints; both are set here
    from the table, in its order (the order ``--help`` lists them in).
    """

    def apply(func: F) -> F:
        params = [inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)]
        params += [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.option, annotation=f.type)
                   for f in flags]
        func.__signature__ = inspect.Signature(params, return_annotation=None)  # type: ignore[attr-defined]
        func.__annotations__ = {p.name: p.annotation for p in params} | {"return": None}
        return func

    return apply


def run_settings(flags: Sequence[Flag], values: dict[str, Any]) -> dict[str, Any]:
    """The run settings the given flags set, converted; flags not given (None, or an empty repeatable
    flag) are left out, so a --config file's value stays."""
    converted = {f.setting: f.convert(values[f.name]) for f in flags
                 if f.setting is not None and values.get(f.name) is not None}
    return {key: value for key, value in converted.items() if value is not None}


_run = Flag.run

TRAIN_FLAGS: tuple[Flag, ...] = (
    _run("model", str, "--model", metavar="MODEL", help="HF hub id, local HF directory, .gguf file, or 'smollm2' (bundled)."),
    _run("task", str, "--task", metavar="TASK", help="A registered task (see `unisd plugins`)."),
    _run("data", str, "--data", metavar="FILE|DIR|HUB_ID", convert=_data_source, help="Training data: a .jsonl/.json/.csv/.parquet file, a dataset folder, or a Hub dataset OWNER/NAME[:CONFIG]; records with prompt and reference, or chat 'messages'."),
    _run("data_split", str, "--data-split", setting="split", metavar="SPLIT", help=f"The split of a dataset folder or Hub dataset.  {_default('split')}"),
    _run("prompt_column", str, "--prompt-column", metavar="NAME", help=f"The field holding the student's text.  {_default('prompt_column')}"),
    _run("reference_column", str, "--reference-column", metavar="NAME", help=f"The field holding the teacher's demonstration (chat records: default the last assistant turn).  {_default('reference_column')}"),
    _run("system_prompt", str, "--system-prompt", metavar="TEXT", help="A system turn for student and teacher (and the evaluations), on examples without one of their own."),
    _run("task_data", Path, "--task-data", metavar="FILE", convert=str, help="Local file in the task's own field layout (with --task)."),
    Flag("with_", list[str], typer.Option(None, "--with", metavar="COMPONENT", help="Add a component (repeatable), e.g. --with ema.")),
    _run("preset", str, "--preset", metavar="PRESET", help="A named set of components and options, e.g. unisd-star."),
    _run("recipe", str, "--recipe", metavar="RECIPE", help="'paper': the research runner's run settings for every method (prompts 3072, 1024 new tokens, full MBPP, tool-use masking)."),
    Flag("option", list[str], typer.Option(None, "-o", "--option", metavar="NAME.KEY=VALUE", help="Component option (repeatable).")),
    Flag("config", Path, typer.Option(None, "--config", metavar="FILE", help="TOML run config; flags override it.")),
    _run("output", Path, "--output", metavar="DIR", convert=str, help="Run directory (default runs/TASK-TIMESTAMP)."),
    _run("steps", int, "--steps", metavar="N", help=f"Total optimiser steps of the run (also when resuming).  {_default('steps')}"),
    _run("batch_size", int, "--batch-size", metavar="N", help=f"Examples per micro-batch (per process).  {_default('batch_size')}"),
    _run("grad_accum", int, "--grad-accum", metavar="N", help=f"Micro-batches per optimiser step.  {_default('grad_accum')}"),
    _run("num_generations", int, "--num-generations", metavar="G", help=f"Completions sampled per prompt (must divide batch size × grad accum); the teacher runs each prompt once for all of them.  {_default('num_generations')}"),
    _run("lr", float, "--lr", metavar="LR", help=f"Peak learning rate (cosine schedule with warm-up).  {_default('lr')}"),
    _run("lora", bool, "--lora/--full", help="LoRA adapter (teacher = adapter off) or full fine-tuning (teacher = frozen copy).  [default: --lora]"),
    _run("lora_r", int, "--lora-r", metavar="R", help=f"LoRA rank.  {_default('lora_r')}"),
    _run("lora_alpha", int, "--lora-alpha", metavar="ALPHA", help=f"LoRA scaling numerator (scale = alpha / r).  {_default('lora_alpha')}"),
    _run("lora_dropout", float, "--lora-dropout", metavar="P", help=f"Dropout on the LoRA path.  {_default('lora_dropout')}"),
    _run("lora_target_modules", str, "--lora-target-modules", metavar="NAMES", convert=_module_list, help="Comma-separated module names, e.g. q_proj,v_proj.  [default: all attention and MLP projections]"),
    _run("dtype", str, "--dtype", metavar="DTYPE", help=f"Weights: auto (bf16 on GPUs under LoRA, else float32), float32, bfloat16 or float16.  {_default('dtype')}"),
    _run("backend", str, "--backend", metavar="NAME", help=f"Generation backend: hf, vllm, vllm-server, or a plugin's.  {_default('backend')}"),
    _run("attn_implementation", str, "--attn-implementation", metavar="NAME", help="sdpa, eager or flash_attention_2 (needs flash-attn)."),
    _run("eval_task", str, "--eval-task", metavar="TASK", help="Evaluate this task during training."),
    _run("eval_every", int, "--eval-every", metavar="N", help="Evaluate every N steps.  [default: never]"),
    _run("eval_limit", int, "--eval-limit", metavar="N", help=f"Items of the eval split to use.  {_default('eval_limit')}"),
    _run("save_every", int, "--save-every", metavar="N", help="Checkpoint every N steps (always at the end).  [default: at the end only]"),
    _run("max_new_tokens", int, "--max-new-tokens", metavar="N", help="Completion budget.  [default: the task's]"),
    _run("temperature", float, "--temperature", metavar="T", help=f"Sampling and divergence temperature.  {_default('temperature')}"),
    _run("alpha", float, "--alpha", metavar="A", help=f"Divergence: 0 forward KL(teacher‖student), 1 reverse KL, between: scaled generalized JSD.  {_default('alpha')}"),
    _run("allow_no_chat_template", bool, "--allow-no-chat-template", help="Train a model whose tokenizer has no chat template (a base model) on plain-text prompts."),
    Flag("resume", Path, typer.Option(None, "--resume", metavar="RUN", help="Continue a run directory (or one of its checkpoints) exactly.")),
    _run("seed", int, "--seed", metavar="N", help=f"Random seed.  {_default('seed')}"),
    Flag("num_processes", int, typer.Option(1, "--num-processes", metavar="N", help="Data-parallel processes on this machine (relaunches under torch.distributed.run).")),
    _run("shard", str, "--shard", metavar="MODE", help=f"Multi-process: fsdp shards weights, gradients and optimizer state (FSDP2); hybrid shards them within each machine and replicates across machines; none replicates them; auto follows an accelerate FSDP/DeepSpeed config.  {_default('shard')}"),
    _run("deepspeed", Path, "--deepspeed", metavar="FILE", convert=str, help="DeepSpeed JSON config: its ZeRO stage and offload select the equivalent FSDP2 sharding."),
    _run("report_to", list[str], "--report-to", metavar="TRACKER", convert=lambda trackers: list(trackers) or None, help="Also send metrics, config and evaluations to tensorboard, wandb, trackio or mlflow (repeatable; each an extra: pip install 'unisd-core[wandb]')."),
    _run("reference_control", str, "--reference-control", metavar="none|shuffled", help=f"A control run: 'shuffled' shows each example's teacher another example's reference, to separate the right reference's effect from the format's.  {_default('reference_control')}"),
    _run("build_cache", bool, "--build-cache/--no-build-cache", help=f"Let components build a missing cache (contrastive's negatives, with the run's model) instead of stopping.  {_default('build_cache')}"),
    Flag("push_to_hub", str, typer.Option(None, "--push-to-hub", metavar="REPO", help="After training, upload final/ and its model card to this Hub repository (OWNER/NAME).")),
)
