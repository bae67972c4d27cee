"""Float32 products with a weight on the CPU through oneDNN instead of the BLAS.

PyTorch's CPU build sends ``F.linear`` and ``torch.mm`` in float32 to MKL's sgemm. On the AMD EPYC this
project is measured on (bench/RESULTS.md, "Float32 products through oneDNN on the CPU") that runs at about 150
GFLOP/s on two cores for a training forward's shapes and 60 GFLOP/s for a decoding step's handful of rows,
while oneDNN's float32 kernel, which PyTorch ships in the same wheel (``torch.ops.mkldnn._linear_pointwise``,
the op the compiler's CPU backend emits for linear layers), does the same products 2-3x faster. Both are
IEEE float32 products that differ only in their summation order, so results agree to float32 rounding
(the tests compare both against float64).

Two users:

* :func:`use_for_linears` turns a model's ``nn.Linear`` layers into :class:`OneDnnLinear` (the class only:
  weights, names, state dict and ``isinstance`` checks stay). Each call takes the oneDNN path when it can
  (float32 on the CPU, plain tensors, no autocast, not being traced by ``torch.compile``) and ``F.linear``
  otherwise, so a model moved to a GPU or loaded in bf16 behaves as before; FSDP2's sharded DTensor
  weights fall back too, while the plain weights it gathers for a CPU forward use oneDNN. Gradients: the
  input's through oneDNN (``g · W``), a trained weight's and bias's as ``F.linear`` forms them; not twice
  differentiable, and not under ``torch.func`` transforms.
* The chunked divergence's vocabulary products (``divergence.chunked``) through :func:`matmul_t` and
  :func:`matmul`.

``UNISD_ONEDNN=0`` turns both off (the BLAS, as before); the private op is probed once and never used if
the installed PyTorch lacks it or computes something else.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F

from ..switches import switch

_PLAIN = (torch.Tensor, torch.nn.Parameter)


@functools.cache
def _works() -> bool:
    """Whether this PyTorch has the op and it computes ``x · Wᵀ + b`` (probed once on a tiny case)."""
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        gen = torch.Generator().manual_seed(0)
        x, w, b = (torch.randn(*shape, generator=gen) for shape in ((3, 2, 5), (4, 5), (4,)))
        got = torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
        return bool(torch.allclose(got, F.linear(x, w, b), rtol=1e-5, atol=1e-5))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def enabled() -> bool:
    """oneDNN products are on: the op works here and the switch ``UNISD_ONEDNN`` is not off."""
    return switch("UNISD_ONEDNN") and _works()


def usable(*tensors: torch.Tensor | None) -> bool:
    """Every tensor given (None: no tensor, such as a missing bias) is a plain float32 CPU tensor (no
    DTensor, no meta) and oneDNN is on."""
    return (all(t is None or (type(t) in _PLAIN and t.dtype == torch.float32 and t.device.type == "cpu")
                for t in tensors)
            and not torch.is_autocast_enabled("cpu") and enabled())


def padded_rows(rows: int) -> int:
    """The row count a product of ``rows`` rows runs at: ``rows`` up to 64, above that rounded up to the
    next multiple of an eighth of its power of two (at most 12.5 % more rows).

    oneDNN builds (JIT-compiles) a kernel for each shape and caches it; a training step's row count (tokens
    in a batch) changes every step, and building costs more than the product itself (1.5 ms on a 400-row
    product that takes 2 ms). Rounding keeps the shapes to a few per octave, so the kernels are reused.
    """
    if rows <= 64:
        return rows
    step = 1 << (rows.bit_length() - 4)
    return -(-rows // step) * step


def _op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """oneDNN's ``x · weightᵀ (+ bias)`` for ``weight [out, in]`` (a transposed view is read as it is)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _rows_of(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``x`` as ``[rows, features]`` with zero rows added up to :func:`padded_rows`, and the real count.
    Built from differentiable ops, so autograd slices the padding off the input's gradient."""
    rows = x.numel() // x.shape[-1]
    flat = x.reshape(rows, x.shape[-1])
    padded = padded_rows(rows)
    return (flat if padded == rows else F.pad(flat, (0, 0, 0, padded - rows))), rows


def _product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, op: Any = None) -> torch.Tensor:
    """``x · weightᵀ (+ bias)`` through ``op`` (default :func:`_op`; :class:`_Linear` under autograd) over
    :func:`padded_rows` rows (results of the zero rows dropped), shaped like ``x`` with the last dimension
    ``out``."""
    staged, rows = _rows_of(x)
    return (op or _op)(staged, weight, bias)[:rows].reshape(*x.shape[:-1], weight.shape[0])


def matmul_t(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out := x · weightᵀ`` (no autograd), through oneDNN where :func:`usable`. oneDNN has no ``out=``:
    its result is copied in, so the product exists twice for a moment (one chunk of the vocabulary
    projection, ``divergence_chunk_size`` × vocabulary floats)."""
    if x.shape[0] and usable(x, weight, out):
        return out.copy_(_product(x, weight))
    return torch.mm(x, weight.t(), out=out)


def matmul(grad: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out := grad · weight`` (no autograd): :func:`matmul_t` of the transposed view."""
    return matmul_t(grad, weight.t(), out)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` without autograd through oneDNN where :func:`usable` (``F.linear`` otherwise)."""
    if x.numel() and usable(x, weight, bias):
        return _product(x, weight, bias)
    return F.linear(x, weight, bias)


class _Linear(torch.autograd.Function):
    """``x · Wᵀ + b`` forward and ``g · W`` backward through oneDNN, for 2-D ``x`` whose row count is
    already padded; a trained weight's gradient ``gᵀ · x`` as ``F.linear``'s backward forms it. Its output
    is a fresh tensor (callers slice and reshape it outside, where autograd allows in-place edits of the
    views). Not twice differentiable, and not for ``torch.func`` transforms."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x if weight.requires_grad else None, weight)
        ctx.has_bias = bias is not None
        return _op(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        grad_x = _op(grad, weight.t()) if need_x else None
        grad_w = grad.t().mm(x) if need_w else None
        grad_b = grad.sum(0) if need_b and ctx.has_bias else None
        return grad_x, grad_w, grad_b


class OneDnnLinear(torch.nn.Linear):
    """``nn.Linear`` whose float32 CPU products go through oneDNN (see the module docstring); any other
    case (a GPU, bf16, a DTensor weight, autocast, ``torch.compile`` tracing, ``UNISD_ONEDNN=0``) is
    ``nn.Linear``'s own forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight, self.bias
        if torch.compiler.is_compiling():  # the compiler lowers F.linear to oneDNN itself
            return F.linear(x, weight, bias)
        if x.numel() and torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                                      or (bias is not None and bias.requires_grad)):
            return _product(x, weight, bias, _Linear.apply) if usable(x, weight, bias) else F.linear(x, weight, bias)
        return linear(x, weight, bias)


def use_for_linears(model: torch.nn.Module) -> int:
    """Give every plain ``nn.Linear`` of ``model`` the oneDNN forward (subclasses, such as quantised or
    adapter layers, keep theirs; the plain layers inside them are included). Returns how many."""
    count = 0
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            module.__class__ = OneDnnLinear
            count += 1
    return count
