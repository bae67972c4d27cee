"""Generation with G completions per prompt runs each distinct prompt's prefill once: the same samples as
running every row's prompt, and the prompt really is computed once."""

from __future__ import annotations

import pytest
import torch

from unisd.model import lean_decode, rollout
from unisd.model.rollout import HFBackend, SamplingParams
from unisd.testing import make_tiny_model, make_tokenizer


@pytest.fixture(scope="module")
def model_and_tokenizer():
    tokenizer = make_tokenizer()
    # float64: the shared and the plain prefill differ only in round-off, which must not flip a sample
    return make_tiny_model(tokenizer, arch="qwen2").double().eval(), tokenizer


def _sample(backend, prompts, seed):
    torch.manual_seed(seed)
    return [c.ids for c in backend.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=6))]


@pytest.mark.parametrize("batch_size", [16, 5])  # 5: a chunk boundary splits a prompt's copies
def test_shared_prefill_gives_the_same_samples(model_and_tokenizer, monkeypatch, batch_size):
    model, tokenizer = model_and_tokenizer
    distinct = [[5, 9, 13, 22], [7, 8], [30, 31, 32, 33, 34, 35], [11, 12, 40]]
    prompts = [p for p in distinct for _ in range(3)]  # G = 3, copies next to each other
    backend = HFBackend(model, tokenizer, batch_size=batch_size)
    prefills = []
    real = rollout.shared_prompt_cache
    monkeypatch.setattr(rollout, "shared_prompt_cache", lambda m, p, *a: prefills.append(len(p)) or real(m, p, *a))
    shared = _sample(backend, prompts, seed=3)
    assert prefills  # the shared path ran
    monkeypatch.setattr(rollout, "shared_prompt_cache", lambda *a: {})
    plain = _sample(backend, prompts, seed=3)
    assert shared == plain
    assert len({tuple(c) for c in shared}) > len(distinct)  # sampled: copies of a prompt differ


def test_each_distinct_prompt_is_prefilled_once(model_and_tokenizer, monkeypatch):
    model, tokenizer = model_and_tokenizer
    prompts = [[5, 9, 13, 22]] * 4 + [[7, 8, 9]] * 4
    rows_seen = []
    handle = model.model.embed_tokens.register_forward_hook(lambda m, args, out: rows_seen.append(tuple(args[0].shape)))
    # on a CPU the decoding steps run in the lean loop, which embeds without calling the module
    real_step = lean_decode.LeanBody.step
    monkeypatch.setattr(lean_decode.LeanBody, "step",
                        lambda self, ids, *a: rows_seen.append((ids.shape[0], 1)) or real_step(self, ids, *a))
    try:
        _sample(HFBackend(model, tokenizer), prompts, seed=0)
    finally:
        handle.remove()
    # the prefill: 2 distinct prompts of 3 tokens (the last one is left to generate); then every step
    # one token per row for the 8 rows
    assert rows_seen[0] == (2, 3)
    assert len(rows_seen) > 1 and all(shape == (8, 1) for shape in rows_seen[1:]), rows_seen


def test_no_repeats_means_no_shared_prefill(model_and_tokenizer):
    model, _ = model_and_tokenizer
    ids = torch.tensor([[0, 5, 6], [7, 8, 9]])
    assert rollout.shared_prompt_cache(model, [[5, 6], [7, 8, 9]], ids, (ids > 0).long()) == {}
