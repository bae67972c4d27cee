"""The memory-efficient exact divergence: per-token outputs from hidden states, one chunk of tokens at a time.

Same inputs and outputs as :func:`unisd.divergence.losses.token_outputs` (the naive reference, kept as the test
oracle), but no ``tokens × vocab`` tensor is ever built for the student or the teacher. Peak memory is
O(chunk × V + tokens × H), plus the head's float32 gradient accumulator (V × H) when the head is
trained; a bf16 head is never converted whole (see :class:`_Head`).

* forward: for each chunk of masked tokens, project student and teacher hidden states to float32
  logits, compute divergence / log-probs / entropy, keep only per-token numbers;
* backward: recompute the chunk's logits and form the gradient w.r.t. the student logits from *both*
  per-token upstream gradients (divergence and student log-prob), so any loss that combines the two
  outputs token by token — ``sum(div·w)/N`` plus a hinge on ``student_logp`` — gets exact gradients.
  (Computing gradients inside forward, as Liger does, only works when the upstream gradient is known
  in advance, i.e. a scalar loss: the lm-head gradient ``Σ_n g_n·a_n·h_nᵀ`` does not factor.)
* a frozen head (LoRA, the default run) needs no head gradient, and the hidden-state gradient does
  factor: ``∂L/∂h_n = g_n · (∂D_n/∂z_n)·W/T``. So forward also projects each chunk's ``∂D/∂z`` through
  the head while its probabilities exist (one ``[N, H]`` tensor kept), and backward only scales rows:
  3 vocabulary-sized products per chunk, as many as the naive path, instead of 5. A loss that also
  uses ``student_logp`` recomputes the student logits for that term only.

Gradients w.r.t. the student logits z = h·Wᵀ/T, with q = softmax(z), p the teacher's softmax:

* student log-prob of the target y:  ∂ log q_y / ∂z = onehot(y) − q
* α = 0, D = KL(p‖q):                ∂D/∂z = q − p
* α = 1, D = KL(q‖p):                ∂D/∂z = q ⊙ (log q − log p − D)
* 0<α<1, D = c·JSD_α, m = αp + (1−α)q:
                                      ∂D/∂z = c(1−α) · q ⊙ (r − Σ q·r),   r = log q − log m

(the mixture's own derivative cancels: ∂JSD_α/∂q_i = (1−α)·log(q_i/m_i)). c = 1/(α(1−α)) by default
(then c(1−α) = 1/α), 1 for ``gjsd_scale="research"`` (see :func:`unisd.divergence.losses.jsd_factor`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..config import ALPHA_RULE, alpha_ok
from ..errors import UsageError
from ..model import onednn
from ..switches import switch
from . import chunk_math
from .losses import TokenOutputs, check_gjsd_scale, jsd_factor

ContextSpec = tuple[torch.Tensor, torch.Tensor, float]  # (hidden [B, C, H], head [V, H], temperature)


class ChunkedTokenOutputs(TokenOutputs):
    """:class:`TokenOutputs` plus ``context_logp``: for each extra teacher context passed to
    :func:`chunked_token_outputs`, the teacher's log-prob of each target token ``[B, C]`` (no grad,
    zero on padding) at that context's temperature."""

    def __init__(self, divergence: torch.Tensor, student_logp: torch.Tensor, entropy: torch.Tensor,
                 teacher_logp: torch.Tensor, context_logp: dict[str, torch.Tensor]):
        super().__init__(divergence, student_logp, entropy, teacher_logp)
        self.context_logp = context_logp


def chunked_token_outputs(
    student_hidden: torch.Tensor,
    student_head: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_head: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    alpha: float = 0.0,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    teacher_contexts: Mapping[str, ContextSpec] | None = None,
    compile: str = "auto",
    gjsd_scale: str = "normalized",
) -> ChunkedTokenOutputs:
    """Divergence, log-probs and entropy from final hidden states ``[B, C, H]`` and lm-heads ``[V, H]``.

    A drop-in for :func:`unisd.divergence.losses.token_outputs` (same arguments first, same ``[B, C]`` outputs,
    zero on padding; ``divergence`` and ``student_logp`` carry gradients to ``student_hidden`` and
    ``student_head``, the teacher side never does). ``chunk_size`` masked tokens are projected to the
    vocabulary at a time, in float32 (float64 for float64 inputs).

    ``teacher_contexts`` maps a context name to ``(hidden [B, C, H], head [V, H], temperature)``; the
    teacher log-prob of each target under every context is returned in ``.context_logp[name]``.

    ``compile``: fuse each chunk's vocabulary math with ``torch.compile`` — ``auto`` (on CUDA), ``on``,
    ``off`` (see :mod:`unisd.divergence.chunk_math`); the results are the same up to float rounding.

    ``gjsd_scale``: at 0 < α < 1, ``normalized`` divides the JSD by α(1−α), ``research`` does not.
    """
    _check(alpha, temperature, chunk_size)
    check_gjsd_scale(gjsd_scale)
    factor = jsd_factor(alpha, gjsd_scale) if 0.0 < alpha < 1.0 else 1.0
    select = mask.reshape(-1) > 0  # [B*C]
    h_s = student_hidden.reshape(-1, student_hidden.shape[-1])[select]  # [N, H], differentiable gather
    device = h_s.device
    h_t = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])[select.to(teacher_hidden.device)]
    y = targets.reshape(-1).to(select.device)[select].to(device)
    div, s_lp, ent, t_lp = _ChunkedDivergence.apply(
        h_s, student_head, h_t, teacher_head.detach(), y, float(alpha), factor, float(temperature), int(chunk_size),
        chunk_math.compile_wanted(device, compile),
    )
    contexts = {}
    for name, (hidden, head, ctx_temperature) in (teacher_contexts or {}).items():
        contexts[name] = chunked_target_logprobs(hidden, head, targets, mask, ctx_temperature, chunk_size, compile)
    return ChunkedTokenOutputs(
        _scatter(div, select, mask), _scatter(s_lp, select, mask), _scatter(ent, select, mask),
        _scatter(t_lp, select, mask), contexts,
    )


@torch.no_grad()
def chunked_target_logprobs(
    hidden: torch.Tensor,
    head: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    compile: str = "auto",
) -> torch.Tensor:
    """log softmax(h·Wᵀ / T)[target] for every masked position, ``[B, C]`` (zero on padding), no grad.

    The teacher side of a step: one call per teacher context, from its hidden states only.
    """
    _check(0.0, temperature, chunk_size)
    select = (mask.reshape(-1) > 0).to(hidden.device)
    h = hidden.reshape(-1, hidden.shape[-1])[select]
    y = targets.reshape(-1).to(hidden.device)[select]
    compute = _compute_dtype(h)
    w = _Head(head, compute, h.device)
    out = torch.empty(h.shape[0], dtype=compute, device=h.device)
    buf = _Buffers(min(chunk_size, max(h.shape[0], 1)), w.vocab, compute, h.device)
    fused = chunk_math.compile_wanted(h.device, compile)
    for lo, hi in _chunks(h.shape[0], chunk_size):
        x = w.logits(h[lo:hi], temperature, buf.get("x", hi - lo))
        if fused:
            picked = chunk_math.run("target_logprob_math", x, y[lo:hi])
            if picked is not None:
                out[lo:hi] = picked
                continue
            fused = False
        picked = x.gather(1, y[lo:hi, None]).squeeze(1)
        top = x.amax(1, keepdim=True)
        lse = x.sub_(top).exp_().sum(1).log_().add_(top.squeeze(1))
        out[lo:hi] = picked - lse
    return _scatter(out, select.to(mask.device), mask)


class _ChunkedDivergence(torch.autograd.Function):
    """``(h_s [N,H], W_s, h_t [N,H], W_t, y [N]) -> (divergence, student_logp, entropy, teacher_logp)``,
    all ``[N]``. Saves only ``[N]``-sized statistics (and references to its inputs) for backward.
    ``factor`` multiplies the JSD at 0 < α < 1."""

    @staticmethod
    def forward(ctx, h_s, w_s, h_t, w_t, y, alpha, factor, temperature, chunk_size, fused):
        n, device = h_s.shape[0], h_s.device
        compute = _compute_dtype(h_s)
        head_s, head_t = _Head(w_s, compute, device), _Head(w_t, compute, device)
        new = lambda: torch.empty(n, dtype=compute, device=device)  # noqa: E731
        div, s_lp, ent, t_lp, lse_s, lse_t, stat = (new() for _ in range(7))
        # A frozen head (LoRA) needs no head gradient, so the divergence's gradient w.r.t. the hidden
        # states, projected back through the head, is formed here while the chunk's probabilities
        # exist: ∂D/∂h = (∂D/∂z)·W / T, one [N, H] tensor. Backward then only scales its rows.
        project = ctx.needs_input_grad[0] and not ctx.needs_input_grad[1]
        div_grad_h = torch.empty(n, h_s.shape[1], dtype=compute, device=device) if project else None
        buf = _Buffers(min(chunk_size, max(n, 1)), head_s.vocab, compute, device)
        for lo, hi in _chunks(n, chunk_size):
            c = hi - lo
            if fused:  # the compiled math (chunk_math), from both chunks of logits
                x_s = head_s.logits(h_s[lo:hi], temperature, buf.get("q", c))
                x_t = head_t.logits(h_t[lo:hi].to(device), temperature, buf.get("p", c))
                out = chunk_math.forward(x_s, x_t, y[lo:hi], alpha, project, factor)
                if out is not None:
                    div[lo:hi], s_lp[lo:hi], ent[lo:hi], t_lp[lo:hi], lse_s[lo:hi], lse_t[lo:hi], stat[lo:hi] = out[:7]
                    if project:
                        head_s.backprop(out[7], h_s[lo:hi], div_grad_h[lo:hi], None)
                    continue
                fused = False  # compilation failed: this chunk and the rest run eagerly
            yc = y[lo:hi, None]
            # Logits go to the probability buffer first; log_softmax moves them to the log buffer.
            log_q, q = buf.get("s", c), buf.get("q", c)
            lse_s[lo:hi] = _log_softmax(head_s.logits(h_s[lo:hi], temperature, q), log_q)
            s_lp[lo:hi] = log_q.gather(1, yc).squeeze(1)
            ent[lo:hi] = -_rowdot(q, log_q)
            # At α = 0 nothing else needs q: the teacher's probabilities take its buffer.
            log_p, p = buf.get("t", c), buf.get("q" if alpha == 0.0 else "p", c)
            lse_t[lo:hi] = _log_softmax(head_t.logits(h_t[lo:hi].to(device), temperature, p), log_p)
            t_lp[lo:hi] = log_p.gather(1, yc).squeeze(1)
            if alpha == 0.0:  # KL(p‖q) = Σ p (log p − log q)
                div[lo:hi] = _rowdot(p, log_p.sub_(log_q))
                # ∂D/∂z = q − p, with q re-formed from log q (its buffer now holds p)
                grad = torch.exp(log_q, out=log_q).sub_(p) if project else None
            elif alpha == 1.0:  # KL(q‖p) = Σ q (log q − log p); backward needs its value
                stat[lo:hi] = div[lo:hi] = _rowdot(q, log_q.sub_(log_p))
                # ∂D/∂z = q ⊙ (log q − log p − D)
                grad = log_q.sub_(div[lo:hi, None]).mul_(q) if project else None
            else:
                log_m = _log_mixture(p, q, alpha, buf.get("m", c))
                kl_pm = _rowdot(p, log_p.sub_(log_m))
                kl_qm = _rowdot(q, log_q.sub_(log_m))
                stat[lo:hi] = kl_qm  # Σ q·r in the gradient
                div[lo:hi] = (alpha * kl_pm + (1.0 - alpha) * kl_qm) * factor
                # ∂D/∂z = c(1−α) · q ⊙ (r − Σ q·r),  r = log q − log m
                grad = log_q.sub_(kl_qm[:, None]).mul_(q).mul_((1.0 - alpha) * factor) if project else None
            if project:
                head_s.backprop(grad, h_s[lo:hi], div_grad_h[lo:hi], None)
        ctx.save_for_backward(h_s, w_s, h_t, w_t, y, lse_s, lse_t, stat, div_grad_h)
        ctx.alpha, ctx.factor, ctx.temperature, ctx.chunk_size, ctx.fused = alpha, factor, temperature, chunk_size, fused
        ctx.mark_non_differentiable(ent, t_lp)
        ctx.set_materialize_grads(False)  # an output the loss does not use gets None: no work for it
        return div, s_lp, ent, t_lp

    @staticmethod
    @torch.autograd.function.once_differentiable  # a clear error for double backward (create_graph=True)
    def backward(ctx, g_div, g_lp, _g_ent, _g_tlp):
        h_s, w_s, h_t, w_t, y, lse_s, lse_t, stat, div_grad_h = ctx.saved_tensors
        alpha, factor, temperature, chunk_size = ctx.alpha, ctx.factor, ctx.temperature, ctx.chunk_size
        no_grads = (None,) * 10  # one per input of forward
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if (g_div is None and g_lp is None) or not (need_h or need_w):
            return no_grads
        n, compute, device = h_s.shape[0], lse_s.dtype, h_s.device
        grad_h = None
        if need_h:  # written chunk by chunk, or added to the forward's projection
            grad_h = (torch.empty if div_grad_h is None else torch.zeros)(n, h_s.shape[1], dtype=compute, device=device)
        if div_grad_h is not None:  # frozen head: the divergence's part was projected in forward
            if g_div is not None:
                grad_h.addcmul_(div_grad_h, g_div.to(compute)[:, None], value=1.0 / temperature)
            g_div = None
            if g_lp is None:
                return (grad_h.to(h_s.dtype),) + no_grads[1:]
        # Fold 1/T into the per-token coefficients: they then give ∂L/∂(h·Wᵀ) directly.
        teacher_needed = g_div is not None
        g_div = (g_div if g_div is not None else torch.zeros_like(lse_s)).to(compute) / temperature
        g_lp = (g_lp if g_lp is not None else torch.zeros_like(lse_s)).to(compute) / temperature
        head_s, head_t = _Head(w_s, compute, device), _Head(w_t, compute, device)
        grad_w = torch.zeros(w_s.shape, dtype=compute, device=device) if need_w else None
        buf = _Buffers(min(chunk_size, max(n, 1)), head_s.vocab, compute, device)

        def project(grad: torch.Tensor, lo: int, hi: int) -> None:
            """One chunk's logit gradient into ∂h (written, or added to a frozen head's projection) and ∂W."""
            if div_grad_h is None:
                head_s.backprop(grad, h_s[lo:hi], grad_h[lo:hi] if need_h else None, grad_w)
            else:  # a frozen head: the divergence's part is already in grad_h
                head_s.backprop(grad, h_s[lo:hi], None, None, accumulate_h=grad_h[lo:hi])

        fused = ctx.fused
        for lo, hi in _chunks(n, chunk_size):
            c = hi - lo
            if fused:
                x_s = head_s.logits(h_s[lo:hi], temperature, buf.get("s", c))
                x_t = head_t.logits(h_t[lo:hi].to(device), temperature, buf.get("t", c)) if teacher_needed else None
                grad = chunk_math.backward(x_s, x_t, lse_s[lo:hi], lse_t[lo:hi], stat[lo:hi],
                                           g_div[lo:hi], g_lp[lo:hi], y[lo:hi], alpha, factor)
                if grad is not None:
                    project(grad, lo, hi)
                    continue
                fused = False
            gd, gl = g_div[lo:hi, None], g_lp[lo:hi, None]
            log_q = head_s.logits(h_s[lo:hi], temperature, buf.get("s", c)).sub_(lse_s[lo:hi, None])
            if not teacher_needed:  # only the student log-prob's gradient: G = gl·(onehot − q)
                grad = log_q.exp_().mul_(-gl)
                grad.scatter_add_(1, y[lo:hi, None], gl)
                project(grad, lo, hi)
                continue
            log_p = head_t.logits(h_t[lo:hi].to(device), temperature, buf.get("t", c)).sub_(lse_t[lo:hi, None])
            grad = _eager_logit_grad(log_q, log_p, gd, gl, stat[lo:hi, None], alpha, factor, buf, c)
            grad.scatter_add_(1, y[lo:hi, None], gl)
            project(grad, lo, hi)
        return (
            grad_h.to(h_s.dtype) if need_h else None,
            grad_w.to(w_s.dtype) if need_w else None,
            *no_grads[2:],
        )


# ----------------------------------------------------------------------------------------------
# Helpers


class _Head:
    """An lm-head ``[V, H]`` used as a float32 (float64) matrix without holding a converted copy of it.

    * ``native``: the head already has the compute dtype;
    * ``lowp`` (CUDA, bf16/fp16 head): tensor-core matmuls of the low-precision operands with float32
      accumulation and float32 output (``out_dtype``), so logits are never rounded to bf16; in
      backward the logit gradient is rounded to the head's dtype for the two gradient matmuls;
    * ``sliced`` (elsewhere): the head is converted ``SLICE`` vocabulary rows at a time.
    """

    SLICE = 8192

    def __init__(self, w: torch.Tensor, compute: torch.dtype, device: torch.device):
        self.w, self.compute = w.detach().to(device), compute
        self.vocab = w.shape[0]
        if w.dtype == compute:
            self.mode = "native"
        else:
            self.mode = "lowp" if _lowp_available(self.w, compute) else "sliced"

    def _slices(self):
        return ((lo, min(lo + self.SLICE, self.vocab)) for lo in range(0, self.vocab, self.SLICE))

    def _low(self, h: torch.Tensor) -> bool:
        # Only when the hidden states share the head's dtype: rounding float32 hidden states to
        # bf16 would lose precision the naive path keeps.
        return self.mode == "lowp" and h.dtype == self.w.dtype

    def logits(self, h: torch.Tensor, temperature: float, out: torch.Tensor) -> torch.Tensor:
        """``out [c, V]`` := h·Wᵀ / T in the compute dtype."""
        if self._low(h):
            _lowp_mm(h, self.w.t(), out)
            return out.div_(temperature) if temperature != 1.0 else out
        x = h.to(self.compute)
        x = x / temperature if temperature != 1.0 else x  # scaling [c, H] is cheaper than [c, V]
        if self.mode == "native":
            return onednn.matmul_t(x, self.w, out)
        for lo, hi in self._slices():
            torch.mm(x, self.w[lo:hi].to(self.compute).t(), out=out[:, lo:hi])
        return out

    def backprop(self, grad: torch.Tensor, h: torch.Tensor, grad_h: torch.Tensor | None,
                 grad_w: torch.Tensor | None, accumulate_h: torch.Tensor | None = None) -> None:
        """For the logit gradient ``G [c, V]`` of hidden states ``h [c, H]``: ``grad_h`` := G·W (or
        ``accumulate_h`` += G·W) and ``grad_w [V, H]`` += Gᵀ·h, in the compute dtype; any may be None."""
        if accumulate_h is not None:
            product = torch.empty_like(accumulate_h)
            self.backprop(grad, h, product, None)
            accumulate_h.add_(product)
        if self._low(h):
            g = grad.to(self.w.dtype)
            if grad_h is not None:
                _lowp_mm(g, self.w, grad_h)
            if grad_w is not None:
                for lo, hi in self._slices():  # the float32 product exists one slice at a time
                    grad_w[lo:hi].add_(_lowp_mm(g[:, lo:hi].t(), h, None))
            return
        if grad_h is not None:
            if self.mode == "native":
                onednn.matmul(grad, self.w, grad_h)
            else:
                grad_h.zero_()
                for lo, hi in self._slices():
                    grad_h.addmm_(grad[:, lo:hi], self.w[lo:hi].to(self.compute))
        if grad_w is not None:
            grad_w.addmm_(grad.t(), h.to(self.compute))


def _lowp_available(w: torch.Tensor, compute: torch.dtype) -> bool:
    """Whether bf16/fp16 matmuls with float32 output (``torch.mm(..., out_dtype=)``, CUDA) can be used.

    Probed once per device and dtype; a torch without it falls back to the sliced conversion.
    ``UNISD_CHUNKED_LOWP=0`` turns the fast path off (float32 matmuls of converted slices only).
    """
    if w.device.type != "cuda" or w.dtype not in (torch.bfloat16, torch.float16) or compute != torch.float32:
        return False
    if not switch("UNISD_CHUNKED_LOWP"):
        return False
    key = (str(w.device), w.dtype)
    if key not in _LOWP_OK:
        try:
            a = torch.ones(2, 2, dtype=w.dtype, device=w.device)
            out = torch.empty(2, 2, dtype=torch.float32, device=w.device)
            _lowp_mm(a, a, out)
            _LOWP_OK[key] = bool((out == 2).all()) and _lowp_mm(a, a, None).dtype == torch.float32
        except (RuntimeError, TypeError):
            _LOWP_OK[key] = False
    return _LOWP_OK[key]


_LOWP_OK: dict[tuple[str, torch.dtype], bool] = {}


def _lowp_mm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """a·b for low-precision operands with float32 accumulation and output (into ``out`` when given)."""
    if out is None:
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a, b, out_dtype=torch.float32, out=out)


class _Buffers:
    """Chunk-sized ``[chunk, V]`` work buffers, allocated once per call and reused by every chunk:
    the memory peak stays at a few chunks, and the allocator is not asked for big blocks in a loop."""

    def __init__(self, rows: int, vocab: int, dtype: torch.dtype, device: torch.device):
        self.rows, self.vocab, self.dtype, self.device = rows, vocab, dtype, device
        self._store: dict[str, torch.Tensor] = {}

    def get(self, name: str, rows: int) -> torch.Tensor:
        if name not in self._store:
            self._store[name] = torch.empty(self.rows, self.vocab, dtype=self.dtype, device=self.device)
        return self._store[name][:rows]


def _log_softmax(logits: torch.Tensor, log_out: torch.Tensor) -> torch.Tensor:
    """``log_out`` := log_softmax(logits); ``logits`` := softmax (overwritten). Returns the log-sum-exp ``[c]``.

    The fused kernel makes fewer passes over ``[c, V]`` than a hand-written one. The log-sum-exp is
    read back at each row's largest logit, where log q is closest to 0 and so carries the least
    rounding.
    """
    top, where = logits.max(1, keepdim=True)
    torch.log_softmax(logits, 1, out=log_out)
    lse = (top - log_out.gather(1, where)).squeeze(1)
    torch.exp(log_out, out=logits)
    return lse


def _log_mixture(p: torch.Tensor, q: torch.Tensor, alpha: float, out: torch.Tensor) -> torch.Tensor:
    """log(α·p + (1−α)·q) into ``out``. Where both underflow to 0 the log is clamped to a finite value;
    those entries only ever meet a zero probability factor, so they add exactly 0."""
    torch.lerp(q, p, alpha, out=out)
    return out.clamp_min_(torch.finfo(out.dtype).tiny).log_()


def _affine_rows(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """x := x·scale + shift in place, with per-row ``scale`` and ``shift`` ``[c, 1]``: one pass."""
    return torch.addcmul(shift, x, scale, out=x)


def _eager_logit_grad(log_q: torch.Tensor, log_p: torch.Tensor, gd: torch.Tensor, gl: torch.Tensor,
                      stat: torch.Tensor, alpha: float, factor: float, buf: _Buffers, c: int) -> torch.Tensor:
    """One chunk's gradient w.r.t. the student logits, less its ``gl·onehot`` term (the caller adds it),
    from log q, log p ``[c, V]`` and the per-token ``gd``, ``gl``, ``stat`` ``[c, 1]`` (formulas: the
    module docstring). Computed in the chunk's buffers (``log_p`` is overwritten): no ``[c, V]`` allocation."""
    if alpha == 0.0:  # G = gd·(q − p) + gl·(onehot − q)
        return log_q.exp_().mul_(gd - gl).addcmul_(log_p.exp_(), gd, value=-1.0)
    if alpha == 1.0:  # G = q ⊙ (gd·(log q − log p − D) − gl) + gl·onehot
        q = torch.exp(log_q, out=buf.get("q", c))
        f = torch.sub(log_q, log_p, out=log_p)
        return _affine_rows(f, gd, -(stat * gd + gl)).mul_(q)
    # G = q ⊙ (gd·c(1−α)·(r − Σ q·r) − gl) + gl·onehot,  r = log q − log m
    q = torch.exp(log_q, out=buf.get("q", c))
    log_m = _log_mixture(log_p.exp_(), q, alpha, buf.get("m", c))
    r = torch.sub(log_q, log_m, out=log_m)
    gj = gd * ((1.0 - alpha) * factor)
    return _affine_rows(r, gj, -(stat * gj + gl)).mul_(q)


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ_v a[i, v]·b[i, v] per row, without a ``[c, V]`` temporary (a batched matrix-vector product)."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def _chunks(n: int, size: int):
    return ((lo, min(lo + size, n)) for lo in range(0, n, size))


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _scatter(values: torch.Tensor, select: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # Always through masked_scatter, even with nothing selected: the outputs stay in the autograd
    # graph, so a micro-batch with every token masked still backpropagates (zero gradients).
    full = values.new_zeros(select.shape[0]).masked_scatter(select.to(values.device), values)
    return full.reshape(mask.shape)


def _check(alpha: float, temperature: float, chunk_size: int) -> None:
    if not alpha_ok(alpha):
        raise UsageError(f"{ALPHA_RULE}, got {alpha}")
    if not temperature > 0:
        raise UsageError(f"divergence temperature must be > 0, got {temperature}")
    if int(chunk_size) < 1:
        raise UsageError(f"chunk_size must be a positive number of tokens, got {chunk_size}")
