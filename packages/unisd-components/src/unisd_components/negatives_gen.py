"""Sampling negative demonstrations with the model: JSON output that ends as soon as its object closes.

Two backends, both ``texts -> sampled texts`` (what :func:`~unisd_components.negatives.build_negatives`
calls):

* ``hf``: transformers ``generate`` with a stopping criterion that ends a row once its JSON object
  has closed, so a short answer does not run on to the token budget; anything after the object is
  dropped. Output is free text, parsed afterwards (raw text is the fallback when it holds no JSON).
* ``vllm``: guided JSON decoding with the method's schema ``{reasoning, answer}`` (the output is
  always one JSON object), when vLLM is installed and a GPU is there.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from typing import Any

import torch

from unisd.data.prompts import encode, render_chat
from unisd.model.rollout import SamplingParams, eos_ids_of, split_completion

from .negatives import JSON_SCHEMA, schema_object_end

Generate = Callable[[list[str]], list[str]]
BACKENDS = ("auto", "hf", "vllm")


def cut_after_object(text: str) -> str:
    """``text`` up to the end of its answer's JSON object (the whole text while none closed)."""
    end = schema_object_end(text)
    return text if end is None else text[:end]


def json_closed_criteria(tokenizer: Any, prompt_width: int) -> Any:
    """Transformers stopping criteria that are true, per row, once the row's answer object (a JSON
    object holding ``reasoning`` or ``answer``) has closed; braces of code or prose do not stop it.

    A row is only decoded again when its newest token holds a ``}``, so checking costs a one-token
    decode per row per step, not a decode of the whole sample.
    """
    from transformers import StoppingCriteria, StoppingCriteriaList

    class JsonClosed(StoppingCriteria):
        def __init__(self) -> None:
            self.closed: set[int] = set()

        def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
            done = []
            for row, ids in enumerate(input_ids[:, prompt_width:].tolist()):
                if row not in self.closed and ids and "}" in tokenizer.decode(ids[-1:], skip_special_tokens=True):
                    if schema_object_end(tokenizer.decode(ids, skip_special_tokens=True)) is not None:
                        self.closed.add(row)
                done.append(row in self.closed)
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([JsonClosed()])


def _left_padded(chunk: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt ids and attention mask, left-padded so every prompt ends at the same column."""
    width = max(len(p) for p in chunk)
    ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(chunk), width), dtype=torch.long)
    for i, p in enumerate(chunk):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return ids, mask


def hf_generator(model: Any, tokenizer: Any, params: SamplingParams, batch_size: int = 16) -> Generate:
    """Sample with transformers, each row stopped once its JSON object closes (or at EOS / the budget)."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = eos_ids_of(tokenizer, model)

    @torch.no_grad()
    def generate(texts: list[str]) -> list[str]:
        prompts = [encode(tokenizer, render_chat(tokenizer, t)) for t in texts]
        device = next(model.parameters()).device
        model.eval()
        out: list[str] = []
        for start in range(0, len(prompts), batch_size):
            ids, mask = _left_padded(prompts[start:start + batch_size], pad_id)
            sample = params.temperature > 0
            kwargs: dict[str, Any] = dict(temperature=params.temperature, top_p=params.top_p) if sample else \
                dict(temperature=None, top_p=None)
            gen = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=params.max_new_tokens,
                do_sample=sample, top_k=0, pad_token_id=pad_id, eos_token_id=sorted(eos),
                stopping_criteria=json_closed_criteria(tokenizer, ids.shape[1]), **kwargs,
            )
            for row in gen[:, ids.shape[1]:].tolist():
                completion = split_completion(row, eos, pad_id)
                out.append(cut_after_object(tokenizer.decode(completion.ids, skip_special_tokens=True)))
        return out

    return generate


def guided_json_kwargs(schema: dict) -> dict[str, Any]:
    """vLLM ``SamplingParams`` arguments for JSON guided by ``schema``, in this vLLM's spelling.

    Newer vLLM calls it ``structured_outputs=StructuredOutputsParams(json=...)``, older
    ``guided_decoding=GuidedDecodingParams(json=...)``; with neither, {} (parsing falls back).
    """
    try:
        module = importlib.import_module("vllm.sampling_params")
    except ImportError:
        return {}
    if hasattr(module, "StructuredOutputsParams"):
        return {"structured_outputs": module.StructuredOutputsParams(json=schema)}
    if hasattr(module, "GuidedDecodingParams"):
        return {"guided_decoding": module.GuidedDecodingParams(json=schema)}
    return {}


def vllm_generator(source: str, tokenizer: Any, params: SamplingParams, seed: int,
                   gpu_memory_utilization: float = 0.85) -> Generate:
    """Sample with an offline vLLM engine (the method's 0.85 of GPU memory) and guided JSON decoding."""
    from unisd.model.vllm_backend import _require_vllm

    vllm = _require_vllm()
    llm = vllm.LLM(model=source, tokenizer=source, seed=seed, gpu_memory_utilization=gpu_memory_utilization)
    sampling = vllm.SamplingParams(
        n=1, temperature=params.temperature, top_p=params.top_p if params.temperature > 0 else 1.0,
        max_tokens=params.max_new_tokens, **guided_json_kwargs(JSON_SCHEMA),
    )

    def generate(texts: list[str]) -> list[str]:
        prompts = [{"prompt_token_ids": encode(tokenizer, render_chat(tokenizer, t))} for t in texts]
        outputs = llm.generate(prompts, sampling, use_tqdm=False)
        return [cut_after_object(o.outputs[0].text) for o in outputs]

    return generate


def pick_backend(name: str) -> str:
    """``auto``: vLLM when it is installed and a CUDA GPU is there, else transformers."""
    if name != "auto":
        return name
    return "vllm" if torch.cuda.is_available() and importlib.util.find_spec("vllm") is not None else "hf"
