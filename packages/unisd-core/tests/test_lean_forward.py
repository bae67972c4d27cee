"""The lean forward (unisd.model.lean_forward) against transformers' and PEFT's own modules, in float64."""

from __future__ import annotations

import pytest
import torch

from unisd.model import lean_forward, scoring
from unisd.model.teacher import adapter_disabled
from unisd.testing import make_tiny_model, make_tokenizer

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def _model(tokenizer, arch="llama", kv_heads=2, seed=0):
    model = make_tiny_model(tokenizer, arch=arch, seed=seed)
    if kv_heads != model.config.num_key_value_heads:
        from transformers import AutoModelForCausalLM

        model.config.num_key_value_heads = kv_heads
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(model.config)
    # weights larger than a fresh model's, so that attention, positions and every projection matter
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.25)
    return model.to(torch.float64)


def _lora(model, dropout=0.0, seed=1, **options):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=PROJECTIONS, lora_dropout=dropout,
                                             **options))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:  # B starts at zero: give the adapter an effect
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3)
    return model


def _packed(pad_id, shared=20, seed=0, repeat=1):
    """Right-padded rows of different lengths opening with ``shared`` common tokens (the shared-prefix path)."""
    gen = torch.Generator().manual_seed(seed)
    head = torch.randint(5, 300, (shared,), generator=gen).tolist()
    prompts, completions = [], []
    for n_prompt, n_completion in ((3, 4), (1, 2), (6, 5)):
        prompt = head + torch.randint(5, 300, (n_prompt,), generator=gen).tolist()
        completion = torch.randint(5, 300, (n_completion,), generator=gen).tolist()
        for _ in range(repeat):
            prompts.append(prompt)
            completions.append(completion + torch.randint(5, 300, (1,), generator=gen).tolist())
    return scoring.pack(prompts, completions, pad_id)


def _count_lean_calls(monkeypatch):
    calls = []
    real = lean_forward.LeanForward.__call__
    monkeypatch.setattr(lean_forward.LeanForward, "__call__", lambda self, **kw: calls.append(1) or real(self, **kw))
    return calls


def _hidden_and_grads(model, packed, lean, monkeypatch, share_prompts=False, seed=0):
    """Completion hidden states (padding zeroed) and every trained parameter's gradient of a fixed random
    weighting of them, with the lean forward on or off; checks that it ran exactly when on."""
    monkeypatch.setenv("UNISD_LEAN_FORWARD", "1" if lean else "0")
    calls = _count_lean_calls(monkeypatch)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    torch.manual_seed(seed)
    hidden = scoring.completion_hidden(model, packed, share_prompts=share_prompts) * packed.mask[..., None]
    weights = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(7), dtype=hidden.dtype)
    (hidden * weights).sum().backward()
    assert bool(calls) == lean
    return hidden.detach(), [p.grad.clone() for p in params]


def _assert_close(first, second, rtol=1e-6):
    (h1, g1), (h2, g2) = first, second
    assert torch.allclose(h1, h2, rtol=rtol, atol=rtol * float(h1.abs().max()))
    assert len(g1) == len(g2) and g1
    for a, b in zip(g1, g2, strict=True):
        assert torch.allclose(a, b, rtol=rtol, atol=rtol * float(a.abs().max())), float((a - b).abs().max())


@pytest.mark.parametrize("arch,kv_heads,trained", [("llama", 2, "lora"), ("llama", 4, "lora"), ("qwen2", 2, "lora"),
                                                   ("llama", 2, "full"), ("qwen2", 2, "full")])
def test_hidden_states_and_gradients_equal_the_modules(tokenizer, arch, kv_heads, trained, monkeypatch):
    """Through ``completion_hidden`` (a shared prefix run once, then each row's rest on its cache): the
    states and the gradients of the adapter (or, fully trained, of every weight and bias) equal those of
    transformers' and PEFT's modules."""
    model = _model(tokenizer, arch, kv_heads)
    model = _lora(model) if trained == "lora" else model
    model.train()
    packed = _packed(tokenizer.pad_token_id)
    modules = _hidden_and_grads(model, packed, False, monkeypatch)
    lean = _hidden_and_grads(model, packed, True, monkeypatch)
    _assert_close(modules, lean)
    assert float(modules[0].abs().max()) > 0.1


def test_prompts_shared_by_several_completions(tokenizer, monkeypatch):
    """G completions per prompt: each prompt runs once and its cache is copied to its rows (reorder_cache)."""
    model = _lora(_model(tokenizer)).train()
    packed = _packed(tokenizer.pad_token_id, repeat=3)
    modules = _hidden_and_grads(model, packed, False, monkeypatch, share_prompts=True)
    lean = _hidden_and_grads(model, packed, True, monkeypatch, share_prompts=True)
    _assert_close(modules, lean)


def test_dropout_masks_are_peft_s(tokenizer, monkeypatch):
    """Under LoRA dropout the lean forward draws the same masks as PEFT for the same seed (equal gradients),
    and the dropout is in effect (other gradients than without it)."""
    model = _lora(_model(tokenizer), dropout=0.3).train()
    packed = _packed(tokenizer.pad_token_id)
    modules = _hidden_and_grads(model, packed, False, monkeypatch, seed=3)
    lean = _hidden_and_grads(model, packed, True, monkeypatch, seed=3)
    _assert_close(modules, lean)
    other_seed = _hidden_and_grads(model, packed, True, monkeypatch, seed=4)
    assert not torch.allclose(lean[1][0], other_seed[1][0])


def test_disabled_adapter_is_the_base_model(tokenizer, monkeypatch):
    """The teacher's view (adapters switched off by their flags, no gradients) runs the base weights alone."""
    base = _model(tokenizer)
    reference = scoring.completion_hidden(base, _packed(tokenizer.pad_token_id)).detach()
    model = _lora(_model(tokenizer)).eval()
    packed = _packed(tokenizer.pad_token_id)
    outputs = {}
    for lean in (False, True):
        monkeypatch.setenv("UNISD_LEAN_FORWARD", "1" if lean else "0")
        calls = _count_lean_calls(monkeypatch)
        with torch.no_grad(), adapter_disabled(model):
            outputs[lean] = scoring.completion_hidden(model, packed)
        assert bool(calls) == lean
    mask = packed.mask[..., None]
    assert torch.allclose(outputs[True] * mask, reference * mask, rtol=1e-6, atol=1e-6)
    assert torch.allclose(outputs[False] * mask, outputs[True] * mask, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        adapted = scoring.completion_hidden(model, packed)
    assert not torch.allclose(adapted * mask, reference * mask, atol=1e-3)


def test_left_padding_and_continuing_a_cache(tokenizer):
    """Called as the body is called: left-padded rows (queries with nothing to attend to stay finite) with
    explicit positions, then new tokens on the returned cache, against the body at every real position."""
    model = _lora(_model(tokenizer, kv_heads=4)).train()
    decoder = scoring.decoder_of(model)
    lean = lean_forward.lean_forward(model)
    assert lean is not None
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(5, 300, (3, 7), generator=gen)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[0, :3] = 0
    mask[2, :1] = 0
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    more = torch.randint(5, 300, (3, 2), generator=gen)
    full_mask = torch.cat([mask, torch.ones(3, 2, dtype=torch.long)], 1)
    more_positions = positions[:, -1:] + 1 + torch.arange(2)
    with torch.no_grad():
        expected = decoder(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        cache = scoring.returned_cache(expected)
        expected_more = decoder(input_ids=more, attention_mask=full_mask, position_ids=more_positions, use_cache=True,
                                **{scoring.cache_argument(decoder): cache}).last_hidden_state
        got = lean(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        got_more = lean(input_ids=more, attention_mask=full_mask, position_ids=more_positions, use_cache=True,
                        cache=got.cache).last_hidden_state
    real = mask.bool()
    assert torch.isfinite(got.last_hidden_state).all()
    assert torch.allclose(got.last_hidden_state[real], expected.last_hidden_state[real], rtol=1e-6, atol=1e-6)
    assert torch.allclose(got_more, expected_more, rtol=1e-6, atol=1e-6)
    assert got.cache.get_seq_length() == 7 and got.cache.layers[0].keys.shape[2] == 7


def _merged(model):
    model.merge_adapter()
    return model


def _hooked(model):
    scoring.decoder_of(model).layers[0].mlp.register_forward_hook(lambda *a: None)
    return model


def _checkpointed(model):
    model.gradient_checkpointing_enable()
    return model.train()


@pytest.mark.parametrize("variant", ["merged", "dora", "lora_bias", "hook", "checkpointing", "switch_off", "gpt2",
                                     "bf16"])
def test_other_bodies_keep_the_modules(tokenizer, variant, monkeypatch):
    """Whatever the lean forward does not repeat exactly leaves the forward to the modules."""
    if variant == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2))
    elif variant == "bf16":
        model = _lora(_model(tokenizer)).to(torch.bfloat16)
    elif variant == "dora":
        model = _lora(_model(tokenizer), use_dora=True)
    elif variant == "lora_bias":
        model = _lora(_model(tokenizer), lora_bias=True)
    else:
        model = _lora(_model(tokenizer))
        model = {"merged": _merged, "hook": _hooked, "checkpointing": _checkpointed}.get(variant, lambda m: m)(model)
    if variant == "switch_off":
        monkeypatch.setenv("UNISD_LEAN_FORWARD", "0")
    assert lean_forward.lean_forward(model) is None
    if variant not in ("gpt2", "bf16", "checkpointing"):  # and the same model, plain, is taken
        assert lean_forward.lean_forward(_lora(_model(tokenizer))) is not None or variant == "switch_off"


def test_two_active_adapters_keep_the_modules(tokenizer):
    from peft import LoraConfig

    model = _lora(_model(tokenizer))
    model.add_adapter("second", LoraConfig(r=2, target_modules=["q_proj"]))
    model.base_model.set_adapter(["default", "second"])
    assert lean_forward.lean_forward(model) is None


def test_float32_rows_padded_for_onednn(tokenizer, monkeypatch):
    """In float32 on oneDNN the token rows run padded to a kernel size (here 84 → 88): the padding never
    reaches real rows, and dropout is still drawn on the real rows in PEFT's order (float32 tolerance)."""
    from unisd.model import onednn

    if not onednn.enabled():
        pytest.skip("this PyTorch build has no usable oneDNN float32 product")
    model = _lora(_model(tokenizer).to(torch.float32), dropout=0.3).train()
    packed = _packed(tokenizer.pad_token_id, shared=22)  # 3 rows of 28 columns: 84 token rows
    rows = packed.input_ids.numel()
    assert onednn.padded_rows(rows) > rows
    monkeypatch.setattr(scoring, "MIN_SHARED_PREFIX", 10**9)  # one forward over all rows
    modules = _hidden_and_grads(model, packed, False, monkeypatch, seed=5)
    lean = _hidden_and_grads(model, packed, True, monkeypatch, seed=5)
    _assert_close(modules, lean, rtol=2e-4)
