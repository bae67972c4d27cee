"""The typed run configuration, read from and written to TOML (``config.toml`` in each run directory)."""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError, OptionError
from .recipes import check_recipe
from .values import convert_value

SHARD_CHOICES = ("auto", "none", "fsdp", "hybrid")  # see unisd.parallel.sharding
COMPILE_CHOICES = ("auto", "on", "off")  # see unisd.divergence.chunk_math
MERGE_CHOICES = ("auto", "on", "off")  # see unisd.model.merged_adapter
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")  # see unisd.model.models.training_dtype
GJSD_SCALE_CHOICES = ("normalized", "research")  # see unisd.divergence.losses
LOSS_REDUCTION_CHOICES = ("token", "sequence")  # see unisd.divergence.reduction
REFERENCE_CONTROL_CHOICES = ("none", "shuffled")  # see unisd.data.controls
ALPHA_RULE = "alpha must be in [0, 1] (0 = forward KL, 1 = reverse KL)"
# Greedy evaluation's generation batch (training's held-out evaluation, `unisd eval`). Decoding reads every
# weight once per token for the whole batch: on a 2-core CPU, 32 rows took 0.7x the time of 16 rows.
EVAL_BATCH_SIZE = 32


def alpha_ok(alpha: float) -> bool:
    """The one rule for the divergence's α, used by the config, the oracle and the chunked path (NaN fails)."""
    return 0.0 <= alpha <= 1.0


@dataclass
class RunConfig:
    """Everything that determines a training run. Defaults follow the method's direct CLI."""

    # what to train, on what
    model: str = "smollm2"
    task: str | None = None
    data: str | None = None
    task_data: str | None = None  # a local file in the task's own (hub) layout, for --task
    split: str = "train"  # the task's split, or a dataset's (--data-split) for dataset folders and Hub ids
    prompt_column: str = "prompt"  # --data records: the student's text
    reference_column: str = "reference"  # --data records: the teacher's demonstration (chat records: the last turn)
    system_prompt: str | None = None  # a system turn for student and teacher, on examples without their own
    limit: int | None = None
    preset: str | None = None
    recipe: str | None = None  # "paper": the research runner's run settings per task (unisd.recipes)
    components: dict[str, dict[str, Any]] = field(default_factory=dict)
    output: str | None = None
    # optimisation
    steps: int = 100
    batch_size: int = 4
    grad_accum: int = 4
    # Completions sampled per prompt: a step draws batch_size × grad_accum / G prompts and G completions of
    # each; the teacher runs each prompt once for all of its completions (model.scoring.shared_prompt_hidden).
    num_generations: int = 1
    lr: float = 2e-5
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_nonfinite_steps: int = 5  # stop (with a checkpoint) after this many NaN/inf steps in a row
    lora: bool = True
    lora_r: int = 64
    lora_alpha: int = 128
    lora_dropout: float = 0.05
    lora_target_modules: list[str] | None = None  # module names; None: every attention and MLP projection
    seed: int = 42
    gradient_checkpointing: bool = False  # recompute activations in backward (less memory, ~30% slower)
    # multi-process: "auto" follows the launcher (an accelerate FSDP/DeepSpeed config shards, else plain
    # data parallelism); "fsdp" shards parameters, gradients and optimizer state; "none" never shards
    shard: str = "auto"
    deepspeed: str | None = None  # a DeepSpeed JSON config: its ZeRO stage selects the FSDP2 equivalent
    # rollouts
    backend: str = "hf"
    vllm_gpu_memory_utilization: float = 0.3
    vllm_sleep: bool = False  # free the engine's GPU memory between generations
    vllm_server_url: str | None = None  # --backend vllm-server
    vllm_adapter_dir: str | None = None  # where the server can read the adapters we save
    # --backend hf: a LoRA adapter merged into a copy of the float32 weights it adapts for each generate
    # call (unisd.model.merged_adapter): "auto" = on a CPU (where decoding streams every weight per token;
    # the copies are kept between calls), "on" = also on a GPU (a copy per call), "off"
    merge_adapter_for_generation: str = "auto"
    temperature: float = 0.7
    top_p: float = 1.0
    max_new_tokens: int | None = None  # None: the task's default (256 for --data files)
    max_prompt_tokens: int = 1024
    max_teacher_prompt_tokens: int | None = None  # None: max_prompt_tokens + max_new_tokens
    mask_truncated: bool = False
    chat_template: str | None = None  # a Jinja chat template replacing the tokenizer's (or supplying a missing one)
    allow_no_chat_template: bool = False  # base models: render prompts as plain text instead of refusing
    teacher_batch_rows: int | None = None  # rows per teacher forward (None: batch_size = one context each)
    # the divergence
    alpha: float = 0.0
    loss_temperature: float | None = None  # None: the sampling temperature, as in the method
    divergence_chunk_size: int = 1024  # tokens per chunk of the vocabulary projection (memory vs speed)
    compile_divergence: str = "auto"  # fuse each chunk's vocabulary math (torch.compile): auto = on CUDA
    # 0 < alpha < 1: "normalized" divides the JSD by alpha(1-alpha) (continuous with the KLs at the ends);
    # "research" is the research code's unscaled JSD, so its clip caps and loss weights mean the same
    gjsd_scale: str = "normalized"
    # "token": mean over the step's loss tokens; "sequence": mean over each sequence's tokens, then over
    # the step's sequences (the research code's); both are independent of the micro-batch split
    loss_reduction: str = "token"
    # "shuffled": a control run whose teacher sees another training example's reference (unisd.data.controls)
    reference_control: str = "none"
    # components that need a cache (contrastive's negatives) build what is missing with the run's model
    build_cache: bool = True
    # bookkeeping
    save_every: int = 0  # 0: only at the end of the run
    eval_task: str | None = None
    eval_every: int = 0
    report_to: list[str] = field(default_factory=list)  # experiment trackers: tensorboard, wandb, trackio, mlflow
    log_every: int = 0  # when stdout is not a terminal: a plain line every N steps (0: about 20 lines a run)
    eval_limit: int | None = 64
    eval_before_after: bool = False
    dtype: str = "auto"
    tf32: bool = True  # on GPUs: float32 matmuls on TF32 tensor cores (float32 weights: --full, --dtype float32)
    attn_implementation: str | None = None

    def validate(self) -> None:
        if self.task and self.data:
            raise ConfigError("give either --task or --data, not both")
        check_recipe(self.recipe)
        checks = [
            (self.steps >= 1, "--steps must be ≥ 1"),
            (self.batch_size >= 1, "--batch-size must be ≥ 1"),
            (self.grad_accum >= 1, "--grad-accum must be ≥ 1"),
            (self.num_generations >= 1, "--num-generations must be ≥ 1"),
            (self.num_generations == 1 or self.temperature > 0,
             f"--num-generations {self.num_generations} at temperature 0 samples the same completion each time; "
             "sample (--temperature > 0) or use --num-generations 1"),
            (self.num_generations < 1 or (self.batch_size * self.grad_accum) % self.num_generations == 0,
             f"--num-generations {self.num_generations} must divide the completions of a step, batch_size × "
             f"grad_accum = {self.batch_size * self.grad_accum}: each prompt's completions come from one step"),
            # comparisons with NaN are false, so NaN fails each check below; inf needs isfinite
            (math.isfinite(self.lr) and self.lr > 0, f"--lr must be a finite number > 0, got {self.lr}"),
            (alpha_ok(self.alpha), ALPHA_RULE),
            (math.isfinite(self.temperature) and self.temperature >= 0, "temperature must be a finite number ≥ 0"),
            (self.loss_temperature is None or (math.isfinite(self.loss_temperature) and self.loss_temperature > 0),
             "loss_temperature must be a finite number > 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (math.isfinite(self.weight_decay) and self.weight_decay >= 0, "weight_decay must be a finite number ≥ 0"),
            (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0, "max_grad_norm must be a finite number > 0"),
            (self.max_new_tokens is None or self.max_new_tokens >= 1,
             f"--max-new-tokens must be ≥ 1, got {self.max_new_tokens}"),
            (self.max_prompt_tokens >= 1, "max_prompt_tokens must be ≥ 1"),
            (self.max_teacher_prompt_tokens is None or self.max_teacher_prompt_tokens >= 1,
             "max_teacher_prompt_tokens must be ≥ 1"),
            (0 <= self.warmup_ratio < 1, "warmup_ratio must be in [0, 1)"),
            (self.lora_r >= 1, f"--lora-r must be ≥ 1, got {self.lora_r}"),
            (math.isfinite(self.lora_alpha) and self.lora_alpha > 0, f"--lora-alpha must be > 0, got {self.lora_alpha}"),
            (0 <= self.lora_dropout < 1, f"--lora-dropout must be in [0, 1), got {self.lora_dropout}"),
            (self.lora_target_modules is None or len(self.lora_target_modules) > 0,
             "--lora-target-modules needs at least one module name"),
            (self.save_every >= 0, "--save-every must be ≥ 0"),
            (self.eval_every >= 0, "--eval-every must be ≥ 0"),
            (self.log_every >= 0, "log_every must be ≥ 0"),
            (self.dtype in DTYPE_CHOICES, f"--dtype must be one of {', '.join(DTYPE_CHOICES)}, got '{self.dtype}'"),
            (self.shard in SHARD_CHOICES, f"--shard must be one of {', '.join(SHARD_CHOICES)}, got '{self.shard}'"),
            (self.compile_divergence in COMPILE_CHOICES,
             f"compile_divergence must be one of {', '.join(COMPILE_CHOICES)}, got '{self.compile_divergence}'"),
            (self.merge_adapter_for_generation in MERGE_CHOICES,
             f"merge_adapter_for_generation must be one of {', '.join(MERGE_CHOICES)}, "
             f"got '{self.merge_adapter_for_generation}'"),
            (self.gjsd_scale in GJSD_SCALE_CHOICES,
             f"gjsd_scale must be one of {', '.join(GJSD_SCALE_CHOICES)}, got '{self.gjsd_scale}'"),
            (self.loss_reduction in LOSS_REDUCTION_CHOICES,
             f"loss_reduction must be one of {', '.join(LOSS_REDUCTION_CHOICES)}, got '{self.loss_reduction}'"),
            (self.reference_control in REFERENCE_CONTROL_CHOICES,
             f"--reference-control must be one of {', '.join(REFERENCE_CONTROL_CHOICES)}, "
             f"got '{self.reference_control}'"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    def completion_budget(self, task: Any = None) -> int:
        """Max new tokens per completion: the flag, else the task's default, else 256."""
        if self.max_new_tokens is not None:
            return self.max_new_tokens
        return int(getattr(task, "max_new_tokens", 256)) if task is not None else 256

    def teacher_budget(self, task: Any = None) -> int:
        """Token budget of a teacher prompt: the flag, else the student's prompt budget plus the completion's."""
        if self.max_teacher_prompt_tokens is not None:
            return self.max_teacher_prompt_tokens
        return self.max_prompt_tokens + self.completion_budget(task)

    @property
    def divergence_temperature(self) -> float:
        if self.loss_temperature is not None:
            return self.loss_temperature
        return self.temperature if self.temperature > 0 else 1.0


_FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}


def config_from_mapping(values: dict[str, Any], where: str) -> RunConfig:
    """Build a RunConfig from a TOML mapping, converting and checking every key."""
    hints = typing.get_type_hints(RunConfig)
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in _FIELDS:
            import difflib

            close = difflib.get_close_matches(key, list(_FIELDS), n=2)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise ConfigError(f"{where}: unknown setting '{key}'.{hint}")
        if key == "components":
            if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
                raise ConfigError(f"{where}: [components.NAME] tables expected")
            kwargs[key] = {k: dict(v) for k, v in value.items()}
            continue
        try:
            kwargs[key] = convert_value(value, hints[key], f"{where}: {key}")
        except OptionError as exc:
            raise ConfigError(str(exc)) from None
    return RunConfig(**kwargs)


def read_toml(path: str | Path, what: str = "--config") -> dict[str, Any]:
    """A TOML file as a mapping; a missing file or bad TOML is a ConfigError naming ``what`` and the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path}: no such file")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML ({exc})") from None


def load_config(path: str | Path) -> RunConfig:
    return config_from_mapping(read_toml(path), str(path))


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} to TOML")


def dump_config(config: RunConfig) -> str:
    """The fully resolved config as TOML (unset optional values are omitted: TOML has no null)."""
    lines = ["# unisd run configuration (fully resolved). Rerun with: unisd train --config config.toml"]
    for name in _FIELDS:
        value = getattr(config, name)
        if name == "components" or value is None:
            continue
        lines.append(f"{name} = {_toml_value(value)}")
    for comp in sorted(config.components):
        lines.append("")
        lines.append(f"[components.{comp}]")
        for key, value in sorted(config.components[comp].items()):
            if value is not None:
                lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"
