"""Building a run: the model and tokenizer, the data and its stream, the components (:func:`build_run`).

:class:`Run` is the state of one run that components see in ``setup``, ``teacher`` and ``on_step_end``.
The loop (``loop.py``) builds it once per process; one step (``step.py``) reads it.
"""

from __future__ import annotations

import random
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .components import call_each, implements, instantiate, option_values, resolve_selection
from .config import RunConfig
from .data.controls import shuffle_references
from .data.datafiles import Columns, is_jsonl_file, load_data, with_system_prompt
from .data.example_file import ExampleFile, open_example_file
from .data.prompts import budget_teacher_prompt, encode, fit_context, render_chat
from .data.tasks import Example, Task, teacher_text_with
from .errors import ConfigError, DataError, UsageError
from .io.reporting import Reporter
from .model.models import apply_lora, load_model, load_tokenizer, loading, resolve_model, training_dtype
from .model.teacher import default_teacher
from .parallel import distributed, gradient_sync, sharding
from .parallel.gradient_sync import GradientSync
from .plugins import UnisdPluginManager


class Budgets:
    """The token budgets and pad id of a run, from its ``config``, ``task`` and ``tokenizer``: shared by
    :class:`Run` and ``unisd doctor``'s checks, which must agree with the run they vet."""

    config: RunConfig
    task: Task | None
    tokenizer: Any

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad if pad is not None else self.tokenizer.eos_token_id)

    @property
    def max_new_tokens(self) -> int:
        return self.config.completion_budget(self.task)

    @property
    def teacher_budget(self) -> int:
        return self.config.teacher_budget(self.task)


@dataclass
class Run(Budgets):
    """The state of one run, handed to components' ``setup``, ``teacher`` and ``on_step_end``."""

    config: RunConfig
    model: Any
    tokenizer: Any
    task: Task | None
    examples: Sequence[Example]  # a list, or an ExampleFile (a JSONL file read lazily)
    components: list[Any]
    output_dir: Path | None
    reporter: Reporter
    plugins: UnisdPluginManager | None = None
    source: str | None = None  # where the model was loaded from (directory or hub id)
    teacher: Any = None
    step: int = 0
    reference_truncations: int = 0
    context_truncations: int = 0
    # Token ids of every prompt seen, as compact int32 arrays: a list of Python ints costs ~9× more,
    # which matters when a large dataset's prompts are all checked against the budget.
    _prompt_cache: dict[tuple[str, str], array] = field(default_factory=dict)
    _gradient_sync: GradientSync | None = field(default=None, repr=False)

    def gradient_sync(self) -> GradientSync:
        """How this run's gradients are summed over processes (built on first use: after sharding)."""
        if self._gradient_sync is None:
            self._gradient_sync = gradient_sync.for_model(self.model)
        return self._gradient_sync

    def student_ids(self, ex: Example) -> list[int]:
        key = ("student", ex.id)
        if key not in self._prompt_cache:
            self._prompt_cache[key] = array("i", self.encode_student(ex))
        return list(self._prompt_cache[key])

    def encode_student(self, ex: Example) -> list[int]:
        """The student prompt's token ids, not kept (:meth:`student_ids` keeps them)."""
        return encode(self.tokenizer, render_chat(self.tokenizer, ex.prompt, ex.system))

    def teacher_ids(self, ex: Example) -> list[int]:
        """The teacher prompt within its token budget: the reference is cut, never the problem."""
        key = ("teacher", ex.id)
        if key not in self._prompt_cache:
            budgeted = budget_teacher_prompt(
                self.tokenizer, lambda ref: teacher_text_with(self.task, ex, ref), ex.reference, self.teacher_budget,
                ex.system,
            )
            self.reference_truncations += budgeted.reference_truncated
            self._prompt_cache[key] = array("i", budgeted.ids)
        return list(self._prompt_cache[key])

    def context_ids(self, ex: Example, name: str, text: str) -> list[int]:
        """A component's extra teacher prompt, within the teacher budget: an over-long context that
        holds a demonstration shortens it, like the main prompt, and keeps the problem whole."""
        key = (f"ctx:{name}", ex.id)
        if key not in self._prompt_cache:
            ids = encode(self.tokenizer, render_chat(self.tokenizer, text, ex.system))
            if len(ids) > self.teacher_budget:
                ids = fit_context(self.tokenizer, text, self.teacher_budget, ex.system)
                self.context_truncations += 1
            self._prompt_cache[key] = array("i", ids)
        return list(self._prompt_cache[key])

    @property
    def teacher_rows(self) -> int:
        """Rows per teacher forward: by default one micro-batch, i.e. one forward per context."""
        return self.config.teacher_batch_rows or self.config.batch_size


def teacher_model(run: Run) -> Any:
    """The module behind the teacher view (the student itself unless the teacher keeps a copy)."""
    return getattr(run.teacher, "model", None)


# ----------------------------------------------------------------------------------------------
# Data


def load_examples(config: RunConfig, pm: UnisdPluginManager) -> tuple[Task | None, Sequence[Example]]:
    """The run's task (None for --data files) and its training examples, after any reference control."""
    task, examples = _load_examples(config, pm)
    if isinstance(examples, ExampleFile):
        examples = examples.with_system_prompt(config.system_prompt)
    else:
        examples = with_system_prompt(examples, config.system_prompt)
    if config.reference_control == "shuffled":
        examples = shuffle_references(examples, config.seed)
    return task, examples


def _load_examples(config: RunConfig, pm: UnisdPluginManager) -> tuple[Task | None, Sequence[Example]]:
    if config.data:
        columns = Columns(prompt=config.prompt_column, reference=config.reference_column)
        if is_jsonl_file(config.data):  # read lazily: start-up does not grow with the file
            # one process indexes a new file; the others then read its index from the cache
            return None, distributed.main_first(
                lambda: open_example_file(config.data, columns=columns, limit=config.limit), DataError)
        return None, load_data(config.data, split=config.split, limit=config.limit, columns=columns)
    if not config.task:
        raise ConfigError("nothing to train on: give --task NAME or --data FILE.jsonl")
    task = pm.registries.tasks.get(config.task)()
    if getattr(task, "train_split", "train") is None:
        raise UsageError(f"task '{config.task}' is evaluation-only; train on another task and evaluate on it")
    examples = task.load(config.split, path=config.task_data, limit=config.limit)
    if not examples:
        raise DataError(f"task '{config.task}' split '{config.split}' has no examples")
    return task, examples


class DataStream:
    """Endless, reproducible stream over the examples: a fresh seeded permutation per epoch.

    The position (``cursor``, examples consumed so far) is all a checkpoint needs to resume it.
    """

    def __init__(self, examples: Sequence[Example], seed: int, cursor: int = 0):
        self.examples, self.seed, self.cursor = examples, seed, cursor
        self._epoch_order: tuple[int, list[int]] | None = None  # (epoch, its permutation)

    def _order(self, epoch: int) -> list[int]:
        # One shuffle per epoch, kept: drawing an example costs O(1), not a reshuffle of the whole dataset.
        if self._epoch_order is None or self._epoch_order[0] != epoch:
            order = list(range(len(self.examples)))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._epoch_order = (epoch, order)
        return self._epoch_order[1]

    def take(self, n: int) -> list[Example]:
        out = []
        for _ in range(n):
            epoch, index = divmod(self.cursor, len(self.examples))
            out.append(self.examples[self._order(epoch)[index]])
            self.cursor += 1
        return out


# ----------------------------------------------------------------------------------------------
# Building the run


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def use_chat_template(tokenizer: Any, config: RunConfig) -> None:
    """The run's ``chat_template`` setting replaces the tokenizer's; a tokenizer without one is refused
    unless ``allow_no_chat_template`` (base models: prompts are then plain text)."""
    if config.chat_template:
        tokenizer.chat_template = config.chat_template  # saved with the tokenizer in checkpoints and final/
        return
    if getattr(tokenizer, "chat_template", None) or config.allow_no_chat_template:
        return
    raise UsageError(
        f"--model {config.model}: the tokenizer has no chat template, so prompts would be plain text that a chat "
        "model was never trained on. Use the model's instruct/chat version, set chat_template = \"...\" (a Jinja "
        "template) in the run config (--config), or pass --allow-no-chat-template to train a base model on "
        "plain-text prompts"
    )


def build_run(config: RunConfig, pm: UnisdPluginManager, reporter: Reporter, output_dir: Path | None) -> Run:
    """Load everything a run needs, in an order that fails fast on bad input (names before models)."""
    config.validate()
    regs = pm.registries
    backend_cls = regs.backends.get(config.backend)
    # The preset's components under the run's own (the CLI has merged them already; the same merge again
    # changes nothing), so the library call train(RunConfig(preset=...)) trains what the name says.
    if config.preset:
        config.components = resolve_selection([], {}, regs.components, regs.presets, preset=config.preset,
                                              base=config.components)
    components = instantiate(config.components, regs.components)
    # config.toml records every option of every component, typed (``-o clip.max_value=5`` is 5.0, not "5")
    config.components = {c.name: option_values(c) for c in components}
    task, examples = load_examples(config, pm)
    if config.eval_task:
        regs.tasks.get(config.eval_task)

    env = distributed.current()
    plan = _sharding_plan(config, backend_cls, env)
    seed_everything(config.seed)
    if torch.cuda.is_available():
        # float32 weights (--full keeps them for the optimizer) would otherwise multiply at a fraction of
        # the tensor cores' rate; TF32 keeps float32's range with a 10-bit mantissa in the products.
        torch.set_float32_matmul_precision("high" if config.tf32 else "highest")
    source = resolve_model(config.model, progress=reporter.info)
    with loading(source, "tokenizer"):
        tokenizer = load_tokenizer(source)
    use_chat_template(tokenizer, config)
    model = _load_student(config, source, plan, env, reporter)
    run = Run(config, model, tokenizer, task, examples, components, output_dir, reporter, plugins=pm, source=source)
    run.teacher = default_teacher(model, config.lora)
    if plan is not None:  # after the teacher's copy is taken, before components capture parameters
        _shard(run, plan, env, reporter)
    owners = [c for c in components if implements(c, "teacher")]
    call_each(components, "setup", run)
    if owners:
        run.teacher = owners[0].teacher(run)
    _drop_long_prompts(run, reporter)
    return run


def _sharding_plan(config: RunConfig, backend_cls: Any, env: Any) -> Any:
    """The sharding plan (None: unsharded), refusing the combinations a backend cannot run."""
    if env.active and getattr(backend_cls, "one_process_only", False):
        raise UsageError(f"--backend {config.backend} runs in one process only; use --backend hf for "
                         f"{env.world_size} processes, or --backend vllm-server with a separate vLLM server")
    plan = sharding.choose_plan(config.shard, config.deepspeed, env.world_size)
    if plan is not None:
        sharding.require_support()
    if plan is not None and config.backend != "hf":
        raise UsageError(f"--backend {config.backend} cannot generate from a sharded model yet; use --backend hf "
                         f"with sharding ({plan.source}), or plain data parallelism (--shard none)")
    return plan


def _load_student(config: RunConfig, source: str, plan: Any, env: Any, reporter: Reporter) -> Any:
    """The model to train: loaded in the training dtype, checkpointed if asked, with its LoRA adapter."""
    # Under sharding only the main process reads the weights, on the CPU: the others build the model on
    # the meta device and receive their shards after sharding (sharding.fill_from_main), and each unit
    # moves to its device as it is sharded, so no GPU ever holds the whole model.
    with loading(source, "model"):
        model = load_model(source, training_dtype(config.dtype, not config.lora), config.attn_implementation,
                           to_gpu=plan is None, on_meta=plan is not None and not env.is_main)
    _warn_about_dtype(config, reporter)
    if config.gradient_checkpointing or (plan is not None and plan.activation_checkpointing):
        # the method's memory setting: recompute activations in backward
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if config.lora:
        model = apply_lora(model, config.lora_r, config.lora_alpha, config.lora_dropout, config.lora_target_modules)
    model.train()
    if hasattr(model, "config"):
        model.config.use_cache = False
    return model


def _warn_about_dtype(config: RunConfig, reporter: Reporter) -> None:
    if not config.lora and config.dtype in ("bfloat16", "float16"):
        reporter.info(f"[yellow]--full with {config.dtype} weights: AdamW updates smaller than the weights' "
                      "precision (most of them, at small learning rates) are rounded away. --dtype float32 (what "
                      "'auto' loads under --full) keeps them: on GPUs its matmuls run as TF32, and a sharded run's "
                      "bf16 mixed precision computes in bf16.[/]")
    if config.dtype == "float16":
        reporter.info("[yellow]--dtype float16: unisd runs no loss scaler, so float16 activations and gradients can "
                      "overflow or underflow; prefer bfloat16 (GPUs since Ampere) or float32.[/]")


def _shard(run: Run, plan: Any, env: Any, reporter: Reporter) -> None:
    """Shard the student (and a teacher that keeps its own copy) over the processes."""
    reporter.info(f"Sharding: {plan.describe()}")
    if plan.ignored:
        reporter.info(f"[yellow]Not applied from {plan.source}: {'; '.join(plan.ignored)}.[/]")
    models = [run.model] + [m for m in [teacher_model(run)] if m is not None and m is not run.model]
    for sharded in models:  # the state is read before sharding (whole tensors), filled in after
        state = sharded.state_dict() if env.is_main else None
        sharding.shard_model(sharded, plan)
        sharding.fill_from_main(sharded, state)
        del state


def _drop_long_prompts(run: Run, reporter: Reporter) -> None:
    """Leave out examples whose student prompt exceeds ``max_prompt_tokens`` (all of them: an error)."""
    limit = run.config.max_prompt_tokens
    if isinstance(run.examples, ExampleFile):  # counted once per file and tokenizer, then read from the cache
        lengths = distributed.main_first(lambda: run.examples.prompt_lengths(
            run.tokenizer, lambda e: len(run.encode_student(e)), reporter.track), DataError)
    else:
        lengths = np.array([len(run.student_ids(e)) for e in run.examples], dtype=np.int64)
    over = np.flatnonzero(lengths > limit)
    if not len(over):
        return
    if len(over) == len(run.examples):
        raise DataError(f"every student prompt is longer than max_prompt_tokens={limit}; raise it")
    reporter.info(f"[yellow]Skipping {len(over)} example(s) whose student prompt exceeds "
                  f"{limit} tokens (e.g. {run.examples[int(over[0])].id}).[/]")
    keep = np.flatnonzero(lengths <= limit)
    if isinstance(run.examples, ExampleFile):
        run.examples = run.examples.subset(keep)
    else:
        run.examples = [run.examples[i] for i in keep]
