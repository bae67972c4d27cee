"""A prefix that every row of a forward starts with (a chat template's system turn, a task's instructions)
runs once for the batch: the same hidden states, gradients, samples and training step as running every row
whole, in float64, whatever the rows' lengths."""

from __future__ import annotations

import random

import pytest
import torch

from unisd.model import rollout, scoring
from unisd.model.rollout import HFBackend, SamplingParams, left_padded
from unisd.model.scoring import body_states, common_prefix_length, completion_hidden, pack
from unisd.testing import make_tiny_model, make_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture
def no_sharing(monkeypatch):
    """A switch that turns prefix sharing off: the plain path to compare with."""
    def off() -> None:
        monkeypatch.setattr(scoring, "MIN_SHARED_PREFIX", 10**9)
    return off


def prefixed_rows(rng: random.Random, vocab: int, rows: int, prefix: int, rest: tuple[int, int]) -> list[list[int]]:
    head = [rng.randrange(3, vocab) for _ in range(prefix)]
    return [head + [rng.randrange(3, vocab) for _ in range(rng.randint(*rest))] for _ in range(rows)]


def record_forwards(model, seen: list[tuple[int, ...]]):
    return model.get_input_embeddings().register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))


def test_common_prefix_length():
    assert common_prefix_length([[1, 2, 3], [1, 2, 4], [1, 2]]) == 2
    assert common_prefix_length([[1, 2], [1, 2]]) == 2
    assert common_prefix_length([[5], [1]]) == 0
    assert common_prefix_length([]) == 0


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize(("seed", "rows", "prefix", "rest", "c_max"),
                         [(0, 4, 16, (0, 9), 6), (1, 3, 23, (1, 4), 1), (2, 2, 40, (5, 5), 9), (3, 6, 17, (0, 0), 3)])
def test_a_shared_prefix_gives_the_plain_hidden_states(tokenizer, no_sharing, arch, seed, rows, prefix, rest, c_max):
    rng = random.Random(seed)
    prompts = prefixed_rows(rng, len(tokenizer), rows, prefix, rest)
    packed = pack(prompts, [[rng.randrange(3, len(tokenizer)) for _ in range(rng.randint(1, c_max))] for _ in prompts],
                  tokenizer.pad_token_id)
    model = make_tiny_model(tokenizer, arch=arch, seed=seed).double().eval()
    seen: list[tuple[int, ...]] = []
    handle = record_forwards(model, seen)
    with torch.no_grad():
        shared = completion_hidden(model, packed)
        no_sharing()
        plain = completion_hidden(model, packed)
    handle.remove()
    width = packed.input_ids.shape[1]
    assert seen == [(1, prefix), (rows, width - prefix), (rows, width)]  # the prefix ran once
    keep = packed.mask.bool()
    assert torch.allclose(shared[keep], plain[keep], rtol=0, atol=1e-10)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_shared_prefix_gets_the_sum_of_its_rows_gradients(tokenizer, no_sharing, arch):
    rng = random.Random(4)
    prompts = prefixed_rows(rng, len(tokenizer), 4, 20, (0, 7))
    packed = pack(prompts, [[rng.randrange(3, len(tokenizer)) for _ in range(rng.randint(1, 6))] for _ in prompts],
                  tokenizer.pad_token_id)
    weights = torch.randn(packed.mask.shape + (32,), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    results = []
    for share in (True, False):
        if not share:
            no_sharing()
        model = make_tiny_model(tokenizer, arch=arch, seed=4).double().train()
        loss = (completion_hidden(model, packed) * weights * packed.mask.double()[..., None]).sum()
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (shared_loss, shared_grads), (plain_loss, plain_grads) = results
    assert torch.allclose(shared_loss, plain_loss, rtol=1e-12, atol=0)
    assert shared_grads.keys() == plain_grads.keys() and len(plain_grads) > 5
    for name, grad in plain_grads.items():
        assert float((shared_grads[name] - grad).norm()) <= 1e-7 * float(grad.norm()), name


def test_repeated_prompts_after_a_shared_prefix(tokenizer, no_sharing):
    """G completions per prompt on top of a common prefix: the prefix once, each distinct prompt's rest
    once, then every row's completion; the plain path's states."""
    rng = random.Random(6)
    distinct = prefixed_rows(rng, len(tokenizer), 3, 18, (1, 6))
    prompts = [p for p in distinct for _ in range(2)]
    packed = pack(prompts, [[rng.randrange(3, len(tokenizer)) for _ in range(rng.randint(2, 5))] for _ in prompts],
                  tokenizer.pad_token_id)
    model = make_tiny_model(tokenizer, arch="qwen2", seed=6).double().eval()
    seen: list[tuple[int, ...]] = []
    handle = record_forwards(model, seen)
    with torch.no_grad():
        shared = completion_hidden(model, packed, share_prompts=True)
        no_sharing()
        plain = completion_hidden(model, packed)
    handle.remove()
    assert seen[0] == (1, 18) and seen[1][0] == 3 and seen[2][0] == 6  # prefix, distinct prompts, completions
    keep = packed.mask.bool()
    assert torch.allclose(shared[keep], plain[keep], rtol=0, atol=1e-10)


def test_short_prefixes_and_single_rows_run_whole(tokenizer):
    model = make_tiny_model(tokenizer).double().eval()
    rng = random.Random(1)
    for prompts in (prefixed_rows(rng, len(tokenizer), 3, scoring.MIN_SHARED_PREFIX - 1, (1, 4)),
                    prefixed_rows(rng, len(tokenizer), 1, 30, (1, 4))):
        ids, mask = pack(prompts, [[7]] * len(prompts), tokenizer.pad_token_id).input_ids, None
        mask = (torch.arange(ids.shape[1])[None] < torch.tensor([len(p) + 1 for p in prompts])[:, None]).long()
        seen: list[tuple[int, ...]] = []
        handle = record_forwards(model, seen)
        with torch.no_grad():
            body_states(model.model, ids, mask)
        handle.remove()
        assert seen == [tuple(ids.shape)]


def test_the_generation_layout_keeps_the_prefix_in_front_of_the_padding():
    ids, mask = left_padded([[1, 2, 3, 4], [1, 2, 5], [1, 2, 6, 7, 8]], pad_id=0, prefix=2)
    assert ids.tolist() == [[1, 2, 0, 3, 4], [1, 2, 0, 0, 5], [1, 2, 6, 7, 8]]
    assert mask.tolist() == [[1, 1, 0, 1, 1], [1, 1, 0, 0, 1], [1, 1, 1, 1, 1]]
    ids, mask = left_padded([[1, 2, 3], [4]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


@pytest.mark.parametrize(("batch_size", "repeats"), [(16, 1), (16, 2), (3, 1)])
def test_generation_from_a_shared_prefix_gives_the_same_samples(tokenizer, no_sharing, batch_size, repeats):
    """Sampled completions (float64, the same seed) with and without the shared prefill; with repeated
    prompts too, and with a chunk boundary inside the batch."""
    model = make_tiny_model(tokenizer, arch="qwen2", seed=2).double().eval()
    rng = random.Random(2)
    prompts = [p for p in prefixed_rows(rng, len(tokenizer), 5, 17, (1, 8)) for _ in range(repeats)]
    backend = HFBackend(model, tokenizer, batch_size=batch_size)
    params = SamplingParams(temperature=1.0, max_new_tokens=6)
    seen: list[tuple[int, ...]] = []
    handle = record_forwards(model, seen)
    torch.manual_seed(5)
    shared = [c.ids for c in backend.generate(prompts, params)]
    handle.remove()
    assert seen[0] == (1, 17)  # the prefix, once for the first chunk
    no_sharing()
    torch.manual_seed(5)
    plain = [c.ids for c in backend.generate(prompts, params)]
    assert shared == plain
    assert len({tuple(c) for c in shared}) > 1


def test_a_training_step_over_a_shared_prefix_has_the_plain_loss_and_gradients(tmp_path, no_sharing):
    """The whole step (LoRA student, adapter-off teacher, generation): prompts that open with the same
    instructions give the loss and gradients of running every row whole (no dropout)."""
    from unisd.config import RunConfig
    from unisd.io.reporting import Reporter
    from unisd.plugins import get_plugin_manager
    from unisd.run import build_run
    from unisd.step import distill_step
    from unisd.testing import make_tiny_model_dir, write_jsonl

    model_dir = make_tiny_model_dir(tmp_path / "model")
    instructions = "Answer the question below in one short line, with no explanation and nothing else at all: "
    data = write_jsonl(tmp_path / "data.jsonl", [{"prompt": instructions + f"what is {i} plus {i + 3}?",
                                                  "reference": str(2 * i + 3)} for i in range(8)])
    results = []
    for share in (True, False):
        if not share:
            no_sharing()
        run = build_run(RunConfig(model=str(model_dir), data=str(data), lora_dropout=0.0, max_new_tokens=5,
                                  batch_size=4, grad_accum=1), get_plugin_manager(load_entry_points=False),
                        Reporter(), None)
        torch.manual_seed(7)
        with torch.no_grad():  # the student away from the teacher, so the loss and gradients are not ~0
            for name, p in run.model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05)
        examples = run.examples[:4]
        prompts = [run.student_ids(e) for e in examples]
        assert common_prefix_length(prompts) >= scoring.MIN_SHARED_PREFIX or not share
        torch.manual_seed(3)
        completions = HFBackend(run.model, run.tokenizer).generate(prompts, SamplingParams(1.0, 1.0, 5))
        stats = distill_step(run, examples, completions)
        results.append(([c.ids for c in completions], stats,
                        [p.grad.detach().clone() for p in run.model.parameters() if p.requires_grad]))
    (shared_ids, shared_stats, shared_grads), (plain_ids, plain_stats, plain_grads) = results
    assert shared_ids == plain_ids
    for key in ("loss", "divergence", "loss_tokens"):
        assert shared_stats[key] == pytest.approx(plain_stats[key], rel=1e-5, abs=1e-7), key
    for a, b in zip(shared_grads, plain_grads, strict=True):
        assert float((a - b).norm()) <= 1e-5 * float(b.norm()) + 1e-9


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("repeats", [1, 3])
def test_the_shared_prefill_predicts_the_first_token_as_a_whole_prompt_does(tokenizer, arch, repeats):
    """The cache that generation starts from, built from the shared prefix and each prompt's rest, gives the
    next-token logits of one forward over every left-padded prompt (float64)."""
    from unisd.model.scoring import cache_argument

    model = make_tiny_model(tokenizer, arch=arch, seed=3).double().eval()
    rng = random.Random(3)
    prompts = [p for p in prefixed_rows(rng, len(tokenizer), 4, 19, (1, 9)) for _ in range(repeats)]
    prefix = rollout.shared_prefix_length(model, prompts)
    assert prefix == 19
    with torch.no_grad():
        ids, mask = left_padded(prompts, tokenizer.pad_token_id, prefix)
        cache = rollout.shared_prompt_cache(model, prompts, ids, mask, prefix)[cache_argument(model.model)]
        last = (mask.sum(-1, keepdim=True) - 1)
        shared = model(input_ids=ids[:, -1:], attention_mask=mask, position_ids=last,
                       **{cache_argument(model.model): cache}).logits[:, -1]
        ids, mask = left_padded(prompts, tokenizer.pad_token_id)
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        plain = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
    assert torch.allclose(shared, plain, rtol=0, atol=1e-10)
