"""Statistics over a whole optimiser step, for components whose thresholds must not depend on the
micro-batch split (or on the number of processes).

A clip quantile or an entropy threshold taken per micro-batch changes with ``--grad-accum``: 1×8
and 8×1 micro-batches see different token sets. Taken over every loss token of the step, on every
process, it is one number for the step whatever the split. The loop provides the step's per-token
values in :class:`unisd.step.StepBatch` (``step_teacher_logp`` always; ``step_divergence`` and
``step_entropy`` when a component sets ``needs_step_scores``), all before the first backward pass.
"""

from __future__ import annotations

import numpy as np
import torch

from ..parallel import distributed


def loss_token_values(per_micro: list[torch.Tensor], masks: list[torch.Tensor]) -> torch.Tensor:
    """The values ``[B, C]`` of every micro-batch of the step at its loss tokens, from every process:
    one 1-D float64 CPU tensor. A collective under a multi-process launch: every process calls it."""
    local = [v.detach().double().cpu()[m.cpu() > 0] for v, m in zip(per_micro, masks, strict=True)]
    return distributed.all_gather_cat(torch.cat(local) if local else torch.zeros(0, dtype=torch.float64))


def quantile(values: torch.Tensor, q: float) -> float | None:
    """Linear-interpolation quantile of a 1-D tensor (numpy's default; no size limit, unlike
    ``torch.quantile``); None when there are no values."""
    if values.numel() == 0:
        return None
    return float(np.quantile(values.detach().double().cpu().numpy(), q))


def step_quantile(per_micro: list[torch.Tensor], masks: list[torch.Tensor], q: float) -> float | None:
    """The ``q`` quantile of the step's loss-token values (None when the step has no loss token)."""
    return quantile(loss_token_values(per_micro, masks), q)


class StepSums:
    """Named sums covering one optimiser step, for a component's ``metrics()``.

    The loop calls a component's hooks once per micro-batch, and its metrics are logged once per
    optimiser step: the first :meth:`add` of a new step starts every sum again at zero. An unknown name
    reads 0.0; :attr:`started` says whether any step has been recorded yet.
    """

    def __init__(self) -> None:
        self.step = -1
        self._sums: dict[str, float] = {}

    @property
    def started(self) -> bool:
        return self.step != -1

    def add(self, step: int, **amounts: float) -> None:
        """Add ``amounts`` to this step's sums (after resetting them if ``step`` is a new one)."""
        if step != self.step:
            self.step, self._sums = step, {}
        for name, amount in amounts.items():
            self._sums[name] = self._sums.get(name, 0.0) + float(amount)

    def __getitem__(self, name: str) -> float:
        return self._sums.get(name, 0.0)
