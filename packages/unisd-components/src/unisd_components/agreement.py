"""Multi-context agreement: down-weight what the teacher is unsure about (unisd-method.md §2.1).

The teacher scores the student's completion under K auxiliary contexts (few-shot demonstrations of
*other* examples, or an induced instruction, then the student text) at temperature 1.0. Where the K
selected-token log-probs disagree, the distillation loss is trusted less:

* token level: ``d_t = Var_k S[k,t]`` (unbiased) or ``max_k − min_k``; ``scale`` = the ``quantile``
  of d over the loss tokens of the *whole optimiser step* (so the weights do not depend on the
  micro-batch split); ``w_t = max(1 / (1 + γ·min(d_t/scale, cap)), floor)``. With K = 1 there is no
  disagreement to measure: d = 0 and w = 1 (the research code gets NaN).
* sequence level: ``s_k`` = mean log-prob of the sequence under context k, ``D = Var_k s_k``
  (population) or range, ``w = max(exp(−γ·D), floor)`` for every token of the sequence. The loop
  divides by the token count, not by Σw, so w really scales the loss (in the research code it
  cancels, §7.2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from unisd.components import option, run_seed
from unisd.divergence.stepstats import step_quantile
from unisd.errors import UsageError
from unisd.hookspecs import hookimpl

from .contexts.fewshot import family_of, fewshot_context, induction_context

SEQ_FLOOR = 1e-6  # the method's sequence-level floor, used when `floor` is not set
TOKEN_FLOOR = 0.01  # the method's token-level floor, used when `floor` is not set
SCALE_MIN = 1e-6


# A token counts as down-weighted when its weight is below 1 - DOWNWEIGHTED.
DOWNWEIGHTED = 0.01


def context_name(k: int) -> str:
    return f"agree/{k}"


def disagreement(stacked: torch.Tensor, stat: str, unbiased: bool) -> torch.Tensor:
    """Spread over the first dimension (contexts) of ``[K, ...]``: variance or range; 0 when K = 1."""
    if stacked.shape[0] == 1:
        return torch.zeros_like(stacked[0])
    if stat == "range":
        return stacked.amax(0) - stacked.amin(0)
    return stacked.var(0, unbiased=unbiased)


def token_level_weights(d: torch.Tensor, scale: float, gamma: float, cap: float, floor: float) -> torch.Tensor:
    """``max(1 / (1 + γ·min(d/scale, cap)), floor)``."""
    normalised = torch.clamp(d / max(scale, SCALE_MIN), max=cap)
    return torch.clamp(1.0 / (1.0 + gamma * normalised), min=floor)


def sequence_level_weights(stacked: torch.Tensor, mask: torch.Tensor, stat: str, gamma: float,
                           floor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence weights ``[B]`` and disagreements ``[B]`` from log-probs ``[K, B, C]``."""
    m = mask.to(stacked.dtype)
    means = (stacked * m).sum(-1) / m.sum(-1).clamp(min=1.0)  # [K, B]
    spread = disagreement(means, stat, unbiased=False)  # [B]
    return torch.clamp(torch.exp(-gamma * spread), min=floor), spread


class Agreement:
    """Weight the loss by how much the teacher agrees with itself across K auxiliary contexts."""

    name: ClassVar[str] = "agreement"
    context_temperature: ClassVar[float] = 1.0
    inactive_hint: ClassVar[str] = "every token kept its full weight; raise -o agreement.gamma"

    @dataclass
    class Options:
        gamma: float = option(1.0, "Strength γ: larger γ down-weights disagreement more (0 disables).")
        num_contexts: int = option(3, "Number K of auxiliary teacher contexts.")
        stat: str = option("var", "Disagreement statistic over contexts.", choices=("var", "range"))
        level: str = option("token", "Weight each token or each whole sequence.", choices=("token", "seq"))
        quantile: float = option(0.95, "Token level: disagreement is divided by this quantile over the step's loss tokens.")
        cap: float = option(10.0, "Token level: cap of the normalised disagreement.")
        floor: float | None = option(None, "Minimum weight (default 0.01 at token level, 1e-6 at sequence level).")
        builder: str = option("random", "How contexts are built.", choices=("random", "retrieval", "induction"))
        demo_k: int = option(1, "Demonstrations per few-shot context (random, retrieval).")
        seed: int | None = option(None, "Seed of random donors and induced-instruction draws (default: the run's --seed, so sweeps over seeds vary the contexts too).")
        induction_num_demos: int = option(5, "Induction: solved demonstrations per meta-prompt.")
        induction_max_new_tokens: int = option(256, "Induction: token budget of each induced instruction.")

        def __post_init__(self) -> None:
            if self.num_contexts < 1:
                raise ValueError("agreement.num_contexts must be ≥ 1")
            if self.gamma < 0:
                raise ValueError("agreement.gamma must be ≥ 0")
            if not 0.0 < self.quantile <= 1.0:
                raise ValueError("agreement.quantile must be in (0, 1]")
            if self.cap <= 0:
                raise ValueError("agreement.cap must be > 0")
            if self.floor is not None and not 0.0 <= self.floor <= 1.0:
                raise ValueError("agreement.floor must be in [0, 1]")
            if self.demo_k < 1 or self.induction_num_demos < 1:
                raise ValueError("agreement.demo_k and agreement.induction_num_demos must be ≥ 1")

    def __init__(self, options: Options | None = None, embedder: Any = None, generate: Any = None):
        self.options = options or self.Options()
        self.embedder = embedder  # texts -> [N, D]; None: all-MiniLM-L6-v2
        self.generate = generate  # meta-prompts -> instructions; None: the run's model
        self.contexts: dict[str, dict[str, str]] = {}
        self._stats: dict[str, float] = {}
        self._stats_step = -1

    @property
    def floor(self) -> float:
        if self.options.floor is not None:
            return self.options.floor
        return TOKEN_FLOOR if self.options.level == "token" else SEQ_FLOOR

    # -- contexts -------------------------------------------------------------------------------

    def setup(self, run: Any) -> None:
        """Build every example's K context texts once, from the run's examples (the donor pool)."""
        self.contexts = self.build_contexts(run.examples, run)
        run.reporter.info(
            f"agreement: {self.options.num_contexts} {self.options.builder} context(s) per example "
            f"for {len(self.contexts)} examples ({self.options.level} level, γ={self.options.gamma})"
        )

    def build_contexts(self, examples: list, run: Any = None) -> dict[str, dict[str, str]]:
        opts = self.options
        task = getattr(run, "task", None)
        k = opts.num_contexts
        seed = run_seed(opts.seed, run)
        if opts.builder == "induction":
            from .contexts.induction import assign_instructions, induced_instructions

            records = induced_instructions(
                examples, self.generate or _model_generator(run, opts.induction_max_new_tokens),
                num_demos=opts.induction_num_demos, seed=seed,
                model_tag=str(getattr(getattr(run, "config", None), "model", "model")), task=task,
            )
            chosen = assign_instructions(examples, records, k, seed)
            return {
                ex.id: {context_name(i): induction_context(ex, text) for i, text in enumerate(chosen[ex.id])}
                for ex in examples
            }
        if opts.builder == "retrieval":
            from .contexts.retrieval import retrieval_donors

            donors = retrieval_donors(examples, k, opts.demo_k, self.embedder)
        else:
            from .contexts.random import random_donors

            donors = random_donors(examples, k, opts.demo_k, seed)
        out = {}
        for ex in examples:
            family = family_of(ex, task)
            out[ex.id] = {
                context_name(i): fewshot_context(ex, [examples[j] for j in group], family)
                for i, group in enumerate(donors[ex.id])
            }
        return out

    def teacher_contexts(self, example: Any) -> dict[str, str]:
        try:
            return self.contexts[example.id]
        except KeyError:
            raise UsageError(
                f"agreement: no contexts for example {example.id!r}; contexts are built in setup() from run.examples"
            ) from None

    # -- weights --------------------------------------------------------------------------------

    def _stack(self, logp: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.stack([logp[context_name(k)].float() for k in range(self.options.num_contexts)])  # [K, B, C]

    def step_scale(self, batch: Any) -> float:
        """The quantile of token disagreement over the loss tokens of every micro-batch of the step, on
        every process: the weights then do not depend on how the global batch is split."""
        per_micro = [disagreement(self._stack(logp).cpu(), self.options.stat, unbiased=True)
                     for logp in batch.step_teacher_logp]
        scale = step_quantile(per_micro, batch.step_masks, self.options.quantile)
        return max(scale if scale is not None else 0.0, SCALE_MIN)

    def token_weights(self, scores: Any, batch: Any) -> torch.Tensor:
        opts = self.options
        stacked = self._stack(scores.teacher_logp)  # [K, B, C]
        mask = scores.mask.to(stacked.device)
        if opts.level == "token":
            d = disagreement(stacked, opts.stat, unbiased=True)  # [B, C]
            scale = self.step_scale(batch)
            w = token_level_weights(d, scale, opts.gamma, opts.cap, self.floor)
            d_loss = d[mask > 0]
        else:
            w_seq, spread = sequence_level_weights(stacked, mask, opts.stat, opts.gamma, self.floor)
            w = w_seq.unsqueeze(-1).expand_as(mask).clone()  # [B, C]
            scale = float("nan")
            d_loss = spread[mask.sum(-1) > 0]
        w = torch.where(mask > 0, w, torch.ones_like(w))
        self._record(batch.step, w[mask > 0], d_loss, (stacked.amax(0) - stacked.amin(0))[mask > 0], scale)
        return w.detach()

    # -- metrics --------------------------------------------------------------------------------

    def _record(self, step: int, w: torch.Tensor, d: torch.Tensor, spread: torch.Tensor, scale: float) -> None:
        if step != self._stats_step:
            self._stats_step = step
            self._acc = {"w": [], "d": [], "spread": [], "scale": scale}
        self._acc["w"].append(w.detach().float().cpu())
        self._acc["d"].append(d.detach().float().cpu())
        self._acc["spread"].append(spread.detach().float().cpu())
        w_all, d_all, s_all = (torch.cat(self._acc[k]) for k in ("w", "d", "spread"))
        self._stats = {}
        for key, vals in (("weight", w_all), ("disagreement", d_all)):
            if vals.numel():
                self._stats.update({f"{key}_mean": float(vals.mean()), f"{key}_min": float(vals.min()),
                                    f"{key}_max": float(vals.max())})
        if w_all.numel():
            # activity: the mean reduction of a loss token's weight (0: the step was not re-weighted)
            self._stats["activity"] = float((1.0 - w_all).mean())
            self._stats["downweighted_fraction"] = float((w_all < 1.0 - DOWNWEIGHTED).float().mean())
        if s_all.numel():
            self._stats["context_max_abs_diff"] = float(s_all.max())
        if not math.isnan(scale):
            self._stats["scale"] = scale

    def inert_reason(self, run: Any) -> str | None:
        """Refuses nothing; says when γ (and, at token level, the cap) leave no room to down-weight."""
        opts = self.options
        if opts.gamma == 0:
            return "agreement.gamma is 0, so every weight is 1"
        if opts.level == "token":
            most = 1.0 - max(1.0 / (1.0 + opts.gamma * opts.cap), self.floor)
            if most < DOWNWEIGHTED:
                return (f"at most {most:.2%} down-weighting of any token (weight ≥ 1/(1 + gamma {opts.gamma:g} × "
                        f"cap {opts.cap:g})): practically plain self-distillation; raise -o agreement.gamma")
        return None

    def metrics(self) -> dict[str, float]:
        """Weight and disagreement statistics (mean, min, max) over the last step's loss tokens, the share of
        tokens down-weighted by more than 1 %, and ``activity`` (the mean reduction of the weight)."""
        return dict(self._stats)


def _model_generator(run: Any, max_new_tokens: int) -> Any:
    from unisd.evaluation.evaluate import generate_texts

    def generate(prompts: list[str]) -> list[str]:
        run.reporter.info(f"agreement: inducing {len(prompts)} instruction(s) with the model (cached afterwards)")
        return generate_texts(run.model, run.tokenizer, prompts, max_new_tokens)

    return generate


@hookimpl
def register_components(register: Any) -> None:
    """This module is its own plugin (entry point ``agreement``): ``UNISD_DISABLE_PLUGINS=agreement`` leaves it out."""
    register(Agreement)
