"""Free memory on the device a run uses, and a rough estimate of what one training step needs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

GIB = 1024**3
# Stored activations per token, per layer, in units of hidden_size × element size: attention inputs,
# q/k/v, attention output, the MLP's up/gate/act (~2.7 h each) and the norms. Attention scores are
# not stored by SDPA/flash kernels, so there is no sequence² term.
ACTIVATION_FACTOR = 17
GENERATION_BATCH = 16  # HFBackend's default batch size


@dataclass
class FreeMemory:
    free: int
    total: int
    where: str  # "cuda:0", "system RAM (psutil)", ...


def free_memory(device: torch.device | str) -> FreeMemory:
    """Free bytes on ``device``: ``torch.cuda.mem_get_info`` on a GPU, else available system RAM."""
    device = torch.device(device)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return FreeMemory(int(free), int(total), str(device))
    try:
        import psutil

        vm = psutil.virtual_memory()
        return FreeMemory(int(vm.available), int(vm.total), "system RAM (psutil)")
    except ImportError:
        pass
    info = {}
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                info[key] = int(parts[0]) * 1024  # kB
    free = info.get("MemAvailable", info.get("MemFree", 0))
    return FreeMemory(free, info.get("MemTotal", 0), "system RAM (/proc/meminfo)")


@dataclass
class MemoryEstimate:
    """Bytes a training step adds on top of the loaded weights (a rough upper-side estimate)."""

    optimizer: int  # gradients + AdamW moments of the trainable parameters (+ a frozen teacher copy)
    activations: int  # student forward with gradients
    logits: int  # float32 [chunk, vocab] buffers of the chunked divergence, plus [tokens, H] projections
    kv_cache: int  # generation of the step's completions

    @property
    def peak(self) -> int:
        # Generation and the loss forward/backward do not overlap.
        return self.optimizer + max(self.kv_cache, self.activations + self.logits)

    def describe(self) -> str:
        parts = {"optimizer": self.optimizer, "activations": self.activations, "logits": self.logits,
                 "kv-cache": self.kv_cache}
        return ", ".join(f"{k} {v / GIB:.2f}" for k, v in parts.items()) + " GiB"


CHUNK_BUFFERS = 5  # [chunk, V] float32 buffers the chunked divergence may hold at once (chunked._Buffers)


def estimate_step_memory(model: Any, batch_size: int, grad_accum: int, prompt_tokens: int, new_tokens: int,
                         lora: bool, chunk_size: int = 1024, processes: int = 1) -> MemoryEstimate:
    """Estimate for micro-batches of ``batch_size`` sequences of ``prompt_tokens + new_tokens`` tokens.

    ``processes``: the weights' gradients, optimizer state and teacher copy split over this many
    processes (sharded training, ``--shard fsdp``)."""
    cfg = getattr(model, "config", None)
    params = list(model.parameters())
    elem = params[0].element_size() if params else 4
    n_params = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    optimizer = trainable * elem * 3  # grad + two AdamW moments, in the parameters' dtype
    if not lora:
        optimizer += n_params * elem  # full fine-tuning keeps a frozen copy as the teacher
    optimizer //= max(processes, 1)
    layers = int(getattr(cfg, "num_hidden_layers", 1) or 1)
    hidden = int(getattr(cfg, "hidden_size", 0) or 0)
    vocab = int(getattr(cfg, "vocab_size", 0) or 0)
    heads = int(getattr(cfg, "num_attention_heads", 1) or 1)
    kv_heads = int(getattr(cfg, "num_key_value_heads", heads) or heads)
    head_dim = int(getattr(cfg, "head_dim", 0) or (hidden // heads if heads else 0))
    seq = prompt_tokens + new_tokens
    activations = batch_size * seq * layers * hidden * elem * ACTIVATION_FACTOR
    tokens = batch_size * new_tokens
    logits = CHUNK_BUFFERS * min(chunk_size, tokens) * vocab * 4 + 2 * tokens * hidden * 4
    gen_batch = min(GENERATION_BATCH, batch_size * grad_accum)
    kv_cache = 2 * layers * kv_heads * head_dim * seq * gen_batch * elem
    return MemoryEstimate(int(optimizer), int(activations), int(logits), int(kv_cache))
