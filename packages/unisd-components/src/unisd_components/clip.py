"""Divergence clipping: cap each token's divergence (unisd-method.md §2.5).

The cap is static (``max_value``; 10.0 when neither option is set) or the ``quantile`` of the
micro-batch's loss-token divergences (no grad, at least 1e-6). The two are mutually exclusive.
Clipping is a hard clamp: a clipped token gets no gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from unisd.components import option

from .agreement import masked_quantile

DEFAULT_CAP = 10.0
MIN_CAP = 1e-6


class Clip:
    """Cap the per-token divergence at a fixed value or at a per-batch quantile."""

    name: ClassVar[str] = "clip"

    @dataclass
    class Options:
        max_value: float | None = option(None, "Static cap of the per-token divergence (10.0 when neither option is set).")
        quantile: float | None = option(None, "Adaptive cap: this quantile, in (0, 1], of the batch's token divergences.")

        def __post_init__(self) -> None:
            if self.max_value is not None and self.quantile is not None:
                raise ValueError(
                    "clip.max_value and clip.quantile are mutually exclusive: set one of them "
                    "(e.g. -o clip.max_value=5 or -o clip.quantile=0.99)"
                )
            if self.max_value is not None and self.max_value <= 0:
                raise ValueError(f"clip.max_value must be > 0, got {self.max_value}")
            if self.quantile is not None and not 0.0 < self.quantile <= 1.0:
                raise ValueError(f"clip.quantile must be in (0, 1], got {self.quantile}")

    def __init__(self, options: Options | None = None):
        self.options = options or self.Options()
        self._step = -1
        self._clipped = 0.0
        self._tokens = 0.0
        self._caps: list[float] = []

    def cap_for(self, div: torch.Tensor, mask: torch.Tensor) -> float:
        """The cap for this micro-batch: the static value, or the quantile of its loss tokens."""
        if self.options.quantile is None:
            return self.options.max_value if self.options.max_value is not None else DEFAULT_CAP
        return max(masked_quantile(div.detach()[mask > 0], self.options.quantile), MIN_CAP)

    def transform_divergence(self, div: torch.Tensor, batch: Any) -> torch.Tensor:
        mask = batch.step_masks[batch.micro_index].to(div.device) if batch.step_masks else torch.ones_like(div)
        cap = self.cap_for(div, mask)
        if batch.step != self._step:  # statistics cover one optimiser step
            self._step, self._clipped, self._tokens, self._caps = batch.step, 0.0, 0.0, []
        self._clipped += float(((div.detach() > cap) & (mask > 0)).sum())
        self._tokens += float(mask.sum())
        self._caps.append(cap)
        return torch.clamp(div, max=cap)  # hard clamp: zero gradient where clipped

    def metrics(self) -> dict[str, float]:
        """Fraction of the step's loss tokens that were clipped, and the cap (mean over micro-batches)."""
        if not self._caps:
            return {}
        return {"fraction": self._clipped / max(self._tokens, 1.0), "cap": sum(self._caps) / len(self._caps)}
