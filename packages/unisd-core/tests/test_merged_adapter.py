"""Generation with the LoRA adapter merged into its base weights: the adapter path's logits and samples
(float64), the base weights, switches and gradient flags restored exactly, and the adapter path kept
wherever a merge would not be the same model."""

from __future__ import annotations

import pytest
import torch

from unisd.model.merged_adapter import adapter_merged, mergeable_layers
from unisd.model.models import apply_lora
from unisd.model.rollout import HFBackend, SamplingParams
from unisd.testing import make_tiny_model, make_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def lora_model(tokenizer, arch: str = "llama", seed: int = 0, **lora):
    """A float64 tiny model with a LoRA adapter whose B is random (PEFT starts it at zero: no effect)."""
    model = apply_lora(make_tiny_model(tokenizer, arch=arch, seed=seed).double(), r=4, alpha=8, dropout=0.0, **lora)
    generator = torch.Generator().manual_seed(seed)  # str hashes change per process: one seeded stream instead
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3, generator=generator)
    return model.eval()


def count_adapter_calls(model) -> tuple[list[int], list]:
    calls = [0]
    hooks = [m.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
             for name, m in model.named_modules() if name.endswith("lora_A.default")]
    return calls, hooks


def random_ids(tokenizer, rows: int, width: int, seed: int) -> torch.Tensor:
    return torch.randint(3, len(tokenizer), (rows, width), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_the_merged_model_gives_the_adapter_paths_logits(tokenizer, arch):
    model = lora_model(tokenizer, arch)
    ids = random_ids(tokenizer, 3, 9, seed=1)
    calls, hooks = count_adapter_calls(model)
    with torch.no_grad():
        through_adapter = model(input_ids=ids).logits
        assert calls[0] > 0
        calls[0] = 0
        with adapter_merged(model):
            merged = model(input_ids=ids).logits
        assert calls[0] == 0  # the adapter layers did not run: their product is in the weights
        base = model.get_base_model()
        with model.disable_adapter():
            without = model(input_ids=ids).logits
    for h in hooks:
        h.remove()
    assert torch.allclose(merged, through_adapter, rtol=0, atol=1e-10)
    assert not torch.allclose(without, through_adapter, atol=1e-3)  # the adapter does change the model
    assert base is model.get_base_model()


def test_the_base_weights_switches_and_gradient_flags_come_back_exactly(tokenizer):
    model = lora_model(tokenizer)
    a_param = next(p for n, p in model.named_parameters() if "lora_A" in n)
    a_param.requires_grad_(False)  # one frozen adapter tensor must stay frozen
    params = dict(model.named_parameters())
    before = {n: (p, p.data.data_ptr(), p.detach().clone(), p.requires_grad, p._version) for n, p in params.items()}
    with pytest.raises(RuntimeError, match="inside"):
        with adapter_merged(model):
            base_weight = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
            assert not torch.equal(base_weight, before[next(n for n in params if n.endswith("q_proj.base_layer.weight"))][2])
            raise RuntimeError("a failure inside the block")
    for n, p in model.named_parameters():
        obj, ptr, value, flag, version = before[n]
        assert p is obj and p.data.data_ptr() == ptr and torch.equal(p, value), n
        assert p.requires_grad == flag and p._version == version, n
    assert all(not layer.disable_adapters for _, layer in mergeable_layers(model))


def test_reused_buffers_follow_the_adapters_current_values(tokenizer):
    """Training changes the adapter between generate calls: a kept buffer is merged again, never stale."""
    model = lora_model(tokenizer, seed=5)
    ids = random_ids(tokenizer, 2, 6, seed=5)
    buffers: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        with adapter_merged(model, buffers=buffers):
            model(input_ids=ids)
        kept = {name: t.data_ptr() for name, t in buffers.items()}
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.mul_(-1.5)  # an optimiser step, in place
        expected = model(input_ids=ids).logits
        with adapter_merged(model, buffers=buffers):
            merged = model(input_ids=ids).logits
    assert {name: t.data_ptr() for name, t in buffers.items()} == kept  # the same memory, merged again
    assert torch.allclose(merged, expected, rtol=0, atol=1e-10)


def test_a_gpt2_conv1d_adapter_merges_transposed(tokenizer):
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=64)).double()
    model = get_peft_model(gpt2, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["c_attn", "c_fc"],
                                            fan_in_fan_out=True))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    model.eval()
    ids = random_ids(tokenizer, 2, 7, seed=2)
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        with adapter_merged(model):
            merged = model(input_ids=ids).logits
    assert torch.allclose(merged, plain, rtol=0, atol=1e-10)


def test_sampling_with_the_merged_adapter_draws_the_same_tokens(tokenizer, monkeypatch):
    # both through generate: merged, a CPU would otherwise decode with the lean loop, whose sampler draws other
    # random numbers (test_lean_decode compares the loop with generate, merged and not)
    monkeypatch.setenv("UNISD_LEAN_DECODING", "0")
    model = lora_model(tokenizer, seed=3)
    prompts = [random_ids(tokenizer, 1, n, seed=n)[0].tolist() for n in (5, 9, 7, 9)]
    params = SamplingParams(temperature=1.0, max_new_tokens=8)
    samples = []
    for merge in (True, False):
        calls, hooks = count_adapter_calls(model)
        config = type("Config", (), {"merge_adapter_for_generation": "on" if merge else "off"})()
        torch.manual_seed(11)
        samples.append([c.ids for c in HFBackend(model, tokenizer, config=config).generate(prompts, params)])
        for h in hooks:
            h.remove()
        assert (calls[0] == 0) == merge  # the switch decides which path generation took
    assert samples[0] == samples[1]
    assert len({tuple(s) for s in samples[0]}) > 1


def test_generating_between_a_forward_and_its_backward_keeps_the_gradients(tokenizer):
    """leak-guard generates between the student's forward and backward: the merge must not disturb them."""
    model = lora_model(tokenizer, seed=4).train()
    ids = random_ids(tokenizer, 2, 8, seed=4)
    grads = []
    for generate_between in (False, True):
        model.zero_grad()
        loss = model(input_ids=ids).logits.square().mean()
        if generate_between:
            HFBackend(model, tokenizer).generate([ids[0].tolist()], SamplingParams(0.0, 1.0, 3))
            model.train()
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)


def test_no_merge_where_it_would_change_the_model(tokenizer):
    plain = make_tiny_model(tokenizer).double()
    assert mergeable_layers(plain) == []  # no adapter
    adapted = lora_model(tokenizer)
    assert mergeable_layers(adapted)
    with adapted.disable_adapter():  # the adapter-off teacher: nothing to merge
        assert mergeable_layers(adapted) == []
    from peft import LoraConfig, get_peft_model

    variant = get_peft_model(make_tiny_model(tokenizer).double(),
                             LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True))
    assert mergeable_layers(variant) == []
    with adapter_merged(variant) as same:
        assert same is variant
    half = apply_lora(make_tiny_model(tokenizer).bfloat16(), r=4, alpha=8, dropout=0.0)
    assert mergeable_layers(half) == []  # bf16 would round a small update away: through the adapter
    tied = apply_lora(make_tiny_model(tokenizer).double(), r=4, alpha=8, dropout=0.0, targets=["q_proj", "lm_head"])
    assert tied.get_base_model().lm_head.base_layer.weight is tied.get_input_embeddings().weight
    assert mergeable_layers(tied) == []  # merging the head would change the input embeddings too
    with adapter_merged(adapted, enabled=False):
        assert mergeable_layers(adapted)  # switched off: the adapter layers stay on and run


def test_the_setting_is_checked_and_auto_merges_on_a_cpu(tokenizer):
    from unisd.config import RunConfig
    from unisd.errors import ConfigError

    with pytest.raises(ConfigError, match="merge_adapter_for_generation must be one of auto, on, off"):
        RunConfig(merge_adapter_for_generation="yes").validate()
    model = lora_model(tokenizer, seed=6)
    calls, hooks = count_adapter_calls(model)
    HFBackend(model, tokenizer, config=RunConfig()).generate([[5, 6, 7]], SamplingParams(0.0, 1.0, 3))
    for h in hooks:
        h.remove()
    assert calls[0] == 0  # "auto" on this CPU: merged
