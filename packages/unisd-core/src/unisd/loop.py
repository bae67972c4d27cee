"""The on-policy self-distillation loop. Read it top to bottom.

One optimiser step:
  1. take ``batch_size × grad_accum`` examples from the data stream;
  2. the student generates one completion per example from the *student* prompt;
  3. the teacher (no grad) scores each completion under the teacher prompt — the problem plus the
     reference — and under any extra contexts the selected components ask for;
  4. per micro-batch, the student scores the same completion under its own prompt (with grad); the
     per-token divergence goes through the components (clip → weights → extra terms);
  5. the summed loss is divided by the number of loss tokens (or, under ``loss_reduction =
     "sequence"``, each sequence by its own and the sum by the number of sequences) of the *whole*
     step, so the update does not depend on how the step is split into micro-batches;
  6. clip the gradient norm, AdamW, cosine schedule; components' ``on_step_end``; metrics; checkpoint.
"""

from __future__ import annotations

import math
import random
import time
from array import array
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from . import atomic, distributed, reduction, rundir, sharding
from .activity import ActivityWatch, inert_warnings
from .checkpoint import (
    choose_checkpoint,
    gather_component_states,
    load_checkpoint,
    resume_target,
    rng_state,
    save_checkpoint,
    save_weights,
)
from .chunked import chunked_target_logprobs, chunked_token_outputs
from .components import attribute, call_each, implements, instantiate, option_values, resolve_selection
from .config import RunConfig, dump_config
from .controls import shuffle_references
from .datafiles import Columns, load_data, with_system_prompt
from .errors import ConfigError, DataError, TrainingDiverged, TrainingInterrupted, UsageError
from .evaluate import evaluate
from .leakage import count_leaks
from .models import apply_lora, load_model, load_tokenizer, loading, resolve_model, training_dtype
from .plugins import UnisdPluginManager
from .prompts import budget_teacher_prompt, encode, fit_context, render_chat
from .reporting import Reporter, startup_summary
from .rollout import Completion, SamplingParams
from .runlog import MetricsLog
from .scoring import Scores, completion_hidden, lm_head_weight, pack
from .signals import StopRequest
from .tasks import Example, Task, teacher_text_with
from .teacher import default_teacher
from .trackers import Trackers, check_trackers

T = TypeVar("T")


@dataclass
class StepBatch:
    """What components see about the current optimiser step and micro-batch."""

    examples: list[Example]  # this micro-batch
    completions: list[list[int]]
    step: int  # the optimiser step being computed (1-based)
    num_tokens: float  # loss tokens in the whole optimiser step (the loss denominator)
    micro_index: int
    # Teacher token log-probs and masks of *every* micro-batch of this step, for statistics
    # (quantiles, normalisation) that must not depend on the micro-batch split (see unisd.stepstats).
    step_teacher_logp: list[dict[str, torch.Tensor]] = field(default_factory=list)
    step_masks: list[torch.Tensor] = field(default_factory=list)
    # The student's divergence and entropy [B, C] of every micro-batch (no grad), only when a selected
    # component sets ``needs_step_scores``: the student's own statistics then also cover the step.
    step_divergence: list[torch.Tensor] = field(default_factory=list)
    step_entropy: list[torch.Tensor] = field(default_factory=list)


@dataclass
class Run:
    """The state of one run, handed to components' ``setup``, ``teacher`` and ``on_step_end``."""

    config: RunConfig
    model: Any
    tokenizer: Any
    task: Task | None
    examples: list[Example]
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

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad if pad is not None else self.tokenizer.eos_token_id)

    def student_ids(self, ex: Example) -> list[int]:
        key = ("student", ex.id)
        if key not in self._prompt_cache:
            self._prompt_cache[key] = array("i", encode(self.tokenizer, render_chat(self.tokenizer, ex.prompt, ex.system)))
        return list(self._prompt_cache[key])

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

    @property
    def max_new_tokens(self) -> int:
        return self.config.completion_budget(self.task)

    @property
    def teacher_budget(self) -> int:
        return self.config.teacher_budget(self.task)


# ----------------------------------------------------------------------------------------------
# Data


def load_examples(config: RunConfig, pm: UnisdPluginManager) -> tuple[Task | None, list[Example]]:
    """The run's task (None for --data files) and its training examples, after any reference control."""
    task, examples = _load_examples(config, pm)
    examples = with_system_prompt(examples, config.system_prompt)
    if config.reference_control == "shuffled":
        examples = shuffle_references(examples, config.seed)
    return task, examples


def _load_examples(config: RunConfig, pm: UnisdPluginManager) -> tuple[Task | None, list[Example]]:
    if config.data:
        columns = Columns(prompt=config.prompt_column, reference=config.reference_column)
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

    def __init__(self, examples: list[Example], seed: int, cursor: int = 0):
        self.examples, self.seed, self.cursor = examples, seed, cursor

    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.examples)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def take(self, n: int) -> list[Example]:
        out = []
        for _ in range(n):
            epoch, index = divmod(self.cursor, len(self.examples))
            out.append(self.examples[self._order(epoch)[index]])
            self.cursor += 1
        return out


# ----------------------------------------------------------------------------------------------
# One optimiser step


def _micro_batches(n: int, size: int) -> list[range]:
    return [range(start, min(start + size, n)) for start in range(0, n, size)]


@torch.no_grad()
def teacher_pass(run: Run, examples: list[Example], completions: list[list[int]], masks: torch.Tensor) -> dict[str, Any]:
    """Teacher hidden states and token log-probs for the main prompt and every component context.

    All contexts of the micro-batch (main, agreement, negative, ...) are packed into one batch of
    B·(1+K) rows and go through the teacher ``teacher_batch_rows`` rows at a time: by default one
    context per forward, so an extra context adds only its kept hidden states (B·C·H) to the peak;
    raising it runs several contexts per forward (faster, with a larger activation peak). Token
    log-probs are formed chunk by chunk from hidden states: never a B·C·V tensor per context.
    """
    with sharding.gathered(teacher_model(run)):
        return _teacher_pass(run, examples, completions, masks)


def teacher_model(run: Run) -> Any:
    """The module behind the teacher view (the student itself unless the teacher keeps a copy)."""
    return getattr(run.teacher, "model", None)


def _teacher_pass(run: Run, examples: list[Example], completions: list[list[int]], masks: torch.Tensor) -> dict[str, Any]:
    cfg = run.config
    temperature = cfg.divergence_temperature
    # (name, temperature, keep hidden?, prompt ids per example), main prompt first
    rows: list[tuple[str, float, bool, list[list[int]]]] = [
        ("main", temperature, True, [run.teacher_ids(e) for e in examples])
    ]
    for comp in run.components:
        if not implements(comp, "teacher_contexts"):
            continue
        ctx_temperature = attribute(comp, "context_temperature") or temperature
        per_example = [comp.teacher_contexts(e) for e in examples]
        for name in sorted({n for ctx in per_example for n in ctx}):
            missing = [e.id for e, ctx in zip(examples, per_example, strict=True) if name not in ctx]
            if missing:
                raise UsageError(f"component {comp.name} gave no context '{name}' for example(s) {missing[:3]}")
            ids = [run.context_ids(e, name, ctx[name]) for e, ctx in zip(examples, per_example, strict=True)]
            rows.append((name, ctx_temperature, bool(attribute(comp, "needs_hidden")), ids))

    b = len(examples)
    packed_all = pack([p for _, _, _, ids in rows for p in ids], completions * len(rows), run.pad_id)
    hidden_all = torch.cat([
        run.teacher.hidden(_rows(packed_all, start, start + run.teacher_rows))
        for start in range(0, b * len(rows), run.teacher_rows)
    ])  # [B·(1+K), C, H]
    weight = run.teacher.head_weight()
    targets = packed_all.targets[:b].to(hidden_all.device)
    token_mask = packed_all.mask[:b].to(hidden_all.device)
    logp: dict[str, torch.Tensor] = {}
    hidden_by_ctx: dict[str, torch.Tensor] = {}
    for i, (name, ctx_temperature, keep, _) in enumerate(rows):
        hidden = hidden_all[i * b : (i + 1) * b]  # [B, C, H]
        logp[name] = chunked_target_logprobs(
            hidden, weight, targets, token_mask, ctx_temperature, chunk_size=cfg.divergence_chunk_size,
            compile=cfg.compile_divergence,
        ).cpu()  # [B, C], 0 on padding
        if keep:
            hidden_by_ctx[name] = hidden
    packed = _rows(packed_all, 0, b)
    return {"packed": packed, "hidden": hidden_by_ctx, "logp": logp, "mask": masks}


def _rows(packed: Any, start: int, stop: int) -> Any:
    """Rows [start, stop) of a packed batch, trimmed to the widest real row (less padding per forward)."""
    from .scoring import Packed

    width = int(packed.attention_mask[start:stop].sum(-1).max())
    return Packed(
        packed.input_ids[start:stop, :width], packed.attention_mask[start:stop, :width],
        packed.positions[start:stop], packed.targets[start:stop], packed.mask[start:stop],
    )


def distill_step(run: Run, examples: list[Example], completions: list[Completion]) -> dict[str, float]:
    """Forward/backward of one optimiser step's loss over fixed completions (gradients accumulate in
    the parameters; the caller steps the optimiser). Returns the step's loss statistics."""
    cfg = run.config
    comp_ids = [c.ids for c in completions]
    micro = _micro_batches(len(examples), cfg.batch_size)

    # Teacher first, for the whole step: its token statistics may weight every micro-batch.
    teacher_out = []
    for idx in micro:
        ex = [examples[i] for i in idx]
        ids = [comp_ids[i] for i in idx]
        mask = pack([[0]] * len(ids), ids, run.pad_id).mask  # [B, C]
        if cfg.mask_truncated:  # a cut-off completion has no ending to learn from
            for row, i in enumerate(idx):
                if completions[i].truncated:
                    mask[row] = 0.0
        teacher_out.append(teacher_pass(run, ex, ids, mask))
    # The denominator counts the whole optimiser step, over every process: its loss tokens, or its
    # sequences under loss_reduction = "sequence".
    masks = [t["mask"] for t in teacher_out]
    num_tokens = reduction.step_denominator(masks, "token")
    count = num_tokens if cfg.loss_reduction == "token" else reduction.step_denominator(masks, cfg.loss_reduction)
    totals = _StepTotals(count)
    # A teacher that keeps its own (sharded) copy needs its lm-head gathered for the student's micro-batches.
    separate_teacher = teacher_model(run) if teacher_model(run) is not run.model else None
    with sharding.gathered(separate_teacher):
        step_div, step_ent = _step_student_scores(run, [[examples[i] for i in idx] for idx in micro],
                                                  [[comp_ids[i] for i in idx] for idx in micro], teacher_out)
        for m, idx in enumerate(micro):
            batch = StepBatch(
                [examples[i] for i in idx], [comp_ids[i] for i in idx], run.step + 1, num_tokens, m,
                step_teacher_logp=[o["logp"] for o in teacher_out], step_masks=[o["mask"] for o in teacher_out],
                step_divergence=step_div, step_entropy=step_ent,
            )
            _micro_step(run, batch, teacher_out[m], totals)
    stats = {**totals.sums, "loss_tokens": num_tokens}
    stats.update({f"loss/{k}": v for k, v in totals.extras.items()})
    return stats


@dataclass
class _StepTotals:
    """Per-token sums of one optimiser step, each already divided by the step's denominator."""

    count: float  # the step's loss tokens, or its sequences with a loss token (see unisd.reduction)
    sums: dict[str, float] = field(default_factory=lambda: {"loss": 0.0, "divergence": 0.0, "weight": 0.0})
    extras: dict[str, float] = field(default_factory=dict)  # components' extra loss terms, by name

    @property
    def denominator(self) -> float:
        return max(self.count, 1.0)

    def add(self, name: str, value: torch.Tensor, extra: bool = False) -> None:
        into = self.extras if extra else self.sums
        into[name] = into.get(name, 0.0) + float(value.detach()) / self.denominator


def _student_outputs(run: Run, packed: Any, teacher_hidden: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The student's hidden states and per-token outputs against the main teacher (one root forward
    under sharding, so the embedding and lm-head are gathered for it)."""
    cfg = run.config
    student_hidden = completion_hidden(run.model, packed)  # [B, C, H], with grad
    # Chunked over tokens: never a [tokens, vocab] tensor for student or teacher (losses.token_outputs
    # is the plain reference implementation the tests compare against).
    outputs = chunked_token_outputs(
        student_hidden, lm_head_weight(run.model), teacher_hidden, run.teacher.head_weight(),
        packed.targets.to(mask.device), mask, alpha=cfg.alpha, temperature=cfg.divergence_temperature,
        chunk_size=cfg.divergence_chunk_size, compile=cfg.compile_divergence, gjsd_scale=cfg.gjsd_scale,
    )
    return student_hidden, outputs.divergence, outputs.student_logp, outputs.entropy


@torch.no_grad()
def _step_student_scores(run: Run, examples: list[list[Example]], completions: list[list[list[int]]],
                         teacher_out: list[dict[str, Any]]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The student's divergence and entropy ``[B, C]`` of every micro-batch, before any backward pass,
    for components whose thresholds must cover the whole step (``needs_step_scores``: a clip quantile,
    an entropy mask). It costs one more student forward per micro-batch, so it runs only when asked."""
    if not any(attribute(c, "needs_step_scores") for c in run.components):
        return [], []
    divergences, entropies = [], []
    for ex, ids, t in zip(examples, completions, teacher_out, strict=True):
        packed = pack([run.student_ids(e) for e in ex], ids, run.pad_id)
        mask = t["mask"].to(t["hidden"]["main"].device)
        _, div, _, ent = sharding.forward_call(run.model, _student_outputs, run, packed, t["hidden"]["main"], mask)
        divergences.append(div.detach())
        entropies.append(ent.detach())
    return divergences, entropies


def _micro_step(run: Run, batch: StepBatch, t: dict[str, Any], totals: _StepTotals) -> None:
    """Forward and backward of one micro-batch (``t``: its teacher pass); adds to the step's totals."""
    packed = pack([run.student_ids(e) for e in batch.examples], batch.completions, run.pad_id)
    mask = t["mask"].to(t["hidden"]["main"].device)  # [B, C]
    student_hidden, divergence, student_logp, entropy = sharding.forward_call(
        run.model, _student_outputs, run, packed, t["hidden"]["main"], mask
    )
    needs_hidden = any(attribute(c, "needs_hidden") for c in run.components)
    scores = Scores(
        mask=mask, targets=packed.targets, divergence=divergence, student_logp=student_logp,
        entropy=entropy, teacher_logp={k: v.to(mask.device) for k, v in t["logp"].items()},
        student_hidden=student_hidden if needs_hidden else None,
        teacher_hidden=t["hidden"] if needs_hidden else {},
    )
    div = scores.divergence  # [B, C]
    for comp in run.components:  # each transform sees the previous one's output
        if implements(comp, "transform_divergence"):
            div = comp.transform_divergence(div, batch)
    weights = torch.ones_like(div)
    for w in call_each(run.components, "token_weights", scores, batch):
        weights = weights * w.to(div.device)
    distill_weight = math.prod(float(attribute(c, "distill_weight")) for c in run.components)
    factors = reduction.token_factors(mask, run.config.loss_reduction)  # the mask, or mask / sequence length
    loss_sum = distill_weight * (div * weights * factors).sum()
    for extras in call_each(run.components, "extra_losses", scores, batch):
        for name, per_token in extras.items():
            term = (per_token * factors).sum()
            loss_sum = loss_sum + term
            totals.add(name, term, extra=True)
    (loss_sum / totals.denominator).backward()
    totals.add("loss", loss_sum)
    totals.add("divergence", (scores.divergence * factors).sum())
    totals.add("weight", (weights * factors).sum())


# ----------------------------------------------------------------------------------------------
# The run


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def cosine_with_warmup(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


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
    if env.active and getattr(backend_cls, "one_process_only", False):
        raise UsageError(f"--backend {config.backend} runs in one process only; use --backend hf for "
                         f"{env.world_size} processes, or --backend vllm-server with a separate vLLM server")
    plan = sharding.choose_plan(config.shard, config.deepspeed, env.world_size)
    if plan is not None:
        sharding.require_support()
    if plan is not None and config.backend != "hf":
        raise UsageError(f"--backend {config.backend} cannot generate from a sharded model yet; use --backend hf "
                         f"with sharding ({plan.source}), or plain data parallelism (--shard none)")

    seed_everything(config.seed)
    if torch.cuda.is_available():
        # float32 weights (--full keeps them for the optimizer) would otherwise multiply at a fraction of
        # the tensor cores' rate; TF32 keeps float32's range with a 10-bit mantissa in the products.
        torch.set_float32_matmul_precision("high" if config.tf32 else "highest")
    source = resolve_model(config.model, progress=reporter.info)
    with loading(source, "tokenizer"):
        tokenizer = load_tokenizer(source)
    use_chat_template(tokenizer, config)
    # Under sharding only the main process reads the weights, on the CPU: the others build the model on
    # the meta device and receive their shards after sharding (sharding.fill_from_main), and each unit
    # moves to its device as it is sharded, so no GPU ever holds the whole model.
    with loading(source, "model"):
        model = load_model(source, training_dtype(config.dtype, not config.lora), config.attn_implementation,
                           to_gpu=plan is None, on_meta=plan is not None and not env.is_main)
    if not config.lora and config.dtype in ("bfloat16", "float16"):
        reporter.info(f"[yellow]--full with {config.dtype} weights: AdamW updates smaller than the weights' "
                      "precision (most of them, at small learning rates) are rounded away. --dtype float32 (what "
                      "'auto' loads under --full) keeps them: on GPUs its matmuls run as TF32, and a sharded run's "
                      "bf16 mixed precision computes in bf16.[/]")
    if config.dtype == "float16":
        reporter.info("[yellow]--dtype float16: unisd runs no loss scaler, so float16 activations and gradients can "
                      "overflow or underflow; prefer bfloat16 (GPUs since Ampere) or float32.[/]")
    if config.gradient_checkpointing or (plan is not None and plan.activation_checkpointing):
        # the method's memory setting: recompute activations in backward
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if config.lora:
        model = apply_lora(model, config.lora_r, config.lora_alpha, config.lora_dropout, config.lora_target_modules)
    model.train()
    if hasattr(model, "config"):
        model.config.use_cache = False
    run = Run(config, model, tokenizer, task, examples, components, output_dir, reporter, plugins=pm, source=source)
    run.teacher = default_teacher(model, config.lora)
    if plan is not None:  # after the teacher's copy is taken, before components capture parameters
        reporter.info(f"Sharding: {plan.describe()}")
        if plan.ignored:
            reporter.info(f"[yellow]Not applied from {plan.source}: {'; '.join(plan.ignored)}.[/]")
        models = [model] + [m for m in [teacher_model(run)] if m is not None and m is not model]
        for sharded in models:  # the state is read before sharding (whole tensors), filled in after
            state = sharded.state_dict() if env.is_main else None
            sharding.shard_model(sharded, plan)
            sharding.fill_from_main(sharded, state)
            del state
    owners = [c for c in components if implements(c, "teacher")]
    call_each(components, "setup", run)
    if owners:
        run.teacher = owners[0].teacher(run)
    over = [e.id for e in examples if len(run.student_ids(e)) > config.max_prompt_tokens]
    if over:
        if len(over) == len(examples):
            raise DataError(
                f"every student prompt is longer than max_prompt_tokens={config.max_prompt_tokens}; raise it"
            )
        reporter.info(f"[yellow]Skipping {len(over)} example(s) whose student prompt exceeds "
                      f"{config.max_prompt_tokens} tokens (e.g. {over[0]}).[/]")
        keep = set(over)
        run.examples = [e for e in examples if e.id not in keep]
    return run


def privileged_gap(run: Run, task: Task, limit: int | None) -> dict[str, float]:
    """Student accuracy, teacher-with-reference accuracy, and their difference, on the eval split."""
    examples = with_system_prompt(task.load(task.eval_split, limit=limit), run.config.system_prompt)
    max_new = run.config.completion_budget(task)
    # Every process evaluates its share of the items (a sharded model needs all of them to generate).
    student = evaluate(run.model, run.tokenizer, task, examples, max_new, split_over_processes=True).metrics
    with run.teacher.as_model() as teacher_model:
        teacher = evaluate(teacher_model, run.tokenizer, task, examples, max_new, with_reference=True,
                           split_over_processes=True).metrics
    gap = {
        "student_accuracy": student["accuracy"],
        "teacher_accuracy": teacher["accuracy"],
        "privileged_gap": teacher["accuracy"] - student["accuracy"],
        "leakage": student["leakage"],  # the student's completions holding teacher-only text
        "teacher_leakage": teacher["leakage"],
        "overrun": student["overrun"],  # the student's completions that go on after a finished answer
    }
    if "strict_accuracy" in student:  # tasks that also score the whole completion (the demo)
        gap.update(student_strict_accuracy=student["strict_accuracy"], teacher_strict_accuracy=teacher["strict_accuracy"])
    gap["n"] = float(len(examples))
    return gap


def train(
    config: RunConfig,
    pm: UnisdPluginManager,
    reporter: Reporter | None = None,
    resume: str | Path | None = None,
) -> Path:
    """Run (or resume) training; returns the run directory.

    Under a multi-process launcher every process runs this function on its share of each global batch;
    only the main process writes metrics, checkpoints and the final weights.
    """
    env = distributed.init_from_env()
    reporter = (reporter or Reporter()) if env.is_main else Reporter()
    config.validate()  # values known now fail before the run directory is touched
    check_trackers(config.report_to, pm.registries.trackers)  # e.g. a missing wandb package, before any work
    chosen = None
    if resume is not None:
        out, chosen = resume_target(resume)
    else:
        out = Path(config.output or f"runs/{config.task or Path(config.data or 'data').stem}-{time.strftime('%Y%m%d-%H%M%S')}")
    config.output = str(out)
    created = not out.exists()
    try:
        claim = _on_main(lambda: _claim_run_directory(out, resume is not None, chosen, reporter))
    except BaseException:
        if env.is_main:
            rundir.remove_if_unused(out, created)
        raise
    lock, resume_ckpt = claim if claim is not None else (None, None)
    # every process resumes from the checkpoint the main process chose
    resume_path = distributed.gather_objects(str(resume_ckpt) if resume_ckpt else None)[0]
    try:
        return _train(config, pm, reporter, out, Path(resume_path) if resume_path else None, resume is not None)
    finally:
        if lock is not None:
            lock.release()
            rundir.remove_if_unused(out, created)  # a run that failed before writing anything leaves nothing


def _on_main(work: Callable[[], T]) -> T | None:
    """``work()`` on the main process; under a multi-process launch its error is raised on every process."""
    if not distributed.current().active:
        return work()
    return distributed.on_main_only(work, UsageError)


def _claim_run_directory(
    out: Path, resuming: bool, chosen: Path | None, reporter: Reporter
) -> tuple[rundir.RunLock, Path | None]:
    """Lock the run directory before anything is written, clear what interrupted saves left, and check it:
    a new run needs it empty (or holding a run stopped before its first checkpoint); a resumed one gets
    its newest intact checkpoint (None: none was saved, so it starts from step 0)."""
    def warn(message: str) -> None:
        reporter.info(f"[yellow]{message}[/]")

    lock = rundir.acquire_lock(out, warn)
    try:
        rundir.remove_leftovers(out, reporter.info)
        if not resuming:
            rundir.prepare_new_run(out, reporter.info)
            return lock, None
        return lock, choose_checkpoint(out, chosen, warn)
    except BaseException:
        lock.release()
        raise


@dataclass
class Session:
    """What one training process holds from set-up to the final save (see ``_train``)."""

    run: Run
    pm: UnisdPluginManager
    reporter: Reporter
    out: Path
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    backend: Any
    stream: DataStream
    metrics_log: MetricsLog
    trackers: Trackers
    trainable: list[torch.nn.Parameter]
    start: int  # the last step already done (0 for a new run)
    activity: ActivityWatch | None = None
    skipped_total: int = 0  # optimiser steps skipped for a non-finite loss or gradient
    bad_in_a_row: int = 0
    began: float = 0.0  # perf_counter when the first step of this process started
    elapsed_before: float = 0.0  # training seconds of the run before a resume

    @property
    def config(self) -> RunConfig:
        return self.run.config

    @property
    def env(self) -> distributed.DistEnv:
        return distributed.current()


@dataclass
class StepUpdate:
    """What the optimiser step did: whether it applied the update, the gradient norm, the learning rate."""

    finite: bool
    grad_norm: torch.Tensor
    lr: float


def _train(
    config: RunConfig, pm: UnisdPluginManager, reporter: Reporter, out: Path, resume_ckpt: Path | None, resuming: bool,
) -> Path:
    """The run itself, in a run directory this process has claimed (see ``train``): set-up, the held-out
    evaluation before, then per step take → generate → distil → optimiser step → record → maybe
    checkpoint, then the final weights and the evaluation after."""
    s = _start_session(config, pm, reporter, out, resume_ckpt, resuming)
    cfg = s.config
    gap_task = s.run.task if cfg.eval_before_after and s.run.task is not None else None
    if gap_task is not None and s.start == 0:
        _held_out(s, gap_task, "before")
    distributed.barrier()
    sampling = SamplingParams(cfg.temperature, cfg.top_p, s.run.max_new_tokens)
    s.began, s.elapsed_before = time.perf_counter(), _previous_elapsed(s.metrics_log) if s.env.is_main else 0.0
    _watch_activity(s)
    reporter.start(cfg.steps, s.start)
    stop = StopRequest()
    try:
        for step in range(s.start + 1, cfg.steps + 1):
            t0 = time.perf_counter()
            examples = _take(s)
            completions = s.backend.generate([s.run.student_ids(e) for e in examples], sampling)
            t_gen = time.perf_counter() - t0
            stats = distill_step(s.run, examples, completions)
            update = _optimiser_step(s, stats)
            _after_step(s, step, update)
            record = _step_record(s, step, examples, completions, stats, update, t0, t_gen)
            _publish(s, step, record)
            # Every process must stop at the same step, whichever of them received the signal.
            stopping = distributed.sum_scalar(1.0 if stop.signal else 0.0) > 0
            diverged = s.bad_in_a_row >= cfg.max_nonfinite_steps
            if step == cfg.steps or (cfg.save_every and step % cfg.save_every == 0) or stopping or diverged:
                _save_checkpoint(s, step)
            _raise_if_stopped(s, step, diverged, (stop.signal or "a signal to another process") if stopping else None)
    except BaseException:
        s.trackers.close()  # flush what the dashboards have before the error ends the run
        raise
    finally:
        stop.restore()
        reporter.stop()
        if hasattr(s.backend, "close"):
            s.backend.close()  # e.g. vLLM's engine and its memory, before the final save and evaluation
    _finish(s, gap_task)
    return out


def _start_session(
    config: RunConfig, pm: UnisdPluginManager, reporter: Reporter, out: Path, resume_ckpt: Path | None, resuming: bool,
) -> Session:
    """Build the run, its optimiser, schedule, generation backend and data stream; restore a checkpoint;
    write config.toml; open the trackers; print the start-up summary."""
    run = build_run(config, pm, reporter, out)
    env, model, cfg = distributed.current(), run.model, run.config
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = cosine_with_warmup(optimizer, math.ceil(cfg.warmup_ratio * cfg.steps), cfg.steps)
    backend = pm.registries.backends.get(cfg.backend)(model, run.tokenizer, source=run.source, config=cfg)
    metrics_log = MetricsLog(out / "metrics.jsonl")
    stream = DataStream(run.examples, cfg.seed)
    if env.active:  # same initial weights everywhere (seeded above), different samples per process
        torch.manual_seed(cfg.seed + 1000 * env.rank)
    start = 0
    if resume_ckpt is not None:
        state = load_checkpoint(resume_ckpt, model=model, lora=cfg.lora, optimizer=optimizer,
                                scheduler=scheduler, components=run.components, rank=env.rank)
        start, stream.cursor = state["step"], state["cursor"]
        if env.is_main:
            metrics_log.truncate_after(start)
        reporter.info(f"Resuming {out} from {resume_ckpt.name} (step {start} of {cfg.steps})")
    elif resuming:
        reporter.info(f"Resuming {out} from step 0: it stopped before its first checkpoint")
        if env.is_main:
            metrics_log.truncate_after(0)
    if env.is_main:
        atomic.write_text(out / "config.toml", dump_config(cfg))
    run.step = start
    classes = check_trackers(cfg.report_to, pm.registries.trackers) if env.is_main else []
    trackers = Trackers(classes, out, asdict(cfg), lambda m: reporter.info(f"[yellow]{m}[/]"))
    if env.is_main:
        reporter.info(startup_summary(cfg.model, sum(p.numel() for p in trainable),
                                      sum(p.numel() for p in model.parameters()), len(run.examples), cfg,
                                      run.components, out))
    return Session(run, pm, reporter, out, optimizer, scheduler, backend, stream, metrics_log, trackers, trainable,
                   start)


def _held_out(s: Session, task: Task, when: str) -> None:
    """The privileged gap on the task's held-out split, ``before`` or ``after`` training: eval/WHEN.json."""
    gap = privileged_gap(s.run, task, s.config.eval_limit)
    if s.env.is_main:
        _write_json(s.out / "eval" / f"{when}.json", gap)
        s.reporter.info(_gap_line(f"{when} training", gap))
        s.trackers.log_summary({f"{when}/{k}": v for k, v in gap.items()})


def _watch_activity(s: Session) -> None:
    """Warn about components that cannot act in this run, and watch the others' first steps."""
    inert = inert_warnings(s.run.components, s.run)
    if s.env.is_main:
        for message in inert.values():
            s.reporter.info(f"[yellow]Warning: {message}[/]")
    s.activity = ActivityWatch(s.run.components, s.config.steps, first_step=s.start + 1, skip=tuple(inert))


def _take(s: Session) -> list[Example]:
    """This process's share of the step's global batch (the same global batch whatever the process count)."""
    cfg, env = s.config, s.env
    return distributed.shard(s.stream.take(cfg.batch_size * cfg.grad_accum * env.world_size), env)


def _optimiser_step(s: Session, stats: dict[str, float]) -> StepUpdate:
    """Synchronise and clip the gradients, then AdamW and the schedule; a non-finite step is skipped."""
    if not sharding.is_sharded(s.run.model):  # sharded units reduce their gradients themselves, during backward
        distributed.sync_gradients(s.trainable)
    grad_norm = sharding.whole(torch.nn.utils.clip_grad_norm_(s.trainable, s.config.max_grad_norm))
    lr = s.scheduler.get_last_lr()[0]
    # A NaN/inf loss or gradient would poison the weights and the optimizer state: skip the update
    # (same decision on every process: the loss is summed and the gradients are synchronised).
    finite = math.isfinite(distributed.sum_scalar(stats["loss"])) and bool(torch.isfinite(grad_norm))
    if finite:
        s.optimizer.step()
        s.bad_in_a_row = 0
    else:
        s.skipped_total += 1
        s.bad_in_a_row += 1
    s.scheduler.step()
    s.optimizer.zero_grad(set_to_none=True)
    return StepUpdate(finite, grad_norm, lr)


def _after_step(s: Session, step: int, update: StepUpdate) -> None:
    s.run.step = step
    if update.finite and hasattr(s.backend, "sync_weights"):
        s.backend.sync_weights(step)  # e.g. vLLM generates the next rollouts with the new weights
    call_each(s.run.components, "on_step_end", s.run)


def _step_record(s: Session, step: int, examples: list[Example], completions: list[Completion],
                 stats: dict[str, float], update: StepUpdate, t0: float, t_gen: float) -> dict[str, Any]:
    """The step's line of metrics.jsonl: sums over every process, each component's metrics, and the
    evaluation during training when one is due."""
    run, cfg = s.run, s.config
    seconds = time.perf_counter() - t0
    lengths = [len(c.ids) for c in completions]
    tokens = distributed.sum_scalar(float(sum(len(run.student_ids(e)) for e in examples) + sum(lengths)))
    count = distributed.sum_scalar(float(len(completions)))
    record = {
        "step": step,
        "loss": distributed.sum_scalar(stats["loss"]),
        "divergence": distributed.sum_scalar(stats["divergence"]),
        "completion_length": distributed.sum_scalar(float(sum(lengths))) / count,
        "truncated_fraction": distributed.sum_scalar(float(sum(c.truncated for c in completions))) / count,
        # share of the sampled completions that copy teacher-only text (template, reference)
        "leakage": distributed.sum_scalar(float(count_leaks(run.tokenizer, run.task, examples,
                                                            [c.ids for c in completions]))) / count,
        "loss_tokens": stats["loss_tokens"],
        "token_weight_mean": distributed.sum_scalar(stats["weight"]),
        "grad_norm": float(update.grad_norm),
        "learning_rate": update.lr,
        "tokens_per_s": tokens / seconds,
        "generation_s": t_gen,
        "step_s": seconds,
        "elapsed_s": s.elapsed_before + time.perf_counter() - s.began,
        "reference_truncated": run.reference_truncations,
        "contexts_truncated": run.context_truncations,
        "nonfinite_skipped": s.skipped_total,
    }
    record.update({k: distributed.sum_scalar(v) for k, v in stats.items() if k.startswith("loss/")})
    for comp in run.components:
        if implements(comp, "metrics"):
            record.update({f"{comp.name}/{k}": float(v) for k, v in comp.metrics().items()})
    if cfg.eval_task and cfg.eval_every and step % cfg.eval_every == 0:
        record.update(_periodic_eval(run, s.pm, cfg.eval_task, cfg.eval_limit))
    return record


def _publish(s: Session, step: int, record: dict[str, Any]) -> None:
    """The record to metrics.jsonl, the trackers and the person watching (with any activity warning)."""
    main = s.env.is_main
    if main:
        s.metrics_log.write(record)
        s.trackers.log_metrics(record, step)
    s.reporter.step(record)
    if main and s.activity is not None:
        for message in s.activity.observe(step, record):
            s.reporter.info(f"[yellow]Warning: {message}[/]")


def _save_checkpoint(s: Session, step: int) -> None:
    """checkpoints/step-N: gathered by every process (collectives), written by the main one."""
    run, cfg = s.run, s.config
    rng_states = distributed.gather_objects(rng_state())
    model_state = sharding.full_model_state(run.model, cfg.lora)
    optimizer_state = sharding.full_optimizer_state(run.model, s.optimizer)
    component_states = gather_component_states(run.components)
    if s.env.is_main:
        save_checkpoint(s.out / "checkpoints" / f"step-{step}", model=run.model, tokenizer=run.tokenizer,
                        lora=cfg.lora, optimizer=s.optimizer, scheduler=s.scheduler, step=step,
                        cursor=s.stream.cursor, components=run.components, rng_states=rng_states,
                        model_state=model_state, optimizer_state=optimizer_state,
                        component_states=component_states)
    distributed.barrier()


def _raise_if_stopped(s: Session, step: int, diverged: bool, signal: str | None) -> None:
    """After the step's checkpoint: stop the run when it diverged or a signal asked it to."""
    if diverged:
        raise TrainingDiverged(
            f"{s.bad_in_a_row} steps in a row had a NaN/inf loss or gradient (last: step {step}); stopped "
            f"with a checkpoint. Lower --lr, check the data, or resume with: unisd train --resume {s.out}"
        )
    if signal is not None:
        raise TrainingInterrupted(
            f"stopped by {signal} after step {step}; checkpoint saved. Continue with: unisd train --resume {s.out}"
        )


def _finish(s: Session, gap_task: Task | None) -> None:
    """final/ (the trained weights), then the held-out evaluation after training."""
    model_state = sharding.full_model_state(s.run.model, s.config.lora)
    if s.env.is_main:
        with atomic.directory(s.out / "final") as tmp:
            save_weights(s.run.model, s.run.tokenizer, tmp, s.config.lora, state=model_state)
    if gap_task is not None:
        _held_out(s, gap_task, "after")
    s.trackers.close()
    distributed.barrier()


def _periodic_eval(run: Run, pm: UnisdPluginManager, task_name: str, limit: int | None) -> dict[str, float]:
    task = pm.registries.tasks.get(task_name)()
    gap = privileged_gap(run, task, limit)
    return {f"eval/{task_name}/{k}": v for k, v in gap.items()}


def _previous_elapsed(log: MetricsLog) -> float:
    records = log.read()
    return float(records[-1].get("elapsed_s", 0.0)) if records else 0.0


def _gap_line(when: str, gap: dict[str, float]) -> str:
    strict = f" (strict {gap['student_strict_accuracy']:.3f})" if "student_strict_accuracy" in gap else ""
    return (
        f"[bold]{when}[/]: student accuracy {gap['student_accuracy']:.3f}{strict}, leakage {gap['leakage']:.3f}, "
        f"overrun {gap.get('overrun', 0.0):.3f} | "
        f"teacher-with-reference {gap['teacher_accuracy']:.3f} | privileged gap {gap['privileged_gap']:+.3f} "
        f"(n={int(gap['n'])})"
    )


def _write_json(path: Path, data: dict[str, Any]) -> None:
    import json

    atomic.write_text(path, json.dumps(data, indent=2) + "\n")
