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

import os
import warnings
from collections.abc import Callable
from typing import Any

import torch


def _log_probs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log softmax and log-sum-exp per row. The row maximum is subtracted first: ``x − lse`` directly
    would carry the log-sum-exp's rounding (~1e-6 at logits of ~30) into every log-prob, which
    swamps the tiny divergences of a student close to its teacher."""
    top = x.amax(1, keepdim=True)
    shifted = x - top
    lse = torch.logsumexp(shifted, 1)
    return shifted - lse[:, None], lse + top.squeeze(1)


def _pick(log_probs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return log_probs.gather(1, y[:, None]).squeeze(1)


def _both(x_s: torch.Tensor, x_t: torch.Tensor, y: torch.Tensor):
    log_q, lse_s = _log_probs(x_s)
    log_p, lse_t = _log_probs(x_t)
    q, p = log_q.exp(), log_p.exp()
    return log_q, q, log_p, p, lse_s, lse_t, (_pick(log_q, y), -(q * log_q).sum(1), _pick(log_p, y))


# One function per divergence (α = 0, α = 1, in between): each compiles on its own, and α itself is a
# 0-d tensor, so a new α value reuses the kernels instead of recompiling them.
# Returns (div, student_logp, entropy, teacher_logp, lse_s, lse_t, stat, grad): ``stat`` is what
# backward needs besides the log-sum-exps; ``grad`` is ∂D/∂z [c, V] when ``project``, else None.


def forward_fkl(x_s, x_t, y, project: bool):
    log_q, q, log_p, p, lse_s, lse_t, (s_lp, ent, t_lp) = _both(x_s, x_t, y)
    div = (p * (log_p - log_q)).sum(1)  # KL(p‖q)
    return div, s_lp, ent, t_lp, lse_s, lse_t, div, (q - p if project else None)


def forward_rkl(x_s, x_t, y, project: bool):
    log_q, q, log_p, p, lse_s, lse_t, (s_lp, ent, t_lp) = _both(x_s, x_t, y)
    f = log_q - log_p
    div = (q * f).sum(1)  # KL(q‖p)
    return div, s_lp, ent, t_lp, lse_s, lse_t, div, (q * (f - div[:, None]) if project else None)


def forward_jsd(x_s, x_t, y, alpha, factor, project: bool):
    """``factor`` (0-d): what the raw JSD is multiplied by, 1/(α(1−α)) or 1 (``losses.jsd_factor``)."""
    log_q, q, log_p, p, lse_s, lse_t, (s_lp, ent, t_lp) = _both(x_s, x_t, y)
    log_m = torch.logaddexp(log_p + torch.log(alpha), log_q + torch.log1p(-alpha))
    r = log_q - log_m
    kl_pm, kl_qm = (p * (log_p - log_m)).sum(1), (q * r).sum(1)
    div = (alpha * kl_pm + (1.0 - alpha) * kl_qm) * factor
    grad = q * (r - kl_qm[:, None]) * ((1.0 - alpha) * factor) if project else None
    return div, s_lp, ent, t_lp, lse_s, lse_t, kl_qm, grad


# The logit gradient G [c, V] = gd·∂D/∂z + gl·∂log q_y/∂z, with gd/gl per row (1/T folded in).


def _logp_part(x_s, lse_s, gl, y):
    log_q = x_s - lse_s[:, None]
    q = log_q.exp()
    onehot = torch.arange(x_s.shape[1], device=x_s.device)[None, :] == y[:, None]
    return log_q, q, torch.where(onehot, gl[:, None], 0.0) - gl[:, None] * q


def backward_logp(x_s, lse_s, gl, y):
    return _logp_part(x_s, lse_s, gl, y)[2]


def backward_fkl(x_s, x_t, lse_s, lse_t, stat, gd, gl, y):
    _, q, grad = _logp_part(x_s, lse_s, gl, y)
    return grad + gd[:, None] * (q - (x_t - lse_t[:, None]).exp())


def backward_rkl(x_s, x_t, lse_s, lse_t, stat, gd, gl, y):
    log_q, q, grad = _logp_part(x_s, lse_s, gl, y)
    return grad + gd[:, None] * q * (log_q - (x_t - lse_t[:, None]) - stat[:, None])


def backward_jsd(x_s, x_t, lse_s, lse_t, stat, gd, gl, y, alpha, factor):
    log_q, q, grad = _logp_part(x_s, lse_s, gl, y)
    log_m = torch.logaddexp((x_t - lse_t[:, None]) + torch.log(alpha), log_q + torch.log1p(-alpha))
    return grad + (gd * ((1.0 - alpha) * factor))[:, None] * q * (log_q - log_m - stat[:, None])


def target_logprob_math(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """log softmax(x)[y] per row."""
    log_probs, _ = _log_probs(x)
    return _pick(log_probs, y)


def forward(x_s, x_t, y, alpha: float, project: bool, factor: float = 1.0):
    """The fused forward of one chunk, or None when compilation is unavailable (run it eagerly).
    ``factor`` multiplies the JSD at 0 < α < 1 (see ``losses.jsd_factor``)."""
    if alpha == 0.0:
        return run("forward_fkl", x_s, x_t, y, project)
    if alpha == 1.0:
        return run("forward_rkl", x_s, x_t, y, project)
    return run("forward_jsd", x_s, x_t, y, _scalar(alpha, x_s), _scalar(factor, x_s), project)


def backward(x_s, x_t, lse_s, lse_t, stat, gd, gl, y, alpha: float, factor: float = 1.0):
    """The fused logit gradient of one chunk (``x_t`` None: the log-prob term only), or None."""
    if x_t is None:
        return run("backward_logp", x_s, lse_s, gl, y)
    if alpha == 0.0:
        return run("backward_fkl", x_s, x_t, lse_s, lse_t, stat, gd, gl, y)
    if alpha == 1.0:
        return run("backward_rkl", x_s, x_t, lse_s, lse_t, stat, gd, gl, y)
    return run("backward_jsd", x_s, x_t, lse_s, lse_t, stat, gd, gl, y, _scalar(alpha, x_s), _scalar(factor, x_s))


def _scalar(value: float, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(value, dtype=like.dtype, device=like.device)


# ----------------------------------------------------------------------------------------------
# Compilation


def compile_wanted(device: torch.device, setting: str = "auto") -> bool:
    """``auto``: on CUDA (where the fused kernels pay for their compile time within a few steps); ``on``
    also on CPU (pays at large chunks after ~10-30 s of compiling); ``off``: never. The environment
    variable ``UNISD_CHUNKED_COMPILE`` (auto/on/off) overrides the setting."""
    setting = os.environ.get("UNISD_CHUNKED_COMPILE", setting).strip().lower()
    if setting not in ("auto", "on", "off"):  # the run's setting is checked by RunConfig; this is the variable
        raise ValueError(f"UNISD_CHUNKED_COMPILE (or the compile setting) must be auto, on or off, got '{setting}'")
    if setting == "off" or _BROKEN:
        return False
    return setting == "on" or device.type == "cuda"


_BROKEN: list[str] = []  # set once compilation failed in this process
_COMPILED: dict[str, Callable[..., Any]] = {}
_PLAIN: dict[str, Callable[..., Any]] = {
    f.__name__: f for f in (forward_fkl, forward_rkl, forward_jsd, backward_logp, backward_fkl, backward_rkl,
                            backward_jsd, target_logprob_math)
}


def _compile_errors() -> tuple[type[BaseException], ...]:
    """What a failure to *compile* raises (no C++ compiler, an unsupported backend, ...). Anything else,
    e.g. an out-of-range target id or running out of memory, is the caller's error and propagates."""
    import subprocess

    from torch._dynamo.exc import TorchDynamoException

    errors: list[type[BaseException]] = [TorchDynamoException, subprocess.CalledProcessError]
    try:
        from torch._inductor.exc import InductorError

        errors.append(InductorError)
    except ImportError:
        pass
    return tuple(errors)


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
    except _compile_errors() as exc:  # keep training, eagerly, for the rest of the process
        _BROKEN.append(f"{type(exc).__name__}: {exc}")
        warnings.warn(f"unisd: compiling the chunked divergence failed; continuing without it ({_BROKEN[0][:300]})",
                      RuntimeWarning, stacklevel=2)
        return None
