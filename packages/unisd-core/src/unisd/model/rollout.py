"""Student generation (on-policy rollouts). Backends are registered plugins; "hf" is built in."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch

from ..parallel import sharding
from .scoring import cache_argument, decoder_of, repeat_groups, returned_cache


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

    def __init__(self, model: Any, tokenizer: Any, batch_size: int = 16, **_: Any):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self.tokenizer.eos_token_id
        eos = eos_ids_of(self.tokenizer, self.model)
        was_training = self.model.training
        self.model.eval()  # no dropout while sampling the policy
        device = sharding.compute_device(self.model)
        out: list[Completion] = []
        try:
            for start in range(0, len(prompts), self.batch_size):
                chunk = prompts[start : start + self.batch_size]
                width = max(len(p) for p in chunk)
                ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for i, p in enumerate(chunk):  # left padding keeps every prompt's end aligned
                    ids[i, width - len(p) :] = torch.tensor(p)
                    mask[i, width - len(p) :] = 1
                sample = params.temperature > 0
                kwargs: dict[str, Any] = dict(
                    max_new_tokens=params.max_new_tokens,
                    do_sample=sample,
                    pad_token_id=pad_id,
                    eos_token_id=sorted(eos),
                    top_k=0,
                    repetition_penalty=1.0,
                )
                if sample:
                    kwargs.update(temperature=params.temperature, top_p=params.top_p)
                else:
                    kwargs.update(temperature=None, top_p=None)
                with sharding.gathered(self.model, keep_blocks=True):
                    kwargs.update(shared_prompt_cache(self.model, chunk, ids.to(device), mask.to(device)))
                    gen = self.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs,
                                              **sharding.generation_kwargs(self.model))
                for row in gen[:, width:].tolist():
                    out.append(split_completion(row, eos, pad_id))
        finally:
            self.model.train(was_training)
        return out


def shared_prompt_cache(model: Any, prompts: list[list[int]], ids: torch.Tensor, mask: torch.Tensor) -> dict[str, Any]:
    """One prefill for repeated prompts: the key/value cache of each distinct prompt's tokens but its last,
    computed once and copied to every row that repeats it (``num_generations`` > 1 repeats each prompt
    G times), as the ``generate`` argument that starts from it; ``generate`` then runs only the last
    prompt token and the new ones. ``ids``/``mask``: the chunk, left-padded.

    Empty when no prompt repeats, or where the cache cannot be shared: a sharded model (its wrappers
    drive its forwards), or a model without a separable body.
    """
    groups = repeat_groups(prompts)
    decoder = decoder_of(model)
    if groups is None or decoder is None or ids.shape[1] < 2 or sharding.is_sharded(model):
        return {}
    leaders, group = groups
    rows = torch.tensor(leaders, device=ids.device)
    prefix_ids, prefix_mask = ids[rows, :-1], mask[rows, :-1]
    # the positions generate gives left-padded rows: counted from each row's first real token
    positions = (prefix_mask.cumsum(-1) - 1).masked_fill(prefix_mask == 0, 1)
    cache = returned_cache(model(input_ids=prefix_ids, attention_mask=prefix_mask, position_ids=positions,
                                 use_cache=True, logits_to_keep=1))
    if cache is None:
        return {}
    cache.reorder_cache(torch.tensor(group, device=ids.device))  # each row gets its prompt's keys and values
    return {cache_argument(decoder): cache}
