"""``entropy-mask``: keep only the top-ρ highest-entropy loss tokens of each micro-batch.

With ``thr`` the (1−ρ) quantile of the student's entropies over the micro-batch's loss tokens, the
token weight is ``1[H_t ≥ thr]``. ρ = 1 keeps every token (the mask is off).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from unisd.components import option


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
        self._kept = 0.0
        self._tokens = 0.0
        self._threshold = 0.0
        self._step = -1

    def token_weights(self, scores: Any, batch: Any) -> torch.Tensor:
        entropy = scores.entropy.detach()  # [B, C]
        mask = scores.mask.to(entropy.device) > 0
        values = entropy[mask]
        if values.numel() == 0 or self.options.rho >= 1.0:
            keep = torch.ones_like(entropy)
            threshold = float("-inf")
        else:
            threshold = float(torch.quantile(values.double(), 1.0 - self.options.rho))
            keep = (entropy >= threshold).to(entropy.dtype)
        if batch.step != self._step:  # statistics cover one optimiser step
            self._step, self._kept, self._tokens = batch.step, 0.0, 0.0
        self._kept += float((keep > 0)[mask].sum())
        self._tokens += float(mask.sum())
        self._threshold = threshold
        return keep

    def metrics(self) -> dict[str, float]:
        """Fraction of loss tokens kept in the last step and the last entropy threshold."""
        if not self._tokens:
            return {}
        return {"kept_fraction": self._kept / self._tokens, "threshold": self._threshold}
