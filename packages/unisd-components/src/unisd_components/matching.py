"""Feature matching: last-layer hidden-state MSE between student and teacher (unisd-method.md §2.4).

``mse_t = mean_h (h_S − sg(h_T))²`` over completion positions, student under the student prompt and
teacher under the teacher prompt. ``joint`` adds ``weight · mse`` to the distillation loss; ``repr``
replaces the divergence term with it (distill_weight 0). Unlike the research code, ``repr`` keeps
other components' extra terms, e.g. the contrastive loss (§7.6).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from unisd.components import option
from unisd.divergence.stepstats import StepSums
from unisd.hookspecs import hookimpl


def hidden_mse(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor) -> torch.Tensor:
    """Per-token mean squared difference ``[B, C]`` from ``[B, C, H]`` states; the teacher is stop-grad."""
    compute = torch.float64 if student_hidden.dtype == torch.float64 else torch.float32
    diff = student_hidden.to(compute) - teacher_hidden.detach().to(student_hidden.device, compute)
    return diff.pow(2).mean(-1)


class Matching:
    """Match the student's last-layer hidden states to the teacher's (joint or representation-only)."""

    name: ClassVar[str] = "matching"
    needs_hidden: ClassVar[bool] = True

    @dataclass
    class Options:
        mode: str = option("joint", "joint: divergence + weight·MSE; repr: MSE only (replaces the divergence).",
                           choices=("joint", "repr"))
        weight: float = option(0.1, "Weight of the MSE term in joint mode (repr uses 1.0).")

        def __post_init__(self) -> None:
            if self.weight < 0:
                raise ValueError(f"matching.weight must be ≥ 0, got {self.weight}")

    def __init__(self, options: Options | None = None):
        self.options = options or self.Options()
        # repr replaces the divergence term: the loop multiplies it by every component's distill_weight.
        self.distill_weight = 0.0 if self.options.mode == "repr" else 1.0
        self._sums = StepSums()  # the step's MSE sum and loss tokens

    def extra_losses(self, scores: Any, batch: Any) -> dict[str, torch.Tensor]:
        if scores.student_hidden is None or "main" not in scores.teacher_hidden:
            raise RuntimeError("matching needs hidden states; the loop provides them when needs_hidden is True")
        mse = hidden_mse(scores.student_hidden, scores.teacher_hidden["main"])  # [B, C]
        mask = scores.mask.to(mse.device)
        self._sums.add(batch.step, mse=float((mse.detach() * mask).sum()), tokens=float(mask.sum()))
        scale = 1.0 if self.options.mode == "repr" else self.options.weight
        return {"matching": scale * mse}

    def inert_reason(self, run: Any) -> str | None:
        if self.options.mode == "joint" and self.options.weight == 0:
            return "matching.weight is 0 in joint mode, so the hidden-state term adds nothing"
        return None

    def metrics(self) -> dict[str, float]:
        """Mean hidden-state MSE per loss token over the last step (before the weight), and ``activity``: the
        term's weighted contribution per token."""
        if not self._sums["tokens"]:
            return {}
        loss = self._sums["mse"] / self._sums["tokens"]
        scale = 1.0 if self.options.mode == "repr" else self.options.weight
        return {"loss": loss, "activity": scale * loss}


@hookimpl
def register_components(register: Any) -> None:
    """This module is its own plugin (entry point ``matching``): ``UNISD_DISABLE_PLUGINS=matching`` leaves it out."""
    register(Matching)
