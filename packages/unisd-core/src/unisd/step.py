"""One distillation step over fixed completions: the teacher pass, then per micro-batch the student's scores,
the components and the backward pass (:func:`distill_step`).

The teacher (no grad) scores each completion under the teacher prompt and under any extra contexts the
selected components ask for; per micro-batch the student scores the same completion under its own prompt
(with grad) and the per-token divergence goes through the components (clip → weights → extra terms). The
summed loss is divided by the step's denominator (``divergence/reduction.py``), so the update does not
depend on how the step is split into micro-batches. The caller (``loop.py``) steps the optimiser.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from .components import attribute, call_each, implements
from .data.tasks import Example
from .divergence import reduction
from .divergence.chunked import chunked_target_logprobs, chunked_token_outputs
from .errors import UsageError
from .model.rollout import Completion
from .model.scoring import Scores, completion_hidden, lm_head_weight, pack
from .parallel import sharding
from .run import Run, teacher_model


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
    # G completions per prompt: the teacher may run each prompt once (asked only then: a teacher view of
    # a plugin need not know the keyword).
    share = {"share_prompts": True} if cfg.num_generations > 1 else {}
    hidden_all = torch.cat([
        run.teacher.hidden(_rows(packed_all, start, start + run.teacher_rows), **share)
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
    from .model.scoring import Packed

    width = int(packed.attention_mask[start:stop].sum(-1).max())
    return Packed(
        packed.input_ids[start:stop, :width], packed.attention_mask[start:stop, :width],
        packed.positions[start:stop], packed.targets[start:stop], packed.mask[start:stop],
    )


def distill_step(run: Run, examples: list[Example], completions: list[Completion]) -> dict[str, float]:
    """Forward/backward of one optimiser step's loss over fixed completions. The gradients accumulate in
    the parameters and, with several processes, end as the sum over all of them (``Run.gradient_sync``);
    the caller steps the optimiser. Returns the step's loss statistics."""
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
        sync = run.gradient_sync()
        for m, idx in enumerate(micro):
            batch = StepBatch(
                [examples[i] for i in idx], [comp_ids[i] for i in idx], run.step + 1, num_tokens, m,
                step_teacher_logp=[o["logp"] for o in teacher_out], step_masks=[o["mask"] for o in teacher_out],
                step_divergence=step_div, step_entropy=step_ent,
            )
            with sync.micro_batch(last=m == len(micro) - 1):  # only the last one communicates
                _micro_step(run, batch, teacher_out[m], totals)
        sync.finish()
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
    # G completions per prompt: the prompt runs once for all of them (a repeated prompt is only shared
    # within a micro-batch).
    student_hidden = completion_hidden(run.model, packed, share_prompts=cfg.num_generations > 1)  # [B, C, H], with grad
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
