"""The training and scoring forward of a Llama-family body without transformers' and PEFT's module machinery.

A student forward and backward over a demo micro-batch (SmolLM2-135M, LoRA on every projection, 4 rows of
~60 tokens, two CPU cores) calls about 90,000 operators; its products take ~60 % of the time, and much of
the rest is the per-module and per-operator cost around them: ~210 PEFT layers each running three products,
a dropout, a scale and an add, each becoming its own autograd node, plus hooks, mask building and cache
objects per call (bench/RESULTS.md, "A lean training forward"). :class:`LeanForward` runs the same
arithmetic as the model's body (the model's own weights, RMSNorm epsilon and ``rotary_emb``, scaled
dot-product attention with grouped key/value heads, the gated MLP) with each adapted projection as one
autograd node (:class:`_AdaptedLinear`: ``x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ`` forward, every gradient in one backward).

It is called like the body (``input_ids``, a 2-D ``attention_mask`` over cached and new columns,
``position_ids``, ``use_cache``, a cache from an earlier call) and returns the final, post-norm hidden states
and a :class:`LeanCache`, so :mod:`unisd.model.scoring`'s paths (a shared prefix run once, prompts shared by
several completions) run on it unchanged. Outputs equal the body's up to float rounding, gradients
included (tested in float64 against transformers and PEFT); with LoRA dropout, the masks are drawn in the
order PEFT draws them, so a seed gives the same masks.

Taken only where :func:`lean_forward` recognises everything: the body :func:`~unisd.model.lean_decode.known_body`
accepts, each projection a plain linear layer or a PEFT LoRA layer with at most one active, unmerged,
vanilla adapter (no DoRA or other variant, no LoRA bias) of the base weight's dtype, no forward or backward
hooks anywhere in the body, no gradient checkpointing, no attention dropout while training, on a CPU.
Anything else returns None and the caller runs the body itself. ``UNISD_LEAN_FORWARD=0`` turns it off.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..switches import switch
from . import onednn
from .lean_decode import Layer, _rms_norm, _rotate_half, known_body, lora_linear, plain_linear, read_layer


@dataclass
class _Projection:
    """A linear layer's weights and, when an adapter is active, its LoRA parts."""

    weight: torch.Tensor  # [out, in]
    bias: torch.Tensor | None
    lora_a: torch.Tensor | None = None  # [r, in]
    lora_b: torch.Tensor | None = None  # [out, r]
    scaling: float = 0.0
    dropout: Any = None  # the adapter's dropout module (nn.Dropout or nn.Identity)


def _projection(module: Any) -> _Projection | None:
    """A linear layer as :class:`_Projection`, or None when its forward is not ``x·Wᵀ + b`` plus at most one
    vanilla LoRA update."""
    lora = {}
    if hasattr(module, "get_base_layer"):  # a PEFT tuner layer
        if not lora_linear(module):
            return None
        if getattr(module, "merged", False) or getattr(module, "fan_in_fan_out", False):
            return None  # merged: PEFT may unmerge on the next forward; fan-in-fan-out: a transposed weight
        if not module.disable_adapters:
            active = [name for name in module.active_adapters if name in module.lora_A]
            if len(active) > 1:
                return None
            if active:
                lora = _lora_parts(module, active[0])
                if lora is None:
                    return None
        module = module.get_base_layer()
    if not plain_linear(module):
        return None
    if lora and lora["lora_a"].dtype != module.weight.dtype:
        return None  # PEFT casts the input to the adapter's dtype; not repeated here
    return _Projection(module.weight, module.bias, **lora)


def _lora_parts(layer: Any, name: str) -> dict[str, Any] | None:
    if name in getattr(layer, "lora_variant", {}) or getattr(layer, "use_dora", {}).get(name, False):
        return None
    a, b, dropout = layer.lora_A[name], layer.lora_B[name], layer.lora_dropout[name]
    if not (plain_linear(a) and plain_linear(b)) or b.bias is not None:
        return None
    if type(dropout) not in (torch.nn.Dropout, torch.nn.Identity):
        return None
    return dict(lora_a=a.weight, lora_b=b.weight, scaling=float(layer.scaling[name]), dropout=dropout)


def _adapted(product: Any, x: torch.Tensor, x_d: torch.Tensor | None, weight: torch.Tensor,
             bias: torch.Tensor | None, a: torch.Tensor | None, b: torch.Tensor | None,
             scaling: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(x·Wᵀ + b + s·(x_d·Aᵀ)·Bᵀ, x_d·Aᵀ)`` (the second None without an adapter)."""
    y = product(x, weight, bias)
    xa = None
    if a is not None:
        xa = product(x if x_d is None else x_d, a)  # [N, r]
        y.addmm_(xa, b.t(), alpha=scaling)
    return y, xa


class _AdaptedLinear(torch.autograd.Function):
    """``x·Wᵀ + b + s·(x_d·Aᵀ)·Bᵀ`` for 2-D ``x`` as one autograd node; ``x_d`` is the adapter's (dropped-out)
    input, None when it is ``x`` itself (no dropout): the input's gradient is then one sum
    ``g·W + (s·g·B)·A``. Without an adapter (``A`` None) it is the plain product. ``product`` computes
    ``x·Wᵀ + b`` (oneDNN's or ``F.linear``). Gradients of W and b only where they are trained. Not twice
    differentiable."""

    @staticmethod
    def forward(ctx: Any, product: Any, x: torch.Tensor, x_d: torch.Tensor | None, weight: torch.Tensor,
                bias: torch.Tensor | None, a: torch.Tensor | None, b: torch.Tensor | None,
                scaling: float) -> torch.Tensor:
        y, xa = _adapted(product, x, x_d, weight, bias, a, b, scaling)
        ctx.product, ctx.scaling, ctx.has_bias = product, scaling, bias is not None
        ctx.save_for_backward(x, x_d, weight, a, b, xa)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, x_d, weight, a, b, xa = ctx.saved_tensors
        _, need_x, need_xd, need_w, need_bias, need_a, need_b, _ = ctx.needs_input_grad
        grad_x = grad_xd = grad_w = grad_bias = grad_a = grad_b = None
        if need_x:
            grad_x = ctx.product(grad, weight.t())
        if a is not None:
            grad_xa = grad.mm(b).mul_(ctx.scaling)  # [N, r]
            if need_b:
                grad_b = grad.t().mm(xa).mul_(ctx.scaling)
            if need_a:
                grad_a = grad_xa.t().mm(x if x_d is None else x_d)
            if x_d is not None and need_xd:
                grad_xd = grad_xa.mm(a)
            elif x_d is None and need_x:
                grad_x.addmm_(grad_xa, a)
        if need_w:
            grad_w = grad.t().mm(x)
        if need_bias and ctx.has_bias:
            grad_bias = grad.sum(0)
        return None, grad_x, grad_xd, grad_w, grad_bias, grad_a, grad_b, None


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """``x`` ``[n, features]`` with zero rows added up to ``rows``."""
    return x if x.shape[0] == rows else F.pad(x, (0, 0, 0, rows - x.shape[0]))


def _layer(layer: Any) -> Layer[_Projection] | None:
    if layer.self_attn.training and float(getattr(layer.self_attn, "attention_dropout", 0.0) or 0.0) > 0:
        return None
    return read_layer(layer, _projection)


class LeanCache:
    """The keys (after the rotary embedding) and values of every column so far, per layer, as a transformers
    cache holds them (``layers[i].keys``, ``[B, kv heads, columns, head dim]``)."""

    @dataclass
    class Layer:
        keys: torch.Tensor
        values: torch.Tensor

    def __init__(self, layers: list[LeanCache.Layer]):
        self.layers = layers

    def get_seq_length(self) -> int:
        return int(self.layers[0].keys.shape[2]) if self.layers else 0

    def reorder_cache(self, rows: torch.Tensor) -> None:
        """Row ``i`` of the cache becomes row ``rows[i]`` of it (rows may repeat)."""
        for layer in self.layers:
            layer.keys, layer.values = layer.keys.index_select(0, rows), layer.values.index_select(0, rows)


@dataclass
class LeanOutput:
    last_hidden_state: torch.Tensor
    cache: LeanCache | None


class LeanForward:
    """A supported body (see the module docstring), callable as the body is called by
    :mod:`unisd.model.scoring`. Read per forward: the adapters' state and dropout modes decide it."""

    def __init__(self, decoder: Any, layers: list[Layer[_Projection]], final_norm: tuple[torch.Tensor, float]):
        config = decoder.config
        self.decoder, self.layers, self.final_norm = decoder, layers, final_norm
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(getattr(config, "num_key_value_heads", None) or self.heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // self.heads)

    def __call__(self, **kwargs: Any) -> LeanOutput:
        return self.forward(**kwargs)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None,
                use_cache: bool = False, cache: LeanCache | None = None) -> LeanOutput:
        """Final hidden states ``[B, L, H]`` of ``input_ids`` ``[B, L]`` continuing ``cache`` (P columns, or
        none): new token ``i`` attends to every column ``j ≤ P + i`` whose ``attention_mask`` ``[B, P + L]`` is
        1 (a row with no such column attends to itself, so that its output, which is never used, stays
        finite); positions default to ``P, P + 1, ...``. With ``use_cache``, the cache of all ``P + L``
        columns is returned.

        The ``B·L`` token rows go through the layers as one ``[rows, H]`` stream padded with zero rows to
        oneDNN's kernel sizes (:func:`onednn.padded_rows`): one padding per layer (the attention output)
        instead of one per product; the zero rows are never attended to and are cut off at the end."""
        b, length = input_ids.shape
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + length, device=input_ids.device).expand(b, -1)
        embed = self.decoder.embed_tokens
        n = b * length
        x = F.embedding(input_ids, embed.weight, embed.padding_idx)  # [B, L, H]
        cos, sin = self.decoder.rotary_emb(x, position_ids)
        cos, sin = cos[:, None], sin[:, None]  # [B, 1, L, head dim]
        fast = onednn.usable(x)
        rows = onednn.padded_rows(n) if fast else n
        project = _Projector(onednn._op if fast else F.linear, n, rows)
        x = _pad_rows(x.reshape(n, -1), rows)
        mask = _attention_mask(attention_mask.bool(), past, length)
        kept: list[LeanCache.Layer] = []
        heads, kv_heads, dim = self.heads, self.kv_heads, self.head_dim
        for i, layer in enumerate(self.layers):
            h = _rms_norm(x, layer.norm1)
            q = project(h, layer.q)[:n].view(b, length, heads, dim).transpose(1, 2)
            k = project(h, layer.k)[:n].view(b, length, kv_heads, dim).transpose(1, 2)
            v = project(h, layer.v)[:n].view(b, length, kv_heads, dim).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            if cache is not None:
                k = torch.cat([cache.layers[i].keys, k], dim=2)
                v = torch.cat([cache.layers[i].values, v], dim=2)
            if use_cache:
                kept.append(LeanCache.Layer(k, v))
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=layer.scaling,
                                               enable_gqa=kv_heads != heads)
            x = x + project(_pad_rows(a.transpose(1, 2).reshape(n, heads * dim), rows), layer.o)
            h = _rms_norm(x, layer.norm2)
            x = x + project(layer.act(project(h, layer.gate)) * project(h, layer.up), layer.down)
        hidden = _rms_norm(x, self.final_norm)[:n].view(b, length, -1)
        return LeanOutput(hidden, LeanCache(kept) if use_cache else None)


class _Projector:
    """Applies a :class:`_Projection` to the padded ``[rows, in]`` stream: as one :class:`_AdaptedLinear` node
    where autograd records, directly otherwise. LoRA dropout is drawn on the ``n`` real rows, in the order
    and shapes PEFT draws it, so a seed gives PEFT's masks."""

    def __init__(self, product: Any, n: int, rows: int):
        self.product, self.n, self.rows = product, n, rows

    def __call__(self, x: torch.Tensor, p: _Projection) -> torch.Tensor:
        x_d = None
        if p.lora_a is not None and isinstance(p.dropout, torch.nn.Dropout) and p.dropout.training and p.dropout.p > 0:
            x_d = _pad_rows(p.dropout(x[: self.n]), self.rows)
        args = (x, x_d, p.weight, p.bias, p.lora_a, p.lora_b, p.scaling)
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args[:6]):
            return _AdaptedLinear.apply(self.product, *args)
        return _adapted(self.product, *args)[0]


def _attention_mask(keys: torch.Tensor, past: int, length: int) -> torch.Tensor:
    """``[B, 1, L, P + L]`` booleans: causal over the cache's ``P`` columns and the ``L`` new ones, and only
    onto columns whose mask is set; a query with nothing to attend to attends to itself."""
    columns = past + length
    causal = torch.ones(length, columns, dtype=torch.bool, device=keys.device).tril(past)
    allowed = causal[None] & keys[:, None, :columns]  # [B, L, P + L]
    empty = ~allowed.any(-1)  # [B, L]
    if bool(empty.any()):
        rows = torch.arange(length, device=keys.device)
        diagonal = torch.zeros(length, columns, dtype=torch.bool, device=keys.device)
        diagonal[rows, past + rows] = True
        allowed = allowed | (empty[..., None] & diagonal[None])
    return allowed[:, None]


def enabled() -> bool:
    """The lean forward is on: the switch ``UNISD_LEAN_FORWARD`` is not off."""
    return switch("UNISD_LEAN_FORWARD")


def _hooked(module: Any) -> bool:
    """Whether any module under ``module`` (or every module, globally) has forward or backward hooks, which
    the lean forward would not call."""
    glob = torch.nn.modules.module
    if glob._global_forward_hooks or glob._global_forward_pre_hooks or glob._global_backward_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
               for m in module.modules())


def lean_forward(model: Any) -> LeanForward | None:
    """The model's body as a :class:`LeanForward` where this module knows its forward (see the module
    docstring), else None."""
    if not enabled():
        return None
    known = known_body(model)
    if known is None:
        return None
    decoder, layers, final_norm = known
    if decoder.embed_tokens.weight.device.type != "cpu" or _hooked(decoder):
        return None
    if getattr(decoder, "gradient_checkpointing", False) and decoder.training:
        return None
    parsed = [_layer(layer) for layer in layers]
    if any(p is None for p in parsed):
        return None
    return LeanForward(decoder, parsed, final_norm)
