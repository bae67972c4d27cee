"""Divergence clipping: cap each token's divergence (unisd-method.md §2.5).

The cap is static (``max_value``; 10.0 when neither option is set) or the ``quantile`` of the
loss-token divergences of the whole optimiser step, on every process (no grad, at least 1e-6), so
the update does not depend on how the step is split into micro-batches or processes (the research
code took it per micro-batch). The two are mutually exclusive. Clipping is a hard clamp: a clipped
token gets no gradient.

The step's divergences come from a no-grad student pass before the first backward (the loop runs it
because ``needs_step_scores`` is set). Under LoRA dropout that pass samples its own dropout masks, so
the cap is the quantile of a pass like the trained one rather than of the very same values; without
dropout the values are the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from unisd.components import option
from unisd.divergence import stepstats
from unisd.errors import UsageError
from unisd.hookspecs import hookimpl

DEFAULT_CAP = 10.0
MIN_CAP = 1e-6


class Clip:
    """Cap the per-token divergence at a fixed value or at a quantile of the step's divergences."""

    name: ClassVar[str] = "clip"
    inactive_hint: ClassVar[str] = ("no token's divergence reached the cap; lower -o clip.max_value, or cap at a "
                                    "quantile of the step's divergences (-o clip.quantile=0.99)")

    @dataclass
    class Options:
        max_value: float | None = option(None, "Static cap of the per-token divergence (10.0 when neither option is set).")
        quantile: float | None = option(None, "Adaptive cap: this quantile, in (0, 1], of the optimiser step's token divergences.")

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
        self._sums = stepstats.StepSums()  # the step's clipped and loss tokens
        self._cap: float | None = None

    @property
    def needs_step_scores(self) -> bool:
        """An adaptive cap needs the student's divergences of the whole step before any backward pass."""
        return self.options.quantile is not None

    def cap_for(self, batch: Any) -> float:
        """The static cap, or the quantile of the step's loss-token divergences (every micro-batch, every
        process; a collective under a multi-process launch)."""
        if self.options.quantile is None:
            return self.options.max_value if self.options.max_value is not None else DEFAULT_CAP
        if not getattr(batch, "step_divergence", None):
            raise UsageError("clip.quantile needs the step's divergences (StepBatch.step_divergence), which the "
                             "loop provides to components with needs_step_scores")
        cap = stepstats.step_quantile(batch.step_divergence, batch.step_masks, self.options.quantile)
        return max(cap if cap is not None else 0.0, MIN_CAP)

    def transform_divergence(self, div: torch.Tensor, batch: Any) -> torch.Tensor:
        mask = batch.step_masks[batch.micro_index].to(div.device) if batch.step_masks else torch.ones_like(div)
        cap = self.cap_for(batch)
        self._sums.add(batch.step, clipped=float(((div.detach() > cap) & (mask > 0)).sum()), tokens=float(mask.sum()))
        self._cap = cap
        return torch.clamp(div, max=cap)  # hard clamp: zero gradient where clipped

    def metrics(self) -> dict[str, float]:
        """Fraction of the step's loss tokens that were clipped, and the step's cap."""
        if self._cap is None:
            return {}
        fraction = self._sums["clipped"] / max(self._sums["tokens"], 1.0)
        return {"fraction": fraction, "cap": self._cap, "activity": fraction}


@hookimpl
def register_components(register: Any) -> None:
    """This module is its own plugin (entry point ``clip``): ``UNISD_DISABLE_PLUGINS=clip`` leaves it out."""
    register(Clip)
