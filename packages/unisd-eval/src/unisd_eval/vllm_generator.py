"""``unisd eval --backend vllm``: generation with a vLLM engine (GPU machines with vLLM installed).

A plain model directory (or hub id) is served as it is. A LoRA run's ``final/`` (an adapter) is served
as its base model plus the adapter as a ``LoRARequest``, so nothing is merged or copied. Prompts are
rendered exactly as the HF path renders them (chat template, system prompt) and passed as token ids.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console

from unisd.data.tasks import Example
from unisd.errors import UsageError

GPU_MEMORY_UTILIZATION = 0.85  # evaluation only: the engine has the GPU to itself


class VLLMGenerator:
    """Completes examples' prompts with vLLM: greedy, or sampled at a temperature (as ``Generator``)."""

    def __init__(self, model_ref: str, max_new_tokens: int, batch_size: int, console: Console, dtype: str = "auto"):
        from unisd.model.models import load_tokenizer, resolve_model
        from unisd.model.vllm_backend import _require_vllm

        self._vllm = _require_vllm()
        source = resolve_model(model_ref, progress=console.print)
        self.tokenizer = load_tokenizer(source)
        self.max_new_tokens, self.batch_size, self.console = max_new_tokens, batch_size, console
        engine: dict[str, Any] = {"dtype": dtype, "gpu_memory_utilization": GPU_MEMORY_UTILIZATION, "seed": 0}
        adapter = Path(source) / "adapter_config.json"
        self.lora_request = None
        if adapter.is_file():
            settings = json.loads(adapter.read_text(encoding="utf-8"))
            base = settings.get("base_model_name_or_path")
            if not base:
                raise UsageError(f"--model {model_ref}: adapter_config.json names no base model "
                                 "(base_model_name_or_path); export a merged model with `unisd export` instead")
            base_source = resolve_model(base, progress=console.print)
            engine.update(model=base_source, tokenizer=source, enable_lora=True,
                          max_lora_rank=int(settings.get("r", 64)), max_loras=1)
            from vllm.lora.request import LoRARequest

            self.lora_request = LoRARequest("unisd-eval", 1, str(source))
        else:
            engine.update(model=source, tokenizer=source)
        try:
            self.llm = self._vllm.LLM(**engine)
        except ValueError as exc:  # vLLM's settings checks
            raise UsageError(f"vLLM refused to start an engine for {model_ref}: {' '.join(str(exc).split())[:600]}; "
                             "use --backend hf") from None

    def complete(self, examples: list[Example], temperature: float) -> list[str]:
        """One completion per example, in order (vLLM batches them itself)."""
        from unisd.data.prompts import encode, render_chat

        prompts = [{"prompt_token_ids": encode(self.tokenizer, render_chat(self.tokenizer, ex.prompt, ex.system))}
                   for ex in examples]
        sampling = self._vllm.SamplingParams(n=1, temperature=temperature, max_tokens=self.max_new_tokens)
        outputs = self.llm.generate(prompts, sampling, lora_request=self.lora_request, use_tqdm=False)
        return [out.outputs[0].text for out in outputs]
