"""Packing [prompt; completion] sequences and running forwards down to completion-position hidden states.

Sequences are right-padded: every row starts at position 0, so position ids need no adjustment and a
causal model's outputs on real tokens do not depend on how much padding follows them. We keep the
final hidden states at the C positions that predict completion tokens and apply the lm-head
ourselves in float32: no [B, L, V] logits tensor is ever built for the prompt part.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..parallel import sharding


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


def prompt_learning(model: Any) -> bool:
    """Whether the model is a PEFT model whose active adapter adds virtual tokens or swaps forwards (prompt
    or prefix tuning, adaption prompts): its forward is then not its body's, nor switched by layer flags."""
    config = getattr(model, "peft_config", {}).get(getattr(model, "active_adapter", None))
    return config is not None and (config.is_prompt_learning or bool(getattr(config, "is_adaption_prompt", False)))


def decoder_of(model: Any) -> Any:
    """The transformer body of a causal LM (under a PEFT wrapper too): it returns the final, post-norm
    hidden states without computing logits or keeping every layer's output."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    get = getattr(inner, "get_decoder", None)
    decoder = get() if callable(get) else None
    return decoder if decoder is not None and decoder is not inner else None


def completion_hidden(model: Any, packed: Packed, share_prompts: bool = False) -> torch.Tensor:
    """Final (post-norm) hidden states at the completion-predicting positions: ``[B, C, H]``.

    ``share_prompts``: rows that share a prompt, e.g. the G completions of one prompt, run that prompt
    once (see :func:`shared_prompt_hidden`). With gradients, the prompt's states, and any dropout mask
    drawn on them, then serve all of its rows, and its gradient is the sum over them."""
    if share_prompts:
        shared = shared_prompt_hidden(model, packed)
        if shared is not None:
            return shared
    device = next(model.parameters()).device
    input_ids, attention_mask = packed.input_ids.to(device), packed.attention_mask.to(device)
    decoder = decoder_of(model)
    if decoder is not None and can_share_states(model, decoder):
        hidden, _ = body_states(body_runner(model, decoder), input_ids, attention_mask)  # [B, L, H]
    elif decoder is not None:
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    else:  # models without a separable body: ask for hidden states, skip most of the lm-head
        hidden = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, output_hidden_states=True,
                       logits_to_keep=1).hidden_states[-1]
    index = packed.positions.to(device).unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
    return hidden.gather(1, index)  # [B, C, H]


def prompt_groups(packed: Packed) -> tuple[list[int], list[int]] | None:
    """``(first row of each distinct prompt, the group of every row)`` when some rows repeat a prompt (and
    every row has a completion), else None. A row's prompt is its tokens before the first completion
    position."""
    lengths = (packed.positions[:, 0] + 1).tolist()
    if min((int(m) for m in packed.mask.sum(1).tolist()), default=0) < 1:
        return None  # a row without completion tokens has no prompt length to read
    return repeat_groups([tuple(packed.input_ids[row, :length].tolist()) for row, length in enumerate(lengths)])


def repeat_groups(prompts: Sequence[Sequence[int]]) -> tuple[list[int], list[int]] | None:
    """``(first row of each distinct prompt, the group of every row)`` when some prompt repeats, else None."""
    first: dict[tuple[int, ...], int] = {}
    leaders: list[int] = []
    group: list[int] = []
    for row, prompt in enumerate(prompts):
        key = tuple(prompt)
        if key not in first:
            first[key] = len(leaders)
            leaders.append(row)
        group.append(first[key])
    return None if len(leaders) == len(group) else (leaders, group)


def shared_prompt_hidden(model: Any, packed: Packed) -> torch.Tensor | None:
    """:func:`completion_hidden` for rows of which several share a prompt: each distinct prompt runs once,
    and its keys and values serve every row that continues it (None: nothing is shared, or the model has
    no separable body to run with a cache).

    Two forwards: the distinct prompts (right-padded), keeping their cache; then every row's completion
    tokens on that cache, selected per row, with the prompt padding masked out and positions continuing
    from each prompt's own length. The state that predicts a row's first completion token is its prompt's
    last; the others come from the second forward. Equal to the plain path up to float rounding at every
    completion position (tested in float64); slots past a row's completion hold other values than the
    plain path's (both are masked everywhere). It saves the prompt's compute for every repeat, which
    dominates when prompts are long. Not used with sliding-window attention or other kernels (:func:`_gap_safe`),
    nor on sharded models.
    """
    groups = prompt_groups(packed)
    decoder = decoder_of(model)
    if groups is None or decoder is None or not can_share_states(model, decoder):
        return None
    leaders, group = groups
    decoder = body_runner(model, decoder)
    device = next(model.parameters()).device
    lengths = packed.positions[:, 0] + 1  # [B] prompt lengths
    width = int(lengths[leaders].max())
    prompt_mask = (torch.arange(width)[None, :] < lengths[leaders][:, None]).long()
    prompt_hidden, cache = body_states(decoder, packed.input_ids[leaders, :width].to(device), prompt_mask.to(device),
                                       keep_cache=True)
    if cache is None:
        return None
    rows = torch.tensor(group)
    last = prompt_hidden[torch.arange(len(leaders), device=device), (lengths[leaders] - 1).to(device)]
    hidden = last[rows.to(device)][:, None, :]  # [B, 1, H]: the state that predicts completion token 0
    c = packed.mask.shape[1]
    if c == 1:
        return hidden
    cache.reorder_cache(rows.to(device))  # each row gets its prompt's keys and values
    follow = packed.targets[:, : c - 1]  # completion tokens 0..C-2, at positions P..P+C-2
    attention = torch.cat([prompt_mask[rows], packed.mask[:, : c - 1].long()], dim=1)
    position_ids = lengths[:, None] + torch.arange(c - 1)[None, :]
    second = decoder(input_ids=follow.to(device), attention_mask=attention.to(device),
                     position_ids=position_ids.to(device), use_cache=True, **{cache_argument(decoder): cache})
    return torch.cat([hidden, second.last_hidden_state], dim=1)  # [B, C, H]


# A prefix shared by every row runs once only from this many tokens on: below it, the extra forward's fixed
# cost outweighs the prefix's compute.
MIN_SHARED_PREFIX = 16


def common_prefix_length(rows: Sequence[Sequence[int]]) -> int:
    """How many leading tokens every row has in common."""
    if not rows:
        return 0
    first, n = rows[0], min(len(r) for r in rows)
    for i in range(n):
        if any(r[i] != first[i] for r in rows):
            return i
    return n


def body_runner(model: Any, decoder: Any) -> Any:
    """What runs the model's body here: :mod:`~unisd.model.lean_forward`'s forward where it knows the body
    and its adapters as they are now, else the body (``decoder``) itself. Both are called alike."""
    from .lean_forward import lean_forward  # it builds on lean_decode, which imports this module

    lean = lean_forward(model)
    return decoder if lean is None else lean


def can_share_states(model: Any, decoder: Any) -> bool:
    """Whether rows may take keys and values computed once for several of them: not under gradient
    checkpointing in training mode (it turns the cache off), not on a sharded model (its wrappers drive its
    forwards), and only with kernels and attention patterns for which a split forward equals one forward
    (:func:`_gap_safe`)."""
    if decoder.training and getattr(decoder, "gradient_checkpointing", False):
        return False
    return _gap_safe(getattr(decoder, "config", None)) and not sharding.is_sharded(model)


def body_states(decoder: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                keep_cache: bool = False) -> tuple[torch.Tensor, Any]:
    """The decoder's final hidden states ``[B, L, H]`` over right-padded rows (and, with ``keep_cache``, its
    key/value cache). A prefix of at least :data:`MIN_SHARED_PREFIX` tokens that every row starts with (a
    chat template's system turn, a task's fixed instructions) runs once, and its keys and values serve every
    row; the rest of each row then runs on them. Equal to one forward up to float rounding (tested in
    float64, gradients included: the prefix's gradient is the sum over the rows). Under dropout the rows
    share the prefix's dropout mask, as rows that repeat a prompt do (:func:`shared_prompt_hidden`)."""
    b, width = input_ids.shape
    c = 0
    if b > 1:
        agree = ((input_ids == input_ids[:1]) & (attention_mask == 1)).all(0)  # [L]
        c = min(int(agree.long().cumprod(0).sum()), width - 1)
    if c < MIN_SHARED_PREFIX:
        out = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=keep_cache)
        return out.last_hidden_state, returned_cache(out) if keep_cache else None
    head, cache = prefix_states(decoder, input_ids, attention_mask, c, b)
    positions = torch.arange(c, width, device=input_ids.device).expand(b, -1)
    rest = decoder(input_ids=input_ids[:, c:], attention_mask=attention_mask, position_ids=positions, use_cache=True,
                   **{cache_argument(decoder): cache})
    hidden = torch.cat([head.expand(b, -1, -1), rest.last_hidden_state], dim=1)
    return hidden, returned_cache(rest) if keep_cache else None


def prefix_states(decoder: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, length: int,
                  copies: int) -> tuple[torch.Tensor, Any]:
    """The first row's first ``length`` tokens, run once: their hidden states ``[1, length, H]`` and their
    key/value cache copied ``copies`` times (one per row that continues from them)."""
    head = decoder(input_ids=input_ids[:1, :length], attention_mask=attention_mask[:1, :length], use_cache=True)
    cache = returned_cache(head)
    cache.reorder_cache(torch.zeros(copies, dtype=torch.long, device=input_ids.device))
    return head.last_hidden_state, cache


def _gap_safe(config: Any) -> bool:
    """Whether a padding gap between a prompt and its completion changes nothing: an attention kernel that
    takes such a mask (sdpa, eager), and no sliding window (a window counts cache positions, so the gap
    would hide keys that the plain path sees)."""
    if getattr(config, "_attn_implementation", "sdpa") not in ("sdpa", "eager"):
        return False
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return not any("sliding" in str(kind) for kind in layer_types)
    return not (getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True))


def cache_argument(decoder: Any) -> str:
    """The keyword a forward takes its key/value cache by: ``cache`` (transformers ≥ 5.2x) or
    ``past_key_values`` (before; kept there as a deprecated alias)."""
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


def returned_cache(output: Any) -> Any:
    """The key/value cache a forward returned (``cache`` in transformers ≥ 5.2x, ``past_key_values`` before)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


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
