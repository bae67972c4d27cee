"""Student generation (on-policy rollouts). Backends are registered plugins; "hf" is built in."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch

from ..parallel import sharding
from . import lean_decode, scoring
from .merged_adapter import adapter_merged
from .scoring import (
    cache_argument,
    can_share_states,
    common_prefix_length,
    decoder_of,
    prefix_states,
    repeat_groups,
    returned_cache,
)


@dataclass
class SamplingParams:
    """The method's sampling settings: temperature 0.7, top-p 1.0, top-k off, no repetition penalty."""

    temperature: float = 0.7
    top_p: float = 1.0
    max_new_tokens: int = 256


@dataclass
class Completion:
    """Generated token ids (ending with EOS unless truncated) and whether the budget cut it off."""

    ids: list[int]
    truncated: bool


class Backend(Protocol):
    """A generation backend: turns prompt token ids into completions for the current weights."""

    name: ClassVar[str]

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]: ...

    # Optional: ``sync_weights(step)`` is called after every optimiser step, for backends that hold
    # their own copy of the weights (vLLM); the HF backend generates with the training model itself.
    # Optional: ``close()`` is called once when training ends (or fails), to free an engine's memory.


def split_completion(row: list[int], eos_ids: set[int], pad_id: int | None) -> Completion:
    """Cut a generated row after its first EOS (kept: the student must learn to stop)."""
    for i, tok in enumerate(row):
        if tok in eos_ids:
            return Completion(row[: i + 1], truncated=False)
    if pad_id is not None and pad_id not in eos_ids:
        while row and row[-1] == pad_id:
            row = row[:-1]
    return Completion(list(row), truncated=True)


def eos_ids_of(tokenizer: Any, model: Any | None = None) -> set[int]:
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_cfg = getattr(model, "generation_config", None)
    extra = getattr(gen_cfg, "eos_token_id", None) if gen_cfg is not None else None
    if isinstance(extra, int):
        ids.add(extra)
    elif isinstance(extra, list | tuple):
        ids.update(int(e) for e in extra)
    return ids


class HFBackend:
    """Generation with ``transformers``' ``generate``: batched, left-padded, sampled or greedy."""

    name: ClassVar[str] = "hf"
    description: ClassVar[str] = "transformers generate (default; CPU and GPU)"

    def __init__(self, model: Any, tokenizer: Any, batch_size: int = 16, config: Any = None,
                 merge_adapter: str = "auto", **_: Any):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        # a LoRA adapter merged into the base weights for each generate call (model/merged_adapter.py):
        # "auto" on a CPU only; a run's config decides where there is one
        self.merge_adapter = getattr(config, "merge_adapter_for_generation", merge_adapter)
        # the merged weights' memory, kept between calls on a CPU only: there allocating and first touching it
        # costs more than the merge, while a GPU's caching allocator hands it out again cheaply, and holding
        # it would keep a copy of the adapted weights from the training step's activations
        self.merge_buffers: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self.tokenizer.eos_token_id
        eos = eos_ids_of(self.tokenizer, self.model)
        was_training = self.model.training
        self.model.eval()  # no dropout while sampling the policy
        device = sharding.compute_device(self.model)
        kwargs = generation_kwargs(params, pad_id, eos)
        out: list[Completion] = []
        try:
            on_cpu = device.type == "cpu"
            merge = self.merge_adapter == "on" or (self.merge_adapter == "auto" and on_cpu)
            with adapter_merged(self.model, merge, self.merge_buffers if on_cpu else None):
                # read after the merge: whether the loop can run depends on the adapters' state
                body = lean_decode.lean_body(self.model) if on_cpu and lean_decode.enabled() else None
                for start in range(0, len(prompts), self.batch_size):
                    chunk = prompts[start : start + self.batch_size]
                    prefix = shared_prefix_length(self.model, chunk)
                    ids, mask = left_padded(chunk, pad_id, prefix)
                    ids, mask = ids.to(device), mask.to(device)
                    with sharding.gathered(self.model, keep_blocks=True):
                        cache = shared_prompt_cache(self.model, chunk, ids, mask, prefix)
                        if body is not None:
                            new = lean_decode.decode(body, ids[:, -1], mask, self._prefill(ids, mask, cache),
                                                     params.temperature, params.top_p, params.max_new_tokens,
                                                     pad_id, eos)
                        else:
                            gen = self.model.generate(input_ids=ids, attention_mask=mask, **kwargs, **cache,
                                                      **sharding.generation_kwargs(self.model))
                            new = gen[:, ids.shape[1]:]
                    out += [split_completion(row, eos, pad_id) for row in new.tolist()]
        finally:
            self.model.train(was_training)
        return out

    def _prefill(self, ids: torch.Tensor, mask: torch.Tensor, shared: dict[str, Any]) -> Any:
        """The key/value cache of every prompt column but the last: :func:`shared_prompt_cache`'s, else one
        forward of the model's body (None for one-column prompts)."""
        if shared:
            return next(iter(shared.values()))
        if ids.shape[1] < 2:
            return None
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # as generate derives them
        out = decoder_of(self.model)(input_ids=ids[:, :-1], attention_mask=mask[:, :-1],
                                     position_ids=positions[:, :-1], use_cache=True)
        return returned_cache(out)


def generation_kwargs(params: SamplingParams, pad_id: int, eos: set[int]) -> dict[str, Any]:
    """``generate``'s settings for the method's sampling (or greedy decoding at temperature 0)."""
    kwargs: dict[str, Any] = dict(max_new_tokens=params.max_new_tokens, do_sample=params.temperature > 0,
                                  pad_token_id=pad_id, eos_token_id=sorted(eos), top_k=0, repetition_penalty=1.0)
    if params.temperature > 0:
        kwargs.update(temperature=params.temperature, top_p=params.top_p)
    else:
        kwargs.update(temperature=None, top_p=None)
    return kwargs


def shared_prefix_length(model: Any, prompts: list[list[int]]) -> int:
    """How many leading tokens the prompts of one generation batch share and may prefill once (0: none, or
    fewer than :data:`~unisd.model.scoring.MIN_SHARED_PREFIX`). The last token of every prompt is left for
    ``generate`` to run."""
    decoder = decoder_of(model)
    if len(prompts) < 2 or decoder is None or not can_share_states(model, decoder):
        return 0
    prefix = min(common_prefix_length(prompts), min(len(p) for p in prompts) - 1)
    return prefix if prefix >= scoring.MIN_SHARED_PREFIX else 0


def left_padded(prompts: list[list[int]], pad_id: int, prefix: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, attention mask)`` with every prompt's end aligned on the last column. The first ``prefix``
    tokens, which all prompts share, stay in front of the padding (``[prefix | padding | rest]``), so that
    their keys and values are one copy for every row; positions count real tokens only (``generate``
    derives them from the mask), so the gap changes nothing."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, :prefix] = torch.tensor(p[:prefix], dtype=torch.long)
        mask[i, :prefix] = 1
        ids[i, width - len(p) + prefix :] = torch.tensor(p[prefix:], dtype=torch.long)
        mask[i, width - len(p) + prefix :] = 1
    return ids, mask


def shared_prompt_cache(model: Any, prompts: list[list[int]], ids: torch.Tensor, mask: torch.Tensor,
                        prefix: int = 0) -> dict[str, Any]:
    """One prefill for what rows share: the key/value cache of every prompt's tokens but its last, as the
    ``generate`` argument that starts from it; ``generate`` then runs only the last prompt token and the
    new ones. ``prefix`` leading tokens common to all rows (laid out by :func:`left_padded`) run once for
    the whole batch; then each distinct prompt's rest runs once and is copied to every row that repeats
    it (``num_generations`` > 1 repeats each prompt G times). ``ids``/``mask``: the chunk, left-padded.

    Empty when nothing is shared, or where the cache cannot be shared: a sharded model (its wrappers
    drive its forwards), or a model without a separable body.
    """
    groups = repeat_groups(prompts)
    decoder = decoder_of(model)
    if (groups is None and not prefix) or decoder is None or ids.shape[1] < 2 or sharding.is_sharded(model):
        return {}
    leaders, group = groups if groups is not None else (list(range(len(prompts))), None)
    rows = torch.tensor(leaders, device=ids.device)
    prompt_ids, prompt_mask = ids[rows, :-1], mask[rows, :-1]
    # the positions generate gives left-padded rows: counted from each row's first real token
    positions = (prompt_mask.cumsum(-1) - 1).masked_fill(prompt_mask == 0, 1)
    cache = None
    if prefix:
        _, cache = prefix_states(decoder, prompt_ids, prompt_mask, prefix, len(leaders))  # a copy per prompt
    if prefix < prompt_ids.shape[1]:
        given = {cache_argument(decoder): cache} if cache is not None else {}
        cache = returned_cache(decoder(input_ids=prompt_ids[:, prefix:], attention_mask=prompt_mask,
                                       position_ids=positions[:, prefix:], use_cache=True, **given))
    if cache is None:
        return {}
    if group is not None:
        cache.reorder_cache(torch.tensor(group, device=ids.device))  # each row gets its prompt's keys and values
    return {cache_argument(decoder): cache}
