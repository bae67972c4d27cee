"""Token-level contrastive learning against a negative demonstration (unisd-method.md §2.3).

The teacher also scores the completion under a *negative* teacher prompt: the same template as the
positive one with a wrong demonstration in place of the reference (§7.9: the research code changed
the layout too). Per token, with selected-token log-probs s (student, with grad), g (teacher,
positive) and b (teacher, negative):

    c_t = relu(margin + |s − g| − |s − b|)

pulls the student towards the positive teacher and away from the negative one. Negatives come from
``meta["negative_reference"]``, from the task itself (``Task.negative``, e.g. the demo's), or from the
cache of ``unisd cache negatives``. Examples without one are reported and contribute no contrastive
term; they are not dropped from training (§7.14).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from unisd import runtime
from unisd.components import option, run_seed
from unisd.data.prompts import DemonstrationText
from unisd.data.tasks import Example, teacher_text_with
from unisd.divergence.stepstats import StepSums
from unisd.errors import UsageError
from unisd.hookspecs import hookimpl

from .negatives import choose_negative, default_cache_path, read_cache

CONTEXT = "negative"


def hinge(student: torch.Tensor, good: torch.Tensor, bad: torch.Tensor, margin: float) -> torch.Tensor:
    """``relu(margin + |s − g| − |s − b|)`` elementwise; gradient flows through ``student`` only."""
    return torch.relu(margin + (student - good.detach()).abs() - (student - bad.detach()).abs())


class Contrastive:
    """Hinge loss pulling the student to the positive teacher and away from a negative-demonstration teacher."""

    name: ClassVar[str] = "contrastive"
    inactive_hint: ClassVar[str] = ("no token's hinge was active (the student already separates the positive from "
                                    "the negative teacher by the margin); raise -o contrastive.margin")

    @dataclass
    class Options:
        weight: float = option(0.1, "Weight λ of the contrastive term.")
        margin: float = option(0.5, "Hinge margin on token log-probs.")
        cache: str | None = option(None, "Negatives cache (JSONL from `unisd cache negatives`); default: its default path.")
        seed: int | None = option(None, "Seed for choosing one cached negative per example (default: the run's --seed).")

        def __post_init__(self) -> None:
            if self.weight < 0:
                raise ValueError(f"contrastive.weight must be ≥ 0, got {self.weight}")

    def __init__(self, options: Options | None = None):
        self.options = options or self.Options()
        self.task: Any = None
        self.negatives: dict[str, str] = {}  # example id -> negative reference text
        self.missing: list[str] = []
        self._sums = StepSums()

    def setup(self, run: Any) -> None:
        """Attach one negative per example (meta first, then the cache); report examples without one."""
        self.task = run.task
        cfg = run.config
        path = Path(self.options.cache) if self.options.cache else default_cache_path(cfg.model, cfg.data or cfg.task or "data")
        if self.options.cache and not path.is_file():
            raise UsageError(f"contrastive.cache {path}: no such file (build it with `unisd cache negatives`)")
        cached = read_cache(path)
        self.attach(run.examples, cached, run_seed(self.options.seed, run))
        # Built inside the run for single-process LoRA runs only (the processes of a launch would race on the
        # file; under --full the model at setup is the one being trained); otherwise the message below says how.
        build_cache = getattr(cfg, "build_cache", None)  # None: a config from before the setting (no build)
        if self.missing and not self.options.cache and build_cache and cfg.lora and not runtime.several_processes():
            self._build_missing(run, path)
            self.attach(run.examples, read_cache(path), run_seed(self.options.seed, run))
        if not self.negatives:
            raise UsageError(
                f"contrastive: none of the {len(run.examples)} examples has a negative demonstration. Build them with "
                f"`unisd cache negatives --model {cfg.model} {'--data ' + cfg.data if cfg.data else '--task ' + str(cfg.task)}` "
                "(or give meta.negative_reference in --data records, or -o contrastive.cache=PATH"
                + (", or drop --no-build-cache to build them in this run" if build_cache is False else "")
                + ")"
            )
        if self.missing:
            run.reporter.info(
                f"[yellow]contrastive: {len(self.missing)} of {len(run.examples)} example(s) have no negative "
                f"(e.g. {self.missing[0]}); they train without the contrastive term.[/]"
            )

    def _build_missing(self, run: Any, path: Path) -> None:
        """Generate negatives for the examples without one into the default cache, as `unisd cache negatives`
        would, with the run's own model (still the base model at setup: LoRA starts as a no-op). Examples
        already in the cache are not redone, so an interrupted build resumes. The RNG is forked: a run that
        built the cache trains exactly like one that found it built."""
        from unisd.model.rollout import SamplingParams

        from .cache_cmd import Progress
        from .negatives import build_negatives, negative_budget, negative_kind
        from .negatives_gen import hf_generator

        cfg = run.config
        source = f"--data {cfg.data}" if cfg.data else f"--task {cfg.task}"
        missing = set(self.missing)
        todo = [e for e in run.examples if e.id in missing]
        budget = max(negative_budget(self.task, negative_kind(e, self.task)) for e in todo)
        run.reporter.info(f"contrastive: building negatives for {len(todo)} example(s) with {cfg.model} (up to "
                          f"{budget} new tokens each) -> {path}; once, reused by later runs (--no-build-cache refuses "
                          f"instead; `unisd cache negatives --model {cfg.model} {source}` builds them apart)")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            generate = hf_generator(run.model, run.tokenizer, SamplingParams(temperature=0.7, max_new_tokens=budget))
            build_negatives(todo, generate, path, task=self.task,
                            progress=Progress(len(todo), say=run.reporter.info))

    def attach(self, examples: list[Example], cached: dict[str, list[dict]], seed: int | None = None) -> None:
        """One negative per example for the run: meta, the task's own, then the cache (see choose_negative)."""
        self.negatives, self.missing = {}, []
        seed = run_seed(self.options.seed if seed is None else seed, None)
        for ex in examples:
            negative = choose_negative(ex, cached.get(ex.id, []), self.task, seed)
            if negative is None:
                self.missing.append(ex.id)
            else:
                self.negatives[ex.id] = negative

    def teacher_contexts(self, example: Example) -> dict[str, str]:
        negative = self.negatives.get(example.id)
        if negative is None:
            # Every row of a batch needs the context; rows without a negative get the student text
            # and a zero contrastive term (see extra_losses).
            return {CONTEXT: example.prompt}
        # Budgeted like the positive prompt: an over-long negative is shortened, the problem kept whole.
        task = self.task
        return {CONTEXT: DemonstrationText(lambda ref: teacher_text_with(task, example, ref), negative)}

    def extra_losses(self, scores: Any, batch: Any) -> dict[str, torch.Tensor]:
        s = scores.student_logp  # [B, C], with grad
        g = scores.teacher_logp["main"].to(s.device)
        b = scores.teacher_logp[CONTEXT].to(s.device)
        has = torch.tensor([ex.id in self.negatives for ex in batch.examples], dtype=s.dtype, device=s.device)
        c = hinge(s, g, b, self.options.margin) * has.unsqueeze(-1)  # [B, C]
        self._record(batch, scores.mask.to(s.device) * has.unsqueeze(-1), s.detach(), g, b, c.detach())
        return {"contrastive": self.options.weight * c}

    def _record(self, batch: Any, mask: torch.Tensor, s: torch.Tensor, g: torch.Tensor, b: torch.Tensor,
                c: torch.Tensor) -> None:
        on = mask > 0
        self._sums.add(
            batch.step, tokens=float(on.sum()), pos=float((s - g).abs()[on].sum()), neg=float((s - b).abs()[on].sum()),
            viol=float((c[on] > 0).sum()), loss=float(c[on].sum()),
            missing=sum(ex.id not in self.negatives for ex in batch.examples), rows=len(batch.examples),
        )

    def inert_reason(self, run: Any) -> str | None:
        return "contrastive.weight is 0, so the hinge adds nothing" if self.options.weight == 0 else None

    def metrics(self) -> dict[str, float]:
        """Positive/negative distances, violation rate and hinge mean over the step's tokens with a negative."""
        if not self._sums.started:
            return {}
        n = max(self._sums["tokens"], 1.0)
        return {
            "pos_dist_mean": self._sums["pos"] / n, "neg_dist_mean": self._sums["neg"] / n,
            "violation_rate": self._sums["viol"] / n, "loss": self._sums["loss"] / n,
            # activity: the share of loss tokens whose hinge is active (and weighted)
            "activity": self._sums["viol"] / n if self.options.weight > 0 else 0.0,
            "missing": self._sums["missing"], "missing_fraction": self._sums["missing"] / max(self._sums["rows"], 1.0),
        }


@hookimpl
def register_components(register: Any) -> None:
    """This module is its own plugin (entry point ``contrastive``): ``UNISD_DISABLE_PLUGINS=contrastive`` leaves it out."""
    register(Contrastive)
