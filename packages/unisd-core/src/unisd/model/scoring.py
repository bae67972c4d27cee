"""Packing [prompt; completion] sequences and running forwards down to completion-position hidden states.

Sequences are right-padded: every row starts at position 0, so position ids need no adjustment and a
causal model's outputs on real tokens do not depend on how much padding follows them. We keep the
final hidden states at the C positions that predict completion tokens and apply the lm-head
ourselves in float32: no [B, L, V] logits tensor is ever built for the prompt part.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Packed:
    """One forward's inputs and where the completion tokens are."""

    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    positions: torch.Tensor  # [B, C] index of the hidden state that predicts completion token t
    targets: torch.Tensor  # [B, C] completion token ids (0 where padded)
    mask: torch.Tensor  # [B, C] 1.0 on completion tokens (EOS included), 0.0 on padding


def pack(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> Packed:
    """Right-pad ``prompt + completion`` rows. The loss mask comes from lengths, not from pad ids,
    so an EOS equal to the pad token is still trained on."""
    lengths = [len(p) + len(c) for p, c in zip(prompts, completions, strict=True)]
    width = max(lengths)
    c_max = max(max((len(c) for c in completions), default=0), 1)
    b = len(prompts)
    input_ids = torch.full((b, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((b, width), dtype=torch.long)
    positions = torch.zeros((b, c_max), dtype=torch.long)
    targets = torch.zeros((b, c_max), dtype=torch.long)
    mask = torch.zeros((b, c_max), dtype=torch.float32)
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        row = p + c
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, : len(row)] = 1
        if c:
            positions[i, : len(c)] = torch.arange(len(p) - 1, len(p) - 1 + len(c))
            targets[i, : len(c)] = torch.tensor(c, dtype=torch.long)
            mask[i, : len(c)] = 1.0
    return Packed(input_ids, attention_mask, positions, targets, mask)


def decoder_of(model: Any) -> Any:
    """The transformer body of a causal LM (under a PEFT wrapper too): it returns the final, post-norm
    hidden states without computing logits or keeping every layer's output."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    get = getattr(inner, "get_decoder", None)
    decoder = get() if callable(get) else None
    return decoder if decoder is not None and decoder is not inner else None


def completion_hidden(model: Any, packed: Packed) -> torch.Tensor:
    """Final (post-norm) hidden states at the completion-predicting positions: ``[B, C, H]``."""
    device = next(model.parameters()).device
    inputs = dict(
        input_ids=packed.input_ids.to(device), attention_mask=packed.attention_mask.to(device), use_cache=False
    )
    decoder = decoder_of(model)
    if decoder is not None:
        hidden = decoder(**inputs).last_hidden_state  # [B, L, H]
    else:  # models without a separable body: ask for hidden states, skip most of the lm-head
        hidden = model(**inputs, output_hidden_states=True, logits_to_keep=1).hidden_states[-1]
    index = packed.positions.to(device).unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
    return hidden.gather(1, index)  # [B, C, H]


def lm_head_weight(model: Any) -> torch.Tensor:
    head = model.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise NotImplementedError("lm-heads with a bias are not supported yet")
    return head.weight


@dataclass
class Scores:
    """Per-token outputs of one micro-batch, all ``[B, C]`` unless noted. Components read these."""

    mask: torch.Tensor
    targets: torch.Tensor
    divergence: torch.Tensor  # student ↔ main-teacher divergence (with grad)
    student_logp: torch.Tensor  # log p_student(y_t) at the run temperature (with grad)
    entropy: torch.Tensor  # student entropy at the run temperature (no grad)
    teacher_logp: dict[str, torch.Tensor] = field(default_factory=dict)  # per context name (no grad)
    student_hidden: torch.Tensor | None = None  # [B, C, H], with grad, when a component needs it
    teacher_hidden: dict[str, torch.Tensor] = field(default_factory=dict)  # [B, C, H] per context
