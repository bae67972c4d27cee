"""The loss reduction: how one optimiser step's per-token loss terms become one number (``loss_reduction``).

* ``token``: the sum over every loss token of the step, divided by the step's loss-token count;
* ``sequence``: each sequence's terms are divided by its own loss-token count (a per-sequence mean,
  as in the research code), then summed and divided by the number of the step's sequences that
  have a loss token. A sequence whose every token is masked (``mask_truncated``) counts in neither,
  as a masked token counts in neither under ``token``; the research code counts it as a zero.

Both are invariant to the micro-batch split: a sequence never spans micro-batches, and the
denominator is counted over the whole step — every micro-batch and every process — before any
backward pass.
"""

from __future__ import annotations

import torch

from ..config import LOSS_REDUCTION_CHOICES
from ..errors import UsageError
from ..parallel import distributed


def token_factors(mask: torch.Tensor, mode: str) -> torch.Tensor:
    """What each token's loss term ``[B, C]`` is multiplied by before the step's sum: the mask itself
    (``token``), or the mask over its row's loss-token count (``sequence``; 0 on padding)."""
    _check(mode)
    if mode == "token":
        return mask
    return mask / mask.sum(-1, keepdim=True).clamp(min=1.0)


def local_count(masks: list[torch.Tensor], mode: str) -> float:
    """This process's share of the step's denominator: loss tokens, or sequences with a loss token."""
    _check(mode)
    if mode == "token":
        return float(sum(float(m.sum()) for m in masks))
    return float(sum(int((m.sum(-1) > 0).sum()) for m in masks))


def step_denominator(masks: list[torch.Tensor], mode: str) -> float:
    """The step's denominator summed over every process: the loss stays a mean over the *global* batch
    (gradients are summed across processes, see ``unisd.parallel.gradient_sync``)."""
    return distributed.sum_scalar(local_count(masks, mode))


def _check(mode: str) -> None:
    if mode not in LOSS_REDUCTION_CHOICES:
        raise UsageError(f"loss_reduction must be one of {', '.join(LOSS_REDUCTION_CHOICES)}, got {mode!r}")
