"""`unisd eval --backend vllm` against a stand-in vLLM module (the real one needs a GPU machine)."""

from __future__ import annotations

import json
import shutil
import sys
import types

import pytest
from typer.testing import CliRunner

from unisd.cli.app import make_app
from unisd.plugins import get_plugin_manager
from unisd.testing import make_tiny_model_dir


@pytest.fixture
def fake_vllm(monkeypatch):
    calls = {"engines": [], "generate": []}

    class LLM:
        def __init__(self, **kwargs):
            calls["engines"].append(kwargs)

        def generate(self, prompts, sampling, lora_request=None, use_tqdm=True):
            calls["generate"].append((prompts, sampling, lora_request))
            return [types.SimpleNamespace(outputs=[types.SimpleNamespace(text="ANSWER")]) for _ in prompts]

    class SamplingParams:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

    class LoRARequest:
        def __init__(self, name, id_, path):
            self.name, self.id, self.path = name, id_, path

    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams = LLM, SamplingParams
    lora = types.ModuleType("vllm.lora")
    request = types.ModuleType("vllm.lora.request")
    request.LoRARequest = LoRARequest
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.lora", lora)
    monkeypatch.setitem(sys.modules, "vllm.lora.request", request)
    return calls


def test_a_model_directory_is_served_as_it_is(fake_vllm, tmp_path):
    model = make_tiny_model_dir(tmp_path / "model")
    out = tmp_path / "eval"
    result = CliRunner().invoke(make_app(get_plugin_manager()), [
        "eval", "demo", "--model", str(model), "--backend", "vllm", "--limit", "3", "--dtype", "bfloat16",
        "--output", str(out)])
    assert result.exit_code == 0, result.output
    (engine,) = fake_vllm["engines"]
    assert engine["model"] == str(model.resolve()) and engine["dtype"] == "bfloat16" and "enable_lora" not in engine
    (prompts, sampling, lora), = fake_vllm["generate"]
    assert len(prompts) == 3 and all(p["prompt_token_ids"] for p in prompts) and lora is None
    assert sampling.kwargs["temperature"] == 0.0 and sampling.kwargs["max_tokens"] > 0
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["backend"] == "vllm" and results["metrics"]["items"] == 3
    assert [json.loads(line)["completion"] for line in (out / "predictions.jsonl").read_text().splitlines()] == [
        "ANSWER"] * 3


def test_a_lora_run_is_served_as_its_base_plus_the_adapter(fake_vllm, tmp_path):
    base = make_tiny_model_dir(tmp_path / "base")
    adapter = tmp_path / "final"
    shutil.copytree(base, adapter)  # tokenizer files, as final/ holds them
    (adapter / "config.json").unlink()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base), "r": 16}))
    result = CliRunner().invoke(make_app(get_plugin_manager()), [
        "eval", "demo", "--model", str(adapter), "--backend", "vllm", "--limit", "2", "--output", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    (engine,) = fake_vllm["engines"]
    assert engine["model"] == str(base.resolve()) and engine["enable_lora"] and engine["max_lora_rank"] == 16
    (_, _, lora), = fake_vllm["generate"]
    assert lora.path == str(adapter.resolve())


def test_without_vllm_it_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError
    model = make_tiny_model_dir(tmp_path / "model")
    result = CliRunner().invoke(make_app(get_plugin_manager()), [
        "eval", "demo", "--model", str(model), "--backend", "vllm", "--output", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "needs vLLM" in result.output
    bad = CliRunner().invoke(make_app(get_plugin_manager()), [
        "eval", "demo", "--model", str(model), "--backend", "tgi", "--output", str(tmp_path / "o2")])
    assert bad.exit_code == 2 and "--backend must be one of hf, vllm" in bad.output
