"""Rows that share a prompt run it once (issue 17: G completions per prompt): the teacher's hidden states
equal the plain path's, in float64, on both architectures, whatever the prompt and completion lengths."""

from __future__ import annotations

import random

import pytest
import torch

from unisd.model.scoring import completion_hidden, pack, prompt_groups, shared_prompt_hidden
from unisd.testing import make_tiny_model, make_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def random_rows(rng: random.Random, vocab: int, prompts: int, repeats: list[int], c_max: int):
    """Prompts of varied lengths, each repeated as asked (shuffled rows), with completions of 1..c_max."""
    distinct = [[rng.randrange(3, vocab) for _ in range(rng.randint(2, 14))] for _ in range(prompts)]
    rows = [p for p, r in zip(distinct, repeats, strict=True) for _ in range(r)]
    rng.shuffle(rows)
    completions = [[rng.randrange(3, vocab) for _ in range(rng.randint(1, c_max))] for _ in rows]
    return rows, completions


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize(("seed", "repeats", "c_max"), [(0, [4, 4], 6), (1, [1, 3, 2], 5), (2, [8], 1), (3, [2, 1], 9)])
def test_a_shared_prompt_gives_the_plain_paths_hidden_states(tokenizer, arch, seed, repeats, c_max):
    model = make_tiny_model(tokenizer, arch=arch, seed=seed).double().eval()
    rows, completions = random_rows(random.Random(seed), len(tokenizer), len(repeats), repeats, c_max)
    packed = pack(rows, completions, tokenizer.pad_token_id)
    with torch.no_grad():
        plain = completion_hidden(model, packed)
        shared = shared_prompt_hidden(model, packed)
        through_the_flag = completion_hidden(model, packed, share_prompts=True)
    assert shared is not None and shared.shape == plain.shape
    keep = packed.mask.bool()
    assert torch.allclose(shared[keep], plain[keep], rtol=0, atol=1e-10)
    assert torch.equal(through_the_flag, shared)


def test_rows_that_share_nothing_take_the_plain_path(tokenizer):
    model = make_tiny_model(tokenizer).double().eval()
    packed = pack([[5, 6, 7], [5, 6]], [[8, 9], [7, 9]], tokenizer.pad_token_id)  # a prefix is not a prompt
    assert prompt_groups(packed) is None
    assert shared_prompt_hidden(model, packed) is None
    empty = pack([[5, 6], [5, 6]], [[8], []], tokenizer.pad_token_id)  # a row without completion tokens
    assert prompt_groups(empty) is None


def test_groups_name_each_rows_prompt():
    packed = pack([[1, 2], [3], [1, 2], [3], [4, 4]], [[9], [9, 9], [8], [7], [6]], 0)
    assert prompt_groups(packed) == ([0, 1, 4], [0, 1, 0, 1, 2])


def test_without_the_flag_nothing_is_shared(tokenizer, monkeypatch):
    model = make_tiny_model(tokenizer).double().eval()
    packed = pack([[5, 6, 7], [5, 6, 7]], [[8, 9], [7]], tokenizer.pad_token_id)
    calls = []
    monkeypatch.setattr("unisd.model.scoring.shared_prompt_hidden", lambda *a: calls.append(a) or None)
    completion_hidden(model, packed)
    with torch.no_grad():
        completion_hidden(model, packed)
    assert not calls
    completion_hidden(model, packed, share_prompts=True)
    assert len(calls) == 1


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_shared_prompt_gets_the_sum_of_its_rows_gradients(tokenizer, arch):
    """With gradients (the student): the same loss and parameter gradients as the plain path, float64."""
    rows, completions = random_rows(random.Random(5), len(tokenizer), 3, [3, 1, 2], 6)
    packed = pack(rows, completions, tokenizer.pad_token_id)
    weights = torch.randn(packed.mask.shape + (32,), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    results = []
    for share in (False, True):
        model = make_tiny_model(tokenizer, arch=arch, seed=5).double().train()
        hidden = completion_hidden(model, packed, share_prompts=share)
        loss = (hidden * weights * packed.mask.double()[..., None]).sum()
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (plain_loss, plain_grads), (shared_loss, shared_grads) = results
    assert torch.allclose(shared_loss, plain_loss, rtol=1e-12, atol=0)
    assert plain_grads.keys() == shared_grads.keys() and len(plain_grads) > 5
    for name, grad in plain_grads.items():  # norm-wise: the two paths sum in other orders
        assert float((shared_grads[name] - grad).norm()) <= 1e-7 * float(grad.norm()), name


# ----------------------------------------------------------------------------------------------
# G completions per prompt in a step (--num-generations)


def _run(model_dir, data, **overrides):
    from unisd.config import RunConfig
    from unisd.io.reporting import Reporter
    from unisd.plugins import get_plugin_manager
    from unisd.run import build_run

    cfg = RunConfig(model=str(model_dir), data=str(data), lora_dropout=0.0, max_new_tokens=8, **overrides)
    return build_run(cfg, get_plugin_manager(load_entry_points=False), Reporter(), None)


@pytest.mark.parametrize("lora", [True, False])
def test_a_step_over_repeated_prompts_has_the_plain_loss_and_gradients(tiny_llama, toy_data, monkeypatch, lora):
    """G = 4 completions of each of 2 prompts: teacher and student run each prompt once, and the step's
    loss, statistics and gradients are those of scoring every row on its own (no dropout)."""
    from unisd.model import scoring
    from unisd.model import teacher as teacher_module
    from unisd.model.rollout import Completion
    from unisd.step import distill_step

    results = []
    real = teacher_module.completion_hidden
    real_shared = scoring.shared_prompt_hidden
    ran_shared: list[bool] = []
    monkeypatch.setattr(scoring, "shared_prompt_hidden",
                        lambda m, p: (out := real_shared(m, p), ran_shared.append(out is not None))[0])
    for share in (True, False):
        # G = 1 turns sharing off in teacher and student; the micro-batches are the same either way
        run = _run(tiny_llama, toy_data, batch_size=4, grad_accum=2, num_generations=4 if share else 1, lora=lora)
        torch.manual_seed(7)
        with torch.no_grad():  # the student away from the teacher, so the loss and gradients are not ~0
            for name, p in run.model.named_parameters():
                if p.requires_grad:
                    p.normal_(0, 0.05) if "lora_B" in name else p.add_(torch.randn_like(p) * 0.05)
        examples = [ex for ex in run.examples[:2] for _ in range(4)]
        gen = torch.Generator().manual_seed(3)
        completions = [Completion(torch.randint(10, len(run.tokenizer) - 1, (2 + i % 5,), generator=gen).tolist(),
                                  truncated=i % 3 == 2) for i in range(8)]
        spy: list[bool] = []
        monkeypatch.setattr(teacher_module, "completion_hidden",
                            lambda m, p, share_prompts=False, spy=spy: spy.append(share_prompts) or real(m, p, share_prompts))
        stats = distill_step(run, examples, completions)
        grads = [p.grad.detach().clone() for p in run.model.parameters() if p.requires_grad]
        results.append((stats, grads, spy))
    (shared_stats, shared_grads, shared_spy), (plain_stats, plain_grads, plain_spy) = results
    assert all(shared_spy) and not any(plain_spy)
    assert ran_shared and all(ran_shared)  # the shared path really ran (no fallback to the plain one)
    for key in ("loss", "divergence", "loss_tokens"):
        assert shared_stats[key] == pytest.approx(plain_stats[key], rel=1e-5, abs=1e-7), key
    for a, b in zip(shared_grads, plain_grads, strict=True):
        assert float((a - b).norm()) <= 1e-5 * float(b.norm()) + 1e-9


def test_num_generations_must_divide_the_steps_completions():
    from unisd.config import RunConfig
    from unisd.errors import ConfigError

    with pytest.raises(ConfigError, match=r"--num-generations 3 must divide the completions of a step.*= 8"):
        RunConfig(batch_size=4, grad_accum=2, num_generations=3).validate()
    with pytest.raises(ConfigError, match="--num-generations must be ≥ 1"):
        RunConfig(num_generations=0).validate()
    with pytest.raises(ConfigError, match="at temperature 0 samples the same completion"):
        RunConfig(batch_size=4, grad_accum=1, num_generations=2, temperature=0.0).validate()
    RunConfig(batch_size=4, grad_accum=2, num_generations=8).validate()


def test_training_draws_each_prompt_once_and_samples_it_g_times(tiny_llama, toy_data, tmp_path, monkeypatch):
    from unisd.config import RunConfig
    from unisd.loop import train
    from unisd.model.rollout import HFBackend
    from unisd.plugins import get_plugin_manager

    seen = []
    real = HFBackend.generate
    monkeypatch.setattr(HFBackend, "generate", lambda self, prompts, params: seen.append(prompts) or real(self, prompts, params))
    train(RunConfig(model=str(tiny_llama), data=str(toy_data), output=str(tmp_path / "run"), steps=2, batch_size=3,
                    grad_accum=2, num_generations=3, max_new_tokens=4, eval_before_after=False),
          get_plugin_manager(load_entry_points=False))
    assert len(seen) == 2 and all(len(prompts) == 6 for prompts in seen)
    for prompts in seen:  # two prompts per step, each in 3 consecutive rows
        assert prompts[0] == prompts[1] == prompts[2] and prompts[3] == prompts[4] == prompts[5]
        assert prompts[0] != prompts[3]
    assert seen[0][0] != seen[1][0]  # the stream moved on by 2 prompts, not 6


@pytest.mark.parametrize("kind", ["mistral", "qwen2-window", "flash"])
def test_sliding_windows_and_other_kernels_score_each_row_alone(tokenizer, kind):
    """A padded prompt leaves a gap before its completion: a sliding window counts it as positions (it
    would hide keys the plain path sees), and other kernels may not mask it. Those take the plain path."""
    from transformers import MistralConfig, MistralForCausalLM

    if kind == "mistral":
        model = MistralForCausalLM(MistralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                 sliding_window=6))
    elif kind == "qwen2-window":
        model = make_tiny_model(tokenizer, arch="qwen2")
        model.config.use_sliding_window, model.config.sliding_window = True, 6
        model.config.layer_types = ["sliding_attention"] * model.config.num_hidden_layers
    else:
        model = make_tiny_model(tokenizer)
        model.config._attn_implementation = "flash_attention_2"
    packed = pack([[5, 6, 7, 8, 9, 10], [5, 6, 7, 8, 9, 10], [4, 4]], [[8] * 8, [7] * 8, [3] * 8],
                  tokenizer.pad_token_id)
    with torch.no_grad():
        assert shared_prompt_hidden(model.eval(), packed) is None


def test_the_startup_summary_says_how_many_prompts_and_completions():
    from unisd.config import RunConfig
    from unisd.io.reporting import startup_summary

    text = startup_summary("m", 1, 2, 3, RunConfig(batch_size=4, grad_accum=2, num_generations=4), [], "out")
    assert "effective batch 8 (4 x 2 accumulation; 2 prompts x 4 completions each)" in text
    assert "completions each" not in startup_summary("m", 1, 2, 3, RunConfig(batch_size=4, grad_accum=2), [], "out")
