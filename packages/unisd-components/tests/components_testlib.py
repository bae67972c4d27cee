"""Small builders shared by the component tests."""

from __future__ import annotations

from typing import Any

import torch

from unisd.data.tasks import Example
from unisd.model.scoring import Scores
from unisd.step import StepBatch


def examples(n: int) -> list[Example]:
    return [Example(f"ex-{i}", f"Question {i}: what is {i} + {i}?", f"REF-{i}-{2 * i}", {}) for i in range(n)]


def agree_logp(stacked: torch.Tensor) -> dict[str, torch.Tensor]:
    """``[K, B, C]`` -> ``{"agree/k": [B, C]}``."""
    return {f"agree/{k}": stacked[k] for k in range(stacked.shape[0])}


def step_batch(exs: list[Example], masks: list[torch.Tensor], logps: list[dict[str, torch.Tensor]],
               micro_index: int = 0, step: int = 1) -> StepBatch:
    return StepBatch(exs, [[1]] * len(exs), step, float(sum(m.sum() for m in masks)), micro_index,
                     step_teacher_logp=logps, step_masks=masks)


def scores(mask: torch.Tensor, **kw: Any) -> Scores:
    zeros = torch.zeros_like(mask)
    base = dict(mask=mask, targets=zeros.long(), divergence=zeros, student_logp=zeros, entropy=zeros,
                teacher_logp={})
    base.update(kw)
    return Scores(**base)
