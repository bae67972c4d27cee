"""Checkpoints: weights (adapter or full), optimizer, scheduler, RNG states, data cursor, components.

Each checkpoint is written into a temporary directory and renamed into place, so ``checkpoints/step-N``
either exists completely or not at all.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from . import atomic, distributed
from .errors import CheckpointError

STATE_FILE = "trainer_state.json"
T = TypeVar("T")


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        # This process's GPU only: a resume may see fewer GPUs (another sweep slot), and reading every
        # visible GPU's state would open a CUDA context on each of them from every process.
        state["cuda_device"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if not torch.cuda.is_available():
        return
    if "cuda_device" in state:
        torch.cuda.set_rng_state(state["cuda_device"])
    elif "cuda" in state:  # older checkpoints: one state per GPU that was visible then
        index = torch.cuda.current_device()
        if index < len(state["cuda"]):
            torch.cuda.set_rng_state(state["cuda"][index])


def save_weights(model: Any, tokenizer: Any, directory: Path, lora: bool, state: dict[str, Any] | None = None) -> None:
    """Adapter (LoRA) or full weights plus the tokenizer, loadable with ``from_pretrained``.

    ``state``: the whole weights by parameter name, for a sharded model (``sharding.full_model_state``).
    """
    if state is None:
        model.save_pretrained(directory)
    else:
        model.save_pretrained(directory, state_dict=state)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def load_weights(model: Any, directory: Path, lora: bool) -> None:
    """Load saved weights (adapter or full) into ``model``, sharded or not.

    A model sharded over several processes is read by the main process alone, which broadcasts each
    tensor while every process keeps its shard: no other process holds a whole copy.
    """
    from . import sharding

    if not sharding.is_sharded(model):
        _load_unsharded(model, directory, lora)
        return
    state, from_main = _read_once(model, lambda: _sharded_state_by_name(model, directory, lora))
    sharding.load_model_state(model, state or {}, from_main=from_main)


def _read_once(model: Any, read: Callable[[], T]) -> tuple[T | None, bool]:
    """``read()`` where a resume needs it: on the main process alone when ``model`` is sharded over
    several processes (the others get None and receive by broadcast), else on every process. Returns
    the value and whether it is to be broadcast from the main process."""
    from . import sharding

    if sharding.is_sharded(model) and distributed.current().active:
        return distributed.on_main_only(read, CheckpointError), True
    return read(), False


def _load_unsharded(model: Any, directory: Path, lora: bool) -> None:
    if lora:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, _read_adapter(directory))
        return
    missing, unexpected = model.load_state_dict(_read_full(directory), strict=False)
    # Tied lm-head weights are saved once; anything else missing means a different model.
    missing = [m for m in missing if not m.endswith("lm_head.weight")]
    if missing or unexpected:
        raise CheckpointError(f"{directory}: weights do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")


def _sharded_state_by_name(model: Any, directory: Path, lora: bool) -> dict[str, torch.Tensor]:
    """The saved tensors keyed by the (sharded) model's parameter names, checked against them."""
    if lora:
        from peft import get_peft_model_state_dict

        saved = _read_adapter(directory)
        # The adapter file names tensors without the adapter name; a sharded model loads by parameter name.
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        saved_name_of = get_peft_model_state_dict(model, state_dict={n: n for n in names})
        missing = [k for k in saved_name_of if k not in saved]
        if missing:
            raise CheckpointError(f"{directory / 'adapter_model.safetensors'}: adapter tensors missing ({missing[:3]}); "
                                  "was it saved by another model?")
        return {fqn: saved[key] for key, fqn in saved_name_of.items()}
    state = _read_full(directory)
    # every name of a tied weight counts (a sharded save lists the tied lm-head under both names)
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    names = params | {n for n, _ in model.named_buffers(remove_duplicate=False)}
    unknown = [k for k in state if k not in names]
    missing = [n for n in params if n not in state and not n.endswith("lm_head.weight")]
    if unknown or missing:
        raise CheckpointError(f"{directory}: weights do not match the model (missing {missing[:3]}, "
                              f"unexpected {unknown[:3]})")
    return state


def _read_adapter(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = directory / "adapter_model.safetensors"
    if not path.is_file():
        raise CheckpointError(f"{directory}: no adapter_model.safetensors (was this run trained with --full?)")
    return load_file(str(path))


def _read_full(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(directory.glob("model*.safetensors"))
    if not files:
        raise CheckpointError(f"{directory}: no model*.safetensors (was this run trained with LoRA?)")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def save_checkpoint(
    path: Path,
    *,
    model: Any,
    tokenizer: Any,
    lora: bool,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    step: int,
    cursor: int,
    components: list[Any],
    rng_states: list[dict[str, Any]] | None = None,
    model_state: dict[str, Any] | None = None,
    optimizer_state: dict[str, Any] | None = None,
    component_states: dict[str, Any] | None = None,
) -> None:
    """Write one checkpoint (main process). ``model_state``/``optimizer_state``: whole states gathered
    beforehand by every process (sharded runs); the optimizer state is keyed by parameter name, so a
    run can resume on another process count or with(out) sharding."""
    from . import sharding

    with atomic.directory(path) as tmp:
        save_weights(model, tokenizer, tmp, lora, state=model_state)
        if optimizer_state is None:
            optimizer_state = sharding.full_optimizer_state(model, optimizer)
        torch.save(optimizer_state, tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        # One RNG state per process, so a resumed run samples exactly what the original would have.
        torch.save(rng_states or [rng_state()], tmp / "rng.pt")
        if component_states is None:
            component_states = gather_component_states(components)
        torch.save(component_states, tmp / "components.pt")
        (tmp / STATE_FILE).write_text(json.dumps({"step": step, "cursor": cursor, "lora": lora}, indent=2))


def _named_optimizer_state(model: Any, state: dict[str, Any], path: Path) -> dict[str, Any]:
    """An optimizer state saved by position (before checkpoints named their parameters) keyed by
    parameter name: the optimizer held the trainable parameters in ``named_parameters`` order."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    count = sum(len(g["params"]) for g in state["param_groups"])
    if count != len(names):
        raise CheckpointError(f"{path}: the optimizer state holds {count} parameters, the model trains {len(names)}")
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]
    return {"state": {names[i]: v for i, v in state["state"].items()}, "param_groups": groups}


def gather_component_states(components: list[Any]) -> dict[str, Any]:
    """Every stateful component's state, with sharded tensors made whole (collective under sharding:
    every process calls it)."""
    from . import sharding

    return sharding.whole_tree({c.name: c.state_dict() for c in components if hasattr(c, "state_dict")})


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete ``checkpoints/step-N`` of a run directory (temporary ones are ignored)."""
    found = []
    for child in (run_dir / "checkpoints").glob("step-*"):
        m = re.fullmatch(r"step-(\d+)", child.name)
        if m and (child / STATE_FILE).is_file():
            found.append((int(m.group(1)), child))
    return max(found)[1] if found else None


def find_resume_point(path: str | Path) -> tuple[Path, Path]:
    """``--resume`` takes a run directory (its latest checkpoint) or a checkpoint directory."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path.parent.parent, path
    if not path.is_dir():
        raise CheckpointError(f"--resume {path}: no such directory")
    ckpt = latest_checkpoint(path)
    if ckpt is None:
        raise CheckpointError(f"--resume {path}: no checkpoints/step-N in this run directory; nothing to resume")
    return path, ckpt


def load_checkpoint(
    path: Path, *, model: Any, lora: bool, optimizer: torch.optim.Optimizer, scheduler: Any, components: list[Any],
    rank: int = 0,
) -> dict[str, Any]:
    state = json.loads((path / STATE_FILE).read_text())
    if state.get("lora", lora) != lora:
        raise CheckpointError(f"{path}: saved with lora={state['lora']}, resumed with lora={lora}")
    load_weights(model, path, lora)
    from . import sharding

    def read_optimizer_state() -> dict[str, Any]:
        optim_state = torch.load(path / "optimizer.pt", weights_only=False)
        groups = optim_state.get("param_groups") or [{}]
        if groups[0].get("params") and isinstance(groups[0]["params"][0], int):  # positional (older checkpoints)
            optim_state = _named_optimizer_state(model, optim_state, path)
        return optim_state

    optim_state, from_main = _read_once(model, read_optimizer_state)  # the largest state of all
    sharding.load_optimizer_state(model, optimizer, optim_state or {}, from_main=from_main)
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    saved = torch.load(path / "components.pt", weights_only=False)
    for comp in components:
        if hasattr(comp, "load_state_dict"):
            if comp.name not in saved:
                raise CheckpointError(f"{path}: no saved state for component '{comp.name}'")
            comp.load_state_dict(saved[comp.name])
    states = torch.load(path / "rng.pt", weights_only=False)
    if rank < len(states):
        set_rng_state(states[rank])
    else:  # resumed on more processes than saved: a fresh, deterministic stream for the new ones
        torch.manual_seed(1_000_003 * (state["step"] + 1) + rank)
    return state
