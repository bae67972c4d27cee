"""Checkpoints: weights (adapter or full), optimizer, scheduler, RNG states, data cursor, components.

Each checkpoint is written into a temporary directory and renamed into place, so ``checkpoints/step-N``
either exists completely or not at all. Its ``manifest.json``, written last, lists every file with its
size and SHA-256: a checkpoint damaged later (a disk error, a half-finished copy) is recognised before
anything of it is loaded, and ``--resume`` falls back to the newest intact one.

Nothing in a checkpoint can run code when loaded: every ``torch.load`` is ``weights_only=True``, and
what is saved holds only tensors and plain data (dicts, lists, numbers, strings).
"""

from __future__ import annotations

import hashlib
import json
import pickle
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from ..components import implements
from ..errors import CheckpointError
from ..parallel import distributed
from . import atomic

STATE_FILE = "trainer_state.json"
MANIFEST = "manifest.json"
T = TypeVar("T")


def rng_state() -> dict[str, Any]:
    """This process's random number generator states, as tensors and plain data (``weights_only``-loadable)."""
    state = {"python": random.getstate(), "numpy": _numpy_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        # This process's GPU only: a resume may see fewer GPUs (another sweep slot), and reading every
        # visible GPU's state would open a CUDA context on each of them from every process.
        state["cuda_device"] = torch.cuda.get_rng_state()
    return state


def _numpy_state() -> dict[str, Any]:
    # np.random.get_state() holds a numpy array, which a weights-only load refuses: keep its key as a tensor.
    name, key, pos, has_gauss, cached = np.random.get_state()
    return {"name": name, "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def _set_numpy_state(state: Any) -> None:
    if isinstance(state, dict):
        key = state["key"].numpy().astype(np.uint32)
        state = (state["name"], key, state["pos"], state["has_gauss"], state["cached_gaussian"])
    np.random.set_state(state)  # older checkpoints: numpy's own tuple


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_python_state(state["python"]))
    _set_numpy_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if not torch.cuda.is_available():
        return
    if "cuda_device" in state:
        torch.cuda.set_rng_state(state["cuda_device"])
    elif "cuda" in state:  # older checkpoints: one state per GPU that was visible then
        index = torch.cuda.current_device()
        if index < len(state["cuda"]):
            torch.cuda.set_rng_state(state["cuda"][index])


def _python_state(state: Any) -> tuple[Any, ...]:
    # a weights-only load may give lists where tuples were saved; random.setstate wants tuples
    version, internal, gauss = state
    return version, tuple(internal), gauss


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
    from ..parallel import sharding

    if not sharding.is_sharded(model):
        _load_unsharded(model, directory, lora)
        return
    state, from_main = _read_once(model, lambda: _sharded_state_by_name(model, directory, lora))
    sharding.load_model_state(model, state or {}, from_main=from_main)


def _read_once(model: Any, read: Callable[[], T]) -> tuple[T | None, bool]:
    """``read()`` where a resume needs it: on the main process alone when ``model`` is sharded over
    several processes (the others get None and receive by broadcast), else on every process. Returns
    the value and whether it is to be broadcast from the main process."""
    from ..parallel import sharding

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
    return _unreadable_as_error(path, lambda: load_file(str(path)))


def _read_full(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(directory.glob("model*.safetensors"))
    if not files:
        raise CheckpointError(f"{directory}: no model*.safetensors (was this run trained with LoRA?)")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(_unreadable_as_error(f, lambda f=f: load_file(str(f))))
    return state


def _unreadable_as_error(path: Path, read: Callable[[], T]) -> T:
    """``read()``, with a damaged file (cut short, overwritten) as one CheckpointError naming it."""
    try:
        return read()
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 (safetensors, zip and JSON readers each raise their own types)
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: cannot be read ({first_line}); the file is damaged") from None


def load_pickled(path: Path) -> Any:
    """A ``.pt`` file of tensors and plain data. Anything else in it (a pickled class or function, which
    could run code as it loads) is refused unloaded: run directories may come from someone else."""

    def read() -> Any:
        try:
            with torch.serialization.safe_globals(_LEGACY_NUMPY_GLOBALS):
                return torch.load(path, weights_only=True)
        except pickle.UnpicklingError as exc:
            # the weights-only unpickler names the class or function it refused; other errors are bad bytes
            found = re.search(r"GLOBAL (\S+)", str(exc))
            if found is None:
                raise CheckpointError(f"{path}: cannot be read (not a torch file of tensors and plain data); "
                                      "the file is damaged") from None
            raise CheckpointError(
                f"{path}: refused, it holds Python objects other than tensors and plain data ({found.group(1)}), "
                "which could run code when loaded; unisd never writes those (was it altered, or saved by a plugin?)"
            ) from None

    return _unreadable_as_error(path, read)


def _legacy_numpy_globals() -> list[Any]:
    """What numpy arrays pickle as: RNG states of checkpoints older than the tensor form (rng_state)."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


_LEGACY_NUMPY_GLOBALS = _legacy_numpy_globals()


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
    from ..parallel import sharding

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
        _check_plain(component_states, "component state")
        torch.save(component_states, tmp / "components.pt")
        (tmp / STATE_FILE).write_text(json.dumps({"step": step, "cursor": cursor, "lora": lora}, indent=2))
        write_manifest(tmp)  # last: a checkpoint with a matching manifest is complete


_PLAIN = (str, int, float, bool, type(None), torch.Tensor, torch.dtype, torch.Size)


def _check_plain(value: Any, where: str) -> None:
    """Refuse to save what a weights-only load would refuse later (a plugin component's custom objects):
    better a clear error at the first checkpoint than a run that cannot be resumed."""
    if isinstance(value, dict):
        for key, item in value.items():
            _check_plain(key, where)
            _check_plain(item, f"{where}[{key!r}]")
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
    elif not isinstance(value, _PLAIN):
        raise CheckpointError(f"{where} is a {type(value).__name__}: a checkpoint holds only tensors and plain "
                              "data (dict, list, str, int, float, bool, None); convert it in state_dict()")


def _sha256(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def write_manifest(directory: Path) -> None:
    """``manifest.json``: every file of the checkpoint directory with its size and SHA-256."""
    files = {
        f.relative_to(directory).as_posix(): {"size": f.stat().st_size, "sha256": _sha256(f)}
        for f in sorted(directory.rglob("*")) if f.is_file() and f.name != MANIFEST
    }
    (directory / MANIFEST).write_text(json.dumps({"format": 1, "files": files}, indent=1) + "\n")


def checkpoint_problem(path: Path) -> str | None:
    """What is wrong with checkpoint directory ``path``, or None when it is whole.

    A checkpoint without a manifest (saved by an older unisd) is only checked for a readable state file.
    """
    problem = _manifest_problem(path) if (path / MANIFEST).is_file() else None
    if problem is not None:
        return problem
    try:
        state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"{STATE_FILE} is missing"
    except (OSError, ValueError) as exc:
        return f"{STATE_FILE} is unreadable ({exc})"
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or not isinstance(state.get("cursor"), int):
        return f"{STATE_FILE} lacks its step or data cursor"
    return None


def _manifest_problem(path: Path) -> str | None:
    """The first file that differs from the manifest (missing, another size, another checksum)."""
    try:
        files = json.loads((path / MANIFEST).read_text(encoding="utf-8"))["files"]
        entries = [(name, int(entry["size"]), str(entry["sha256"])) for name, entry in files.items()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return f"{MANIFEST} is unreadable ({type(exc).__name__})"
    for name, size, digest in entries:
        file = path / name
        if Path(name).is_absolute() or ".." in Path(name).parts or not file.is_file():
            return f"{name} is missing"
        actual = file.stat().st_size
        if actual != size:
            return f"{name} has {actual} bytes, the manifest says {size} (cut short or overwritten)"
        if _sha256(file) != digest:
            return f"{name} does not match its checksum"
    return None


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
    from ..parallel import sharding

    return sharding.whole_tree({c.name: c.state_dict() for c in components if implements(c, "state_dict")})


def checkpoints_newest_first(run_dir: Path) -> list[Path]:
    """Every ``checkpoints/step-N`` of a run directory, newest first (temporary ones are ignored)."""
    found = []
    for child in (run_dir / "checkpoints").glob("step-*"):
        m = re.fullmatch(r"step-(\d+)", child.name)
        if m and child.is_dir():
            found.append((int(m.group(1)), child))
    return [path for _, path in sorted(found, reverse=True)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest ``checkpoints/step-N`` of a run directory that has its state file (not verified)."""
    found = [p for p in checkpoints_newest_first(run_dir) if (p / STATE_FILE).is_file()]
    return found[0] if found else None


def resume_target(path: str | Path) -> tuple[Path, Path | None]:
    """``--resume`` takes a run directory or one of its checkpoints: (run directory, that checkpoint or None).

    A run directory needs its ``config.toml`` (a run stopped before its first checkpoint resumes from
    step 0) or a checkpoint.
    """
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path.parent.parent, path
    if not path.is_dir():
        raise CheckpointError(f"--resume {path}: no such directory")
    if not (path / "config.toml").is_file() and not checkpoints_newest_first(path):
        raise CheckpointError(f"--resume {path}: no config.toml or checkpoints/step-N in this run directory; "
                              "nothing to resume")
    return path, None


def choose_checkpoint(run_dir: Path, chosen: Path | None, warn: Callable[[str], None]) -> Path | None:
    """The checkpoint to resume from: ``chosen`` when it is intact, else the newest intact one of the
    run, with a warning for each damaged one passed over. None: the run has no checkpoint at all."""
    if chosen is not None:
        problem = checkpoint_problem(chosen)
        if problem is not None:
            raise CheckpointError(f"--resume {chosen}: the checkpoint is damaged ({problem}); resume from the run "
                                  f"directory {run_dir} to use its newest intact checkpoint")
        return chosen
    damaged = []
    for ckpt in checkpoints_newest_first(run_dir):
        problem = checkpoint_problem(ckpt)
        if problem is None:
            for name, why in damaged:
                warn(f"{run_dir / 'checkpoints' / name} is damaged ({why}); resuming from {ckpt.name} instead")
            return ckpt
        damaged.append((ckpt.name, problem))
    if damaged:
        listed = "; ".join(f"{name}: {why}" for name, why in damaged)
        raise CheckpointError(f"--resume {run_dir}: no intact checkpoint ({listed})")
    return None


def load_checkpoint(
    path: Path, *, model: Any, lora: bool, optimizer: torch.optim.Optimizer, scheduler: Any, components: list[Any],
    rank: int = 0,
) -> dict[str, Any]:
    state = _unreadable_as_error(path / STATE_FILE, lambda: json.loads((path / STATE_FILE).read_text()))
    if state.get("lora", lora) != lora:
        raise CheckpointError(f"{path}: saved with lora={state['lora']}, resumed with lora={lora}")
    load_weights(model, path, lora)
    from ..parallel import sharding

    def read_optimizer_state() -> dict[str, Any]:
        optim_state = load_pickled(path / "optimizer.pt")
        groups = optim_state.get("param_groups") or [{}]
        if groups[0].get("params") and isinstance(groups[0]["params"][0], int):  # positional (older checkpoints)
            optim_state = _named_optimizer_state(model, optim_state, path)
        return optim_state

    optim_state, from_main = _read_once(model, read_optimizer_state)  # the largest state of all
    sharding.load_optimizer_state(model, optimizer, optim_state or {}, from_main=from_main)
    scheduler.load_state_dict(load_pickled(path / "scheduler.pt"))
    saved = load_pickled(path / "components.pt")
    for comp in components:
        if implements(comp, "load_state_dict"):
            if comp.name not in saved:
                raise CheckpointError(f"{path}: no saved state for component '{comp.name}'")
            comp.load_state_dict(saved[comp.name])
    states = load_pickled(path / "rng.pt")
    if rank < len(states):
        set_rng_state(states[rank])
    else:  # resumed on more processes than saved: a fresh, deterministic stream for the new ones
        torch.manual_seed(1_000_003 * (state["step"] + 1) + rank)
    return state
