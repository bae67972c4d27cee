"""The per-chunk vocabulary math of the chunked divergence, as pure functions for ``torch.compile``.

On one ``[chunk, V]`` block of logits the eager code in ``chunked.py`` makes a dozen passes over memory
(log-softmax for student and teacher, exponentials, the mixture, row sums, the logit gradient). That
traffic, not the matrix products, is most of the time when ``H`` is small next to ``V``. Compiled,
the same math becomes a few fused kernels. The eager code (which reuses its buffers in place) stays the
reference and the fallback: compilation is used where it is enabled (see :func:`compile_wanted`) and
dropped for the rest of the process, with one warning, if it fails (e.g. no C++ compiler on a CPU).

All functions take float32/float64 logits already divided by the temperature, ``y`` the target ids
``[c]``, and per-row numbers as ``[c]`` tensors. Formulas: see the ``chunked`` module docstring.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable
from typing import Any

import torch

COMPILE_CHOICES = ("auto", "on", "off")


def _log_probs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lse = torch.logsumexp(x, 1)
    return x - lse[:, None], lse


def _pick(log_probs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return log_probs.gather(1, y[:, None]).squeeze(1)


def _log_mixture(log_p: torch.Tensor, log_q: torch.Tensor, alpha: float) -> torch.Tensor:
    return torch.logaddexp(log_p + math.log(alpha), log_q + math.log1p(-alpha))


def forward_math(x_s: torch.Tensor, x_t: torch.Tensor, y: torch.Tensor, alpha: float, project: bool):
    """``(div, student_logp, entropy, teacher_logp, lse_s, lse_t, stat, grad)`` for one chunk.

    ``stat`` is what backward needs besides the log-sum-exps (the divergence at α = 1, Σ q·r between);
    ``grad`` is ∂D/∂z ``[c, V]`` when ``project`` (a frozen head projects it at once), else None.
    """
    log_q, lse_s = _log_probs(x_s)
    q = log_q.exp()
    log_p, lse_t = _log_probs(x_t)
    p = log_p.exp()
    s_lp, t_lp, ent = _pick(log_q, y), _pick(log_p, y), -(q * log_q).sum(1)
    if alpha == 0.0:
        div = (p * (log_p - log_q)).sum(1)
        stat, grad = div, (q - p if project else None)
    elif alpha == 1.0:
        f = log_q - log_p
        div = (q * f).sum(1)
        stat, grad = div, (q * (f - div[:, None]) if project else None)
    else:
        log_m = _log_mixture(log_p, log_q, alpha)
        r = log_q - log_m
        kl_pm, kl_qm = (p * (log_p - log_m)).sum(1), (q * r).sum(1)
        div = (alpha * kl_pm + (1.0 - alpha) * kl_qm) / (alpha * (1.0 - alpha))
        stat, grad = kl_qm, (q * (r - kl_qm[:, None]) / alpha if project else None)
    return div, s_lp, ent, t_lp, lse_s, lse_t, stat, grad


def backward_math(x_s: torch.Tensor, x_t: torch.Tensor | None, lse_s: torch.Tensor, lse_t: torch.Tensor,
                  stat: torch.Tensor, gd: torch.Tensor, gl: torch.Tensor, y: torch.Tensor, alpha: float):
    """The logit gradient ``G [c, V]`` = gd·∂D/∂z + gl·∂log q_y/∂z, with ``gd``/``gl`` per row (1/T folded
    in). ``x_t`` None: the divergence's part is not needed (only the log-prob term's)."""
    log_q = x_s - lse_s[:, None]
    q = log_q.exp()
    gd, gl = gd[:, None], gl[:, None]
    onehot = torch.arange(x_s.shape[1], device=x_s.device)[None, :] == y[:, None]
    grad = torch.where(onehot, gl, 0.0) - gl * q
    if x_t is None:
        return grad
    log_p = x_t - lse_t[:, None]
    if alpha == 0.0:
        return grad + gd * (q - log_p.exp())
    if alpha == 1.0:
        return grad + gd * q * (log_q - log_p - stat[:, None])
    r = log_q - _log_mixture(log_p, log_q, alpha)
    return grad + (gd / alpha) * q * (r - stat[:, None])


def target_logprob_math(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """log softmax(x)[y] per row."""
    log_probs, _ = _log_probs(x)
    return _pick(log_probs, y)


# ----------------------------------------------------------------------------------------------
# Compilation


def compile_wanted(device: torch.device, setting: str = "auto") -> bool:
    """``auto``: on CUDA (where the fused kernels pay for their compile time within a few steps); ``on``
    also on CPU (pays at large chunks after ~10-30 s of compiling); ``off``: never. The environment
    variable ``UNISD_CHUNKED_COMPILE`` (auto/on/off) overrides the setting."""
    setting = os.environ.get("UNISD_CHUNKED_COMPILE", setting).strip().lower()
    if setting not in COMPILE_CHOICES:
        raise ValueError(f"compile setting must be one of {', '.join(COMPILE_CHOICES)}, got '{setting}'")
    if setting == "off" or _BROKEN:
        return False
    return setting == "on" or device.type == "cuda"


_BROKEN: list[str] = []  # set once compilation failed in this process
_COMPILED: dict[str, Callable[..., Any]] = {}
_PLAIN = {"forward": forward_math, "backward": backward_math, "target": target_logprob_math}


def run(name: str, *args: Any) -> Any:
    """The compiled ``name`` function on ``args``; None if compilation is (or just became) unavailable,
    in which case the caller runs its eager code."""
    if _BROKEN:
        return None
    if name not in _COMPILED:
        # dynamic: the last, shorter chunk reuses the kernels instead of compiling them again
        _COMPILED[name] = torch.compile(_PLAIN[name], dynamic=True)
    try:
        return _COMPILED[name](*args)
    except Exception as exc:  # a missing compiler, an unsupported backend, ...: keep training, eagerly
        _BROKEN.append(f"{type(exc).__name__}: {exc}")
        warnings.warn(f"unisd: compiling the chunked divergence failed; continuing without it ({_BROKEN[0][:300]})",
                      RuntimeWarning, stacklevel=2)
        return None
