"""The teacher's adapter switch (unisd.model.teacher.adapter_disabled): under no_grad only the layers'
flags, with the same hidden states as PEFT's own context, every flag given back, and PEFT's context
wherever gradients are on."""

from __future__ import annotations

import pytest
import torch

from unisd.model import teacher as teacher_module
from unisd.model.models import apply_lora
from unisd.model.scoring import pack
from unisd.model.teacher import AdapterDisabledTeacher, adapter_disabled
from unisd.testing import make_tiny_model, make_tokenizer


@pytest.fixture
def model():
    tokenizer = make_tokenizer()
    peft_model = apply_lora(make_tiny_model(tokenizer, hidden=32, layers=2, seed=5).double(), r=4, alpha=8,
                            dropout=0.0)
    with torch.no_grad():  # PEFT starts B at zero, where the adapter changes nothing
        gen = torch.Generator().manual_seed(0)
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3)
    return peft_model.train()


@pytest.fixture
def peft_calls(monkeypatch) -> list[int]:
    calls = [0]
    real = teacher_module._peft_adapter_disabled

    def counted(model):
        calls[0] += 1
        return real(model)

    monkeypatch.setattr(teacher_module, "_peft_adapter_disabled", counted)
    return calls


def flags(model) -> list[bool]:
    return [m._disable_adapters for m in model.modules() if "_disable_adapters" in vars(m)]


def packed_batch():
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 60, (n,), generator=gen).tolist() for n in (7, 11, 9)]
    completions = [torch.randint(3, 60, (n,), generator=gen).tolist() for n in (4, 6, 5)]
    return pack(prompts, completions, 0)


def test_the_flag_switch_gives_peft_contexts_hidden_states(model, peft_calls):
    batch = packed_batch()
    fast = AdapterDisabledTeacher(model).hidden(batch)
    assert peft_calls[0] == 0
    with torch.no_grad(), teacher_module._peft_adapter_disabled(model):
        with teacher_module.eval_mode(model):
            want = teacher_module.completion_hidden(model, batch)
    torch.testing.assert_close(fast, want, rtol=0, atol=0)
    with torch.no_grad():  # and the adapter matters here: the student's own states differ
        with teacher_module.eval_mode(model):
            student = teacher_module.completion_hidden(model, batch)
    assert (student - fast).abs().max() > 1e-3
    assert model.training and not any(flags(model))


def test_each_layer_gets_its_own_flag_back_and_no_grad_flag_moves(model, peft_calls):
    layers = [m for m in model.modules() if "_disable_adapters" in vars(m)]
    layers[1]._disable_adapters = True  # one layer already off
    before = flags(model)
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    with torch.no_grad(), adapter_disabled(model):
        assert all(flags(model)) and model._adapters_disabled
        assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert flags(model) == before and not model._adapters_disabled
    with pytest.raises(RuntimeError, match="inside"), torch.no_grad(), adapter_disabled(model):
        raise RuntimeError("inside")
    assert flags(model) == before
    assert peft_calls[0] == 0


def test_with_gradients_on_peft_switches_the_adapter(model, peft_calls):
    with adapter_disabled(model):
        assert all(flags(model))
        assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)
    assert peft_calls[0] == 1
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)
    assert not any(flags(model))
