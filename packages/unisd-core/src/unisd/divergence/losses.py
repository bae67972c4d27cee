"""Per-token divergences between student and teacher distributions (the naive reference path).

Everything is computed in float32 (or float64 when given float64) from logits, whatever the model dtype.

The generalized Jensen-Shannon divergence with mixture weight α, with P = teacher and Q = student:

    M = α·P + (1−α)·Q,    JSD_α = α·KL(P‖M) + (1−α)·KL(Q‖M)

tends to 0 at both ends (α·KL(P‖Q) + O(α²) near α=0), so the raw value is discontinuous with
the forward and reverse KL that α=0 and α=1 select. We divide by α(1−α):

    D_α = JSD_α / (α(1−α))   →  KL(teacher‖student) as α→0,  KL(student‖teacher) as α→1

so the loss is continuous on [0, 1] and α only changes *which* divergence, not its scale. At
0 < α < 1 this is the research code's value times 1/(α(1−α)) (4× at α = 0.5). ``scale="research"``
returns the unscaled JSD_α instead (the ends are the plain KLs either way), so a clip cap or a loss
weight taken from the paper means the same thing.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..config import ALPHA_RULE, GJSD_SCALE_CHOICES, alpha_ok
from ..errors import UsageError


def generalized_jsd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    alpha: float = 0.0,
    temperature: float = 1.0,
    scale: str = "normalized",
) -> torch.Tensor:
    """Per-token divergence ``[...]`` from logits ``[..., V]``; gradient flows to the student only.

    ``scale``: ``normalized`` divides the JSD (0 < α < 1) by α(1−α), ``research`` leaves it unscaled.
    """
    check_gjsd_scale(scale)
    if not alpha_ok(alpha):
        raise UsageError(f"{ALPHA_RULE}, got {alpha}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    log_q = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.detach().to(dtype) / temperature, dim=-1)
    if alpha == 0.0:
        return kl(log_p, log_q)
    if alpha == 1.0:
        return kl(log_q, log_p)
    log_m = torch.logsumexp(torch.stack([log_p + math.log(alpha), log_q + math.log1p(-alpha)]), dim=0)
    jsd = alpha * kl(log_p, log_m) + (1.0 - alpha) * kl(log_q, log_m)
    return jsd * jsd_factor(alpha, scale)


def jsd_factor(alpha: float, scale: str) -> float:
    """What the raw JSD_α (0 < α < 1) is multiplied by: 1/(α(1−α)) when ``normalized``, 1 when ``research``."""
    return 1.0 / (alpha * (1.0 - alpha)) if scale == "normalized" else 1.0


def check_gjsd_scale(scale: str) -> None:
    if scale not in GJSD_SCALE_CHOICES:
        raise UsageError(f"gjsd_scale must be one of {', '.join(GJSD_SCALE_CHOICES)}, got {scale!r}")


def kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a‖b) over the last dimension, from log-probabilities."""
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(token) under softmax(logits / T), in float32. ``logits [..., V]``, ``tokens [...]``."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    return -(logp.exp() * logp).sum(-1)


class TokenOutputs:
    """Per-token outputs ``[B, C]`` (zero on padding): divergence and student log-prob carry gradients."""

    def __init__(self, divergence: torch.Tensor, student_logp: torch.Tensor, entropy: torch.Tensor,
                 teacher_logp: torch.Tensor):
        self.divergence, self.student_logp, self.entropy, self.teacher_logp = divergence, student_logp, entropy, teacher_logp


def token_outputs(
    student_hidden: torch.Tensor,
    student_head: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_head: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    alpha: float = 0.0,
    temperature: float = 1.0,
    gjsd_scale: str = "normalized",
) -> TokenOutputs:
    """Divergence, log-probs and entropy from final hidden states ``[B, C, H]`` and lm-head weights ``[V, H]``.

    Only the masked tokens are projected to the vocabulary (in float32); padding costs nothing.
    This is the straightforward path; it builds an ``[N, V]`` logits tensor for student and teacher.
    """
    select = mask.reshape(-1) > 0  # [B*C]
    h_s = student_hidden.reshape(-1, student_hidden.shape[-1])[select]  # [N, H]
    h_t = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])[select].to(h_s.device)
    y = targets.reshape(-1)[select].to(h_s.device)
    compute = torch.float64 if student_hidden.dtype == torch.float64 else torch.float32
    logits_s = h_s.to(compute) @ student_head.to(compute).T  # [N, V]
    logits_t = (h_t.to(compute) @ teacher_head.to(compute).T).detach()
    div = generalized_jsd(logits_s, logits_t, alpha, temperature, gjsd_scale)
    logp_s = torch.log_softmax(logits_s / temperature, -1)
    s_lp = logp_s.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    ent = -(logp_s.detach().exp() * logp_s.detach()).sum(-1)
    t_lp = torch.log_softmax(logits_t / temperature, -1).gather(-1, y.unsqueeze(-1)).squeeze(-1)

    def scatter(values: torch.Tensor) -> torch.Tensor:
        full = values.new_zeros(select.shape[0])
        full = full.masked_scatter(select, values) if values.numel() else full
        return full.reshape(mask.shape)

    return TokenOutputs(scatter(div), scatter(s_lp), scatter(ent), scatter(t_lp))
