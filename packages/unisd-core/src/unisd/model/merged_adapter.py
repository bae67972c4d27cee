"""Generation with a LoRA adapter merged into the weights it adapts.

Decoding runs one forward per new token; with a LoRA adapter every adapted linear layer then does three
products (the base weight, A, then B) on a handful of rows, and on a CPU the two small ones cost about
as much as streaming the base weight once more (bench/RESULTS.md: 12 decoding forwards of 4 rows take
1.78 s with the adapter, 1.37 s without). Merging ``W + scaling * B @ A`` once per ``generate`` call
costs one small product per layer (85 ms for SmolLM2-135M into kept copies, against 25-50 ms saved per
decoding forward of 4 rows; bench/RESULTS.md), so it is paid back after two or three decoding tokens.

The merged weights are new tensors swapped in with ``.data =`` and the originals put back afterwards,
so the base weights come back bit for bit (merging and unmerging in place would not: ``(W + D) - D`` is
rounded) and no autograd version counter moves (leak-guard generates between a student forward and its
backward). The adapter layers are switched off meanwhile, so each adapted layer is just its base layer.

Only plain LoRA on float32/float64 ``nn.Linear`` (or GPT-2's ``Conv1D``) layers is merged, on an
unsharded model whose adapters are on. Anything else generates through the adapter as before: bf16/fp16
base weights (they would round a small update away), DoRA and other variants, LoRA biases, embeddings,
quantised layers, a weight shared with another module, offloaded weights, disabled adapters, FSDP.
``HFBackend`` merges on a CPU by default (``merge_adapter_for_generation = "auto"``), where decoding
streams every weight per token; on a GPU the copy would cost memory that the step's activations need.
The samples equal the adapter path's up to floating-point rounding of the weights.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from ..parallel import sharding


def mergeable_layers(model: Any) -> list[tuple[str, Any]]:
    """The model's LoRA layers that have an active adapter (with their module names), if every one can be
    merged into its base weight without changing the model beyond rounding; else ``[]``."""
    try:
        from peft.tuners.lora import Linear as LoraLinear
        from peft.tuners.lora import LoraLayer
    except ImportError:  # no PEFT: no adapter
        return []
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]
    if not layers or sharding.is_sharded(model):
        return []
    # a weight that another module also uses (a LoRA on a head tied to the input embeddings) would change
    # there too; offloaded (meta) weights have no values to merge into
    uses: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    for _, layer in layers:
        if type(layer) is not LoraLinear or layer.disable_adapters or layer.merged:
            return []
        weight = layer.get_base_layer().weight
        if uses.get(id(weight), 0) != 1 or weight.is_meta:
            return []
        # A bf16/fp16 weight cannot hold a small adapter update: W + s·B@A rounds back to W (PEFT's forward
        # adds the adapter's output in its own precision instead), so such a model generates through it.
        if weight.dtype not in (torch.float32, torch.float64):
            return []
        for name in active_adapters(layer):
            if name in getattr(layer, "lora_variant", {}) or getattr(layer, "lora_bias", {}).get(name, False):
                return []
    return [(name, layer) for name, layer in layers if active_adapters(layer)]


def active_adapters(layer: Any) -> list[str]:
    """The layer's active adapters that it holds weights for."""
    return [name for name in layer.active_adapters if name in layer.lora_A]


@contextlib.contextmanager
def adapter_merged(model: Any, enabled: bool = True, buffers: dict[str, torch.Tensor] | None = None):
    """Within the block, ``model``'s active LoRA adapters are merged into its base weights (see the module
    docstring); the weights, the adapters' switches and their ``requires_grad`` flags are restored after.

    ``buffers``: where to keep the merged weights between calls (by module name). Reusing them saves
    allocating, and on a CPU first touching, a copy of every adapted weight per call, which costs more
    than the merge's arithmetic.
    """
    layers = mergeable_layers(model) if enabled else []
    if not layers:
        yield model
        return
    buffers = {} if buffers is None else buffers
    swapped: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
    grad_flags = {p: p.requires_grad for _, layer in layers for p in _adapter_parameters(layer)}
    disabled: list[Any] = []
    try:
        with torch.no_grad():
            for name, layer in layers:
                weight = layer.get_base_layer().weight
                merged = _merged_weight(layer, weight.detach(), buffers.get(name))
                buffers[name] = merged
                swapped.append((weight, weight.data))
                weight.data = merged
        for _, layer in layers:
            layer.enable_adapters(False)
            disabled.append(layer)
        yield model
    finally:
        for weight, original in swapped:  # the base weights first: nothing below may leave them merged
            weight.data = original
        for layer in disabled:
            layer.enable_adapters(True)
        for p, flag in grad_flags.items():
            p.requires_grad_(flag)


def _merged_weight(layer: Any, weight: torch.Tensor, buffer: torch.Tensor | None) -> torch.Tensor:
    """``weight + sum over active adapters of scaling * B @ A`` (transposed for ``fan_in_fan_out``), written
    into ``buffer`` when it fits, in one pass over the weight per adapter."""
    out = buffer if buffer is not None and _fits(buffer, weight) else torch.empty_like(weight)
    source = weight
    for name in active_adapters(layer):
        a = layer.lora_A[name].weight.to(device=weight.device, dtype=weight.dtype)
        b = layer.lora_B[name].weight.to(device=weight.device, dtype=weight.dtype)
        if layer.fan_in_fan_out:  # GPT-2's Conv1D keeps its weight as [in, out]
            a, b = b.t(), a.t()
        torch.addmm(source, b, a, alpha=layer.scaling[name], out=out)
        source = out
    return out


def _fits(buffer: torch.Tensor, weight: torch.Tensor) -> bool:
    return buffer.shape == weight.shape and buffer.dtype == weight.dtype and buffer.device == weight.device


def _adapter_parameters(layer: Any) -> list[torch.nn.Parameter]:
    params = []
    for attr in layer.adapter_layer_names:
        params += [p for module in getattr(layer, attr).values() for p in module.parameters()]
    return params
