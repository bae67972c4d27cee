"""``entropy-mask``: keep only the top-ρ highest-entropy loss tokens of each optimiser step.

With ``thr`` the (1−ρ) quantile of the student's entropies over the loss tokens of the whole step
(every micro-batch, every process), the token weight is ``1[H_t ≥ thr]``. ρ = 1 keeps every token
(the mask is off). Taking the quantile per micro-batch would make the update depend on
``--grad-accum``; ``needs_step_scores`` asks the loop for the step's entropies before any backward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from unisd import UsageError, option
from unisd.divergence import stepstats


class EntropyMask:
    """Train only on the top-ρ fraction of tokens with the highest student entropy."""

    name: ClassVar[str] = "entropy-mask"

    @dataclass
    class Options:
        rho: float = option(0.2, "Fraction of loss tokens kept: those with the highest student entropy (1 = all).")

        def __post_init__(self) -> None:
            if not 0.0 < self.rho <= 1.0:
                raise ValueError(f"entropy-mask.rho must be in (0, 1], got {self.rho}")

    def __init__(self, options: Options | None = None):
        self.options = options or self.Options()
        self._sums = stepstats.StepSums()  # the step's kept and loss tokens
        self._threshold = 0.0

    @property
    def needs_step_scores(self) -> bool:
        """The threshold is a quantile of the student's entropies over the whole step."""
        return self.options.rho < 1.0

    def threshold(self, batch: Any) -> float:
        """The (1−ρ) quantile of the step's loss-token entropies (-inf: keep everything)."""
        if self.options.rho >= 1.0:
            return float("-inf")
        if not getattr(batch, "step_entropy", None):
            raise UsageError("entropy-mask needs the step's entropies (StepBatch.step_entropy), which the loop "
                             "provides to components with needs_step_scores")
        value = stepstats.step_quantile(batch.step_entropy, batch.step_masks, 1.0 - self.options.rho)
        return float("-inf") if value is None else value

    def token_weights(self, scores: Any, batch: Any) -> torch.Tensor:
        entropy = scores.entropy.detach()  # [B, C]
        mask = scores.mask.to(entropy.device) > 0
        threshold = self.threshold(batch)
        keep = (entropy >= threshold).to(entropy.dtype)
        self._sums.add(batch.step, kept=float((keep > 0)[mask].sum()), tokens=float(mask.sum()))
        self._threshold = threshold
        return keep

    def metrics(self) -> dict[str, float]:
        """Fraction of loss tokens kept in the last step and its entropy threshold."""
        if not self._sums["tokens"]:
            return {}
        return {"kept_fraction": self._sums["kept"] / self._sums["tokens"], "threshold": self._threshold}
