"""Sharded data parallelism: parameters, gradients and optimizer state split over processes (FSDP2).

Plain data parallelism (``distributed.py``) keeps a whole model on every process. Sharding keeps
1/N of it: each transformer block and then the whole model become ``torch.distributed.fsdp.fully_shard``
units, whose parameters are gathered just for the computation that needs them.

Self-distillation does more with a model than call ``forward``: it runs the decoder body directly
(hidden states, never full logits), applies the lm-head weight in chunks, lets the teacher reuse the
same weights, and generates. So the loop brackets that work explicitly:

- ``forward_call(model, fn, ...)``: runs ``fn`` as a forward of the root unit, so the embedding, the
  final norm and the lm-head are gathered for it and their gradients are reduced after backward;
- ``gathered(model)``: the root unit's parameters gathered for no-grad work (teacher, generation);
- ``generation_kwargs(model)``: generate keeps every process stepping until all are done (the
  blocks' all-gathers are collectives: one process stopping early would hang the others).

The settings come from ``--shard fsdp`` or are passed through from the launcher: an accelerate config
with FSDP (``accelerate launch --use_fsdp ...``) or DeepSpeed ZeRO, or a DeepSpeed JSON file
(``--deepspeed ds.json``). ZeRO stages map onto the equivalent FSDP2 sharding; DeepSpeed's own engine
is not used, and settings that have no equivalent are reported, never silently dropped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import types
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import SHARD_CHOICES
from ..errors import ConfigError, UsageError


@dataclass(frozen=True)
class ShardPlan:
    """How to shard: the FSDP2 settings, where they came from, and what of the source was ignored."""

    reshard_after_forward: bool = True  # FULL_SHARD / ZeRO-3; False: SHARD_GRAD_OP / ZeRO-1,2
    cpu_offload: bool = False  # parameters, gradients and the optimizer step on the CPU
    param_dtype: str | None = None  # mixed precision: compute in this dtype, reduce gradients in fp32
    activation_checkpointing: bool = False
    hybrid: bool = False  # shard within each machine, replicate across machines (a 2-D device mesh)
    source: str = "--shard fsdp"
    ignored: tuple[str, ...] = field(default_factory=tuple)

    def describe(self) -> str:
        mode = "full shard (ZeRO-3)" if self.reshard_after_forward else "shard grads+optimizer (ZeRO-2)"
        if self.hybrid:
            mode = f"hybrid {mode}: sharded within each machine, replicated across machines"
        extras = [e for e, on in (("CPU offload", self.cpu_offload), (f"{self.param_dtype} compute", self.param_dtype),
                                  ("activation checkpointing", self.activation_checkpointing)) if on]
        return f"FSDP2 {mode}" + (f", {', '.join(extras)}" if extras else "") + f" (from {self.source})"


# ----------------------------------------------------------------------------------------------
# Choosing a plan


def _flag(env: Mapping[str, str], name: str, default: bool = False) -> bool:
    value = env.get(name)
    if value is None:
        return default
    return value.strip().lower() in ("1", "true", "yes", "on")


def _mixed_precision(value: str | None, where: str) -> str | None:
    value = (value or "no").strip().lower()
    if value in ("no", "none", ""):
        return None
    if value == "bf16":
        return "bfloat16"
    raise ConfigError(
        f"{where}: mixed precision '{value}' is not supported with sharding (fp16 needs a loss scaler, "
        f"which unisd does not run); use bf16, or load the model in bf16 with dtype = \"bfloat16\""
    )


# accelerate's FSDP1 sharding strategies, by name and by the number its config files may use
# (NO_RESHARD: accelerate's name for SHARD_GRAD_OP in `fsdp_reshard_after_forward`): whether blocks are
# resharded after forward (None: no sharding), and whether the strategy is hybrid (shard within a machine,
# replicate across machines)
_FSDP_STRATEGIES: dict[str, tuple[bool | None, bool]] = {
    "FULL_SHARD": (True, False), "1": (True, False), "SHARD_GRAD_OP": (False, False), "2": (False, False),
    "NO_RESHARD": (False, False), "NO_SHARD": (None, False), "3": (None, False),
    "HYBRID_SHARD": (True, True), "4": (True, True), "HYBRID_SHARD_ZERO2": (False, True), "5": (False, True),
}


def plan_from_accelerate(env: Mapping[str, str]) -> ShardPlan | None:
    """The plan an ``accelerate launch`` with an FSDP or DeepSpeed config asks for (None: plain DDP)."""
    if _flag(env, "ACCELERATE_USE_DEEPSPEED"):
        path = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
        if path and path != "none":
            return plan_from_deepspeed(path, env.get("ACCELERATE_MIXED_PRECISION"))
        where = "accelerate DeepSpeed config"
        stage = int(env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"))
        devices = {k: env.get(f"ACCELERATE_DEEPSPEED_OFFLOAD_{k}_DEVICE", "none").lower() for k in ("OPTIMIZER", "PARAM")}
        if "nvme" in devices.values():
            raise ConfigError(f"{where}: NVMe offload has no FSDP2 equivalent; use cpu")
        mp = _mixed_precision(env.get("ACCELERATE_MIXED_PRECISION"), where)
        return _zero_plan(stage, devices["OPTIMIZER"] == "cpu", devices["PARAM"] == "cpu", mp, where, ())
    if not _flag(env, "ACCELERATE_USE_FSDP"):
        return None
    where = "accelerate FSDP config"
    hybrid = False
    if env.get("FSDP_VERSION", "1") == "2":
        reshard = _flag(env, "FSDP_RESHARD_AFTER_FORWARD", default=True)
    else:
        # FSDP1: the strategy is FSDP_SHARDING_STRATEGY (the launcher always sets it, FULL_SHARD by
        # default), unless the config's reshard_after_forward names one (its FSDP1 spelling).
        named = env.get("FSDP_RESHARD_AFTER_FORWARD", "").strip().upper()
        strategy = named if named in _FSDP_STRATEGIES else \
            env.get("FSDP_SHARDING_STRATEGY", "FULL_SHARD").strip().upper()
        if strategy not in _FSDP_STRATEGIES:
            raise ConfigError(f"{where}: unknown sharding strategy {strategy}; use FULL_SHARD, SHARD_GRAD_OP, "
                              "NO_SHARD, HYBRID_SHARD or HYBRID_SHARD_ZERO2")
        reshard, hybrid = _FSDP_STRATEGIES[strategy]
        if reshard is None:
            return None  # NO_SHARD is plain data parallelism
    ignored = tuple(f"{k} (FSDP2 prefetches by itself)" for k in ("FSDP_FORWARD_PREFETCH", "FSDP_BACKWARD_PREFETCH")
                    if _flag(env, k))
    return ShardPlan(
        reshard_after_forward=reshard, hybrid=hybrid,
        cpu_offload=_flag(env, "FSDP_OFFLOAD_PARAMS"),
        param_dtype=_mixed_precision(env.get("ACCELERATE_MIXED_PRECISION"), where),
        activation_checkpointing=_flag(env, "FSDP_ACTIVATION_CHECKPOINTING"), source=where, ignored=ignored,
    )


# DeepSpeed settings that unisd sets itself (or that do not apply); each is named in the run's log.
_DEEPSPEED_OWN_SETTINGS = ("optimizer", "scheduler", "gradient_clipping", "gradient_accumulation_steps",
                           "train_batch_size", "train_micro_batch_size_per_gpu", "steps_per_print")


def plan_from_deepspeed(path: str | Path, launcher_precision: str | None = None) -> ShardPlan | None:
    """The FSDP2 equivalent of a DeepSpeed JSON config's ZeRO section (None for stage 0).

    ``launcher_precision``: accelerate's mixed-precision setting, which ``"enabled": "auto"`` follows."""
    path = Path(path)
    where = f"DeepSpeed config {path}"
    if not path.is_file():
        raise ConfigError(f"{where}: no such file")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{where}: invalid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{where}: expected a JSON object")
    zero = cfg.get("zero_optimization") or {}
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{where}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    devices = {k: (zero.get(k) or {}).get("device", "none") for k in ("offload_optimizer", "offload_param")}
    if "nvme" in devices.values():
        raise ConfigError(f"{where}: NVMe offload has no FSDP2 equivalent; use \"device\": \"cpu\"")
    launcher = (launcher_precision or "no").strip().lower()
    fp16, bf16 = ((cfg.get(k) or {}).get("enabled") for k in ("fp16", "bf16"))
    if fp16 is True or (fp16 == "auto" and launcher == "fp16"):
        raise ConfigError(f"{where}: fp16 needs a loss scaler, which unisd does not run; use \"bf16\": {{\"enabled\": true}}")
    mp = "bfloat16" if bf16 is True or (bf16 == "auto" and launcher == "bf16") else None
    own = [k for k in _DEEPSPEED_OWN_SETTINGS if k in cfg and cfg[k] != "auto"]
    ignored = (f"{', '.join(own)} (unisd sets these: --lr, --batch-size, --grad-accum, max_grad_norm)",) if own else ()
    return _zero_plan(int(stage), devices["offload_optimizer"] == "cpu", devices["offload_param"] == "cpu", mp,
                      where, ignored)


def _zero_plan(stage: int, offload_optimizer: bool, offload_param: bool, param_dtype: str | None, where: str,
               ignored: tuple[str, ...]) -> ShardPlan | None:
    if stage == 0:
        return None
    if offload_optimizer and not offload_param:
        # FSDP2's offload moves weights, gradients and the optimizer step together
        ignored = (*ignored, "offload_optimizer without offload_param (FSDP2 offloads the weights with it)")
    # ZeRO-1/2 keep parameters whole for compute (only gradients and optimizer state are split):
    # FSDP2 without resharding after forward. ZeRO-3 splits parameters too: reshard after forward.
    return ShardPlan(reshard_after_forward=stage == 3, cpu_offload=offload_optimizer or offload_param,
                     param_dtype=param_dtype, source=f"{where} (ZeRO-{stage})", ignored=ignored)


def choose_plan(shard: str, deepspeed_config: str | None, world_size: int,
                env: Mapping[str, str] | None = None) -> ShardPlan | None:
    """The plan for this run: explicit settings first, then the launcher's; None means plain DDP."""
    env = os.environ if env is None else env
    if shard not in SHARD_CHOICES:
        raise ConfigError(f"--shard must be one of {', '.join(SHARD_CHOICES)}, got '{shard}'")
    if deepspeed_config:
        if shard == "none":
            raise ConfigError("--deepspeed asks for ZeRO sharding, --shard none for none: drop one of them")
        plan = plan_from_deepspeed(deepspeed_config, env.get("ACCELERATE_MIXED_PRECISION"))
        if plan is None and shard == "fsdp":
            raise ConfigError(f"--deepspeed {deepspeed_config} is ZeRO stage 0 (no sharding) but --shard fsdp asks "
                              f"for sharding: drop one of them")
    elif shard in ("fsdp", "hybrid"):
        plan = ShardPlan(hybrid=shard == "hybrid", source=f"--shard {shard}")
    elif shard == "auto":
        plan = plan_from_accelerate(env)
    else:
        plan = None
    if plan is not None and world_size <= 1:
        return None  # one process: nothing to shard over (the settings still validate above)
    if plan is not None and plan.cpu_offload and not torch.cuda.is_available():
        plan = dataclasses.replace(plan, cpu_offload=False,
                                   ignored=(*plan.ignored, "CPU offload (no GPU: the weights are on the CPU already)"))
    return plan


# ----------------------------------------------------------------------------------------------
# Applying it


def require_support() -> None:
    """Refuse, before anything is loaded, a torch whose FSDP2 cannot sum gradients over processes."""
    from torch.distributed.fsdp import FSDPModule

    if not hasattr(FSDPModule, "set_force_sum_reduction_for_comms"):
        raise UsageError(f"sharding needs torch >= 2.9 (FSDP2 sum reductions); this is torch {torch.__version__}. "
                         "Upgrade torch, or train replicated with --shard none")


def is_sharded(model: Any) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks to shard one by one: the model's declared no-split modules (HF), else the
    children of its longest ``ModuleList``."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(inner, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if blocks:
        return blocks
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def _nothing() -> None:
    return None


def _run_as_forward(self: Any, fn: Callable[[], Any]) -> Any:
    out = fn()
    # FSDP hooks the outputs for its backward pass; an in-place op on a view output would lose the hook.
    if isinstance(out, tuple):
        return tuple(t.clone() if isinstance(t, torch.Tensor) and t._is_view() else t for t in out)
    return out


def hybrid_mesh(env: Mapping[str, str] | None = None) -> Any:
    """The 2-D device mesh of hybrid sharding: one row per machine (replicas), the processes of one
    machine along it (shards). torchrun numbers ranks machine by machine, so a row is one machine."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    env = os.environ if env is None else env
    world = dist.get_world_size()
    per_machine = int(env.get("LOCAL_WORLD_SIZE", world))
    if per_machine < 1 or world % per_machine:
        raise UsageError(f"hybrid sharding needs the same number of processes on every machine: {world} in all, "
                         f"{per_machine} on this one")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return init_device_mesh(device, (world // per_machine, per_machine), mesh_dim_names=("replicate", "shard"))


def shard_model(model: torch.nn.Module, plan: ShardPlan) -> torch.nn.Module:
    """Make every transformer block and then ``model`` itself an FSDP2 unit (in place; returns model)."""
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        MixedPrecisionPolicy,
        fully_shard,
        register_fsdp_forward_method,
    )

    kwargs: dict[str, Any] = {"reshard_after_forward": plan.reshard_after_forward}
    if plan.hybrid:
        kwargs["mesh"] = hybrid_mesh()
    if plan.param_dtype:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=getattr(torch, plan.param_dtype), reduce_dtype=torch.float32)
    if plan.cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    for block in reversed(transformer_blocks(model)):  # innermost first: FSDP units nest bottom-up
        fully_shard(block, **kwargs)
    # The root keeps its parameters (embeddings, norm, lm-head) gathered from forward to backward
    # (FSDP's default for a root), so the lm-head chunks recomputed in backward find them whole.
    root_kwargs = {**kwargs, "reshard_after_forward": None if plan.reshard_after_forward else False}
    if plan.param_dtype:  # the root's "inputs" are the loop's own arguments (masks, hidden states): keep their dtype
        root_kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=getattr(torch, plan.param_dtype),
                                                        reduce_dtype=torch.float32, cast_forward_inputs=False)
    fully_shard(model, **root_kwargs)
    # Each process divides its loss by the token count of the *global* batch, so the gradients must be
    # summed over processes, not averaged (FSDP's default).
    for unit in model.modules():
        if is_sharded(unit):
            unit.set_gradient_divide_factor(1.0)
            unit.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no pre-multiplied sum)
    model._unisd_plan = plan
    model._unisd_forward = types.MethodType(_run_as_forward, model)
    register_fsdp_forward_method(model, "_unisd_forward")
    return model


@torch.no_grad()
def fill_from_main(model: torch.nn.Module, main_state: dict[str, torch.Tensor] | None) -> None:
    """Give every process's shards the weights the main process loaded (collective; after ``shard_model``).

    Under sharding only the main process reads the weights; the others build the model on the meta
    device, so no process but one ever holds a whole copy. Here those allocate their shards (on the
    GPU, or on the CPU under offload) and receive the values tensor by tensor, and every buffer (rotary
    frequencies are not in a state dict) is broadcast as a whole. ``main_state``: the main process's
    ``state_dict()`` taken before sharding; ignored elsewhere.
    """
    import torch.distributed as dist

    from . import distributed

    gpu = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        plan = getattr(model, "_unisd_plan", None)
        offloaded = plan is not None and plan.cpu_offload
        model.to_empty(device=torch.device("cpu") if offloaded or gpu is None else gpu)
        if offloaded and gpu is not None:
            # FSDP moves buffers to the GPU even under offload (only parameter shards go back to the
            # CPU): the same here, so each broadcast below meets the main process's on the same transport.
            for module in model.modules():
                for name, buffer in module._buffers.items():
                    if buffer is not None:
                        module._buffers[name] = buffer.to(gpu)
    load_model_state(model, (main_state if distributed.current().is_main else None) or {}, from_main=True)
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)
    for module in model.modules():
        # Older transformers keep the rotary base frequencies as a plain attribute, which to_empty
        # does not reach; it equals the buffer just received.
        if getattr(getattr(module, "original_inv_freq", None), "is_meta", False) and hasattr(module, "inv_freq"):
            module.original_inv_freq = module.inv_freq.clone()


def forward_call(model: Any, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` as a forward of ``model``'s root unit when sharded (plain call otherwise).

    Return tensors (or tuples of them) that the backward pass goes through: the unit's gradient
    reduction hooks attach to them.
    """
    if model is not None and hasattr(model, "_unisd_forward"):
        # One opaque callable: FSDP's input handling (device moves, dtype casts) rebuilds the containers
        # and dataclasses it is given, which for a Run would copy every example on every call.
        return model._unisd_forward(functools.partial(fn, *args, **kwargs))
    return fn(*args, **kwargs)


@contextlib.contextmanager
def gathered(model: Any, keep_blocks: bool = False) -> Iterator[None]:
    """The root unit's parameters (embeddings, final norm, lm-head) whole, for no-grad work.

    ``keep_blocks``: also keep each block whole once its first forward has gathered it, until the
    context ends: generation then all-gathers every block once, not once per generated token (the
    memory of one whole model; the blocks are resharded on exit). Ignored under CPU offload, which is
    there because the whole model may not fit the GPU: each block is gathered per forward instead.
    """
    if model is None or not is_sharded(model):
        yield
        return
    units = [m for m in model.modules() if is_sharded(m) and m is not model]
    plan: ShardPlan = getattr(model, "_unisd_plan", ShardPlan())
    keep_blocks = keep_blocks and not plan.cpu_offload
    forward_call(model, _nothing)  # the root's pre-forward: first-use setup, then its parameters gathered
    try:
        if keep_blocks:
            for unit in units:
                unit.set_reshard_after_forward(False, recurse=False)
        yield
    finally:
        if keep_blocks:
            for unit in units:
                unit.set_reshard_after_forward(plan.reshard_after_forward, recurse=False)
        reshard_all(model)


def reshard_all(model: Any, blocks_only: bool = False) -> None:
    """Every unit (``blocks_only``: every unit but the root) back to its shard. No-grad work must end
    here: a block left whole after it (ZeRO-2 keeps blocks whole after forward) would serve the next
    forward parameters gathered without autograd, and would miss values written into the shards
    meanwhile (the EMA teacher's swap)."""
    if model is None or not is_sharded(model):
        return
    for unit in model.modules():
        if is_sharded(unit) and not (blocks_only and unit is model):
            unit.reshard()


def compute_device(model: Any) -> torch.device:
    """Where the model computes: its parameters' device, except that sharded weights offloaded to the
    CPU still compute on the current GPU."""
    if model is not None and is_sharded(model) and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return next(model.parameters()).device


def generation_kwargs(model: Any) -> dict[str, Any]:
    """Extra ``generate`` arguments: under sharding over several processes, keep every process stepping
    until all are done (each step's all-gathers are collectives)."""
    from . import distributed

    if model is not None and is_sharded(model) and distributed.current().active:
        return {"synced_gpus": True}
    return {}


def whole(value: Any) -> Any:
    """A sharded tensor as one ordinary tensor (collective); anything else unchanged."""
    from torch.distributed.tensor import DTensor

    return value.full_tensor() if isinstance(value, DTensor) else value


def whole_tree(value: Any) -> Any:
    """``whole`` over the tensors of nested dicts/lists (e.g. a component's state_dict). Collective."""
    if isinstance(value, dict):
        return {k: whole_tree(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(whole_tree(v) for v in value)
    return whole(value)


@torch.no_grad()
def copy_whole_into(target: torch.Tensor, source: torch.Tensor) -> None:
    """Copy an ordinary tensor into ``target``, which may be a shard of a sharded tensor."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(target, DTensor):
        source = distribute_tensor(source.to(target.device, target.dtype), target.device_mesh, target.placements)
    target.copy_(source.to(target.device, target.dtype) if not isinstance(source, DTensor) else source)


# ----------------------------------------------------------------------------------------------
# Whole state dicts for checkpoints (collective: every process must call these)


def full_model_state(model: Any, trainable_only: bool) -> dict[str, torch.Tensor] | None:
    """Unsharded weights of a sharded model, on the CPU of the main process (empty elsewhere); None for
    a model that is not sharded (it saves its own weights)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not is_sharded(model):
        return None
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    return get_model_state_dict(model, options=options)


def full_optimizer_state(model: Any, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state keyed by parameter name (portable across process counts and sharding)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_model_state(model: Any, state: dict[str, torch.Tensor], from_main: bool = False) -> None:
    """Load whole (unsharded) tensors by parameter name; each process keeps its shard.

    ``from_main``: only the main process holds ``state`` and broadcasts it tensor by tensor (collective).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    options = StateDictOptions(full_state_dict=True, strict=False, broadcast_from_rank0=from_main)
    set_model_state_dict(model, state, options=options)


def load_optimizer_state(model: Any, optimizer: torch.optim.Optimizer, state: dict[str, Any],
                         from_main: bool = False) -> None:
    """Load a name-keyed optimizer state; ``from_main`` as in ``load_model_state``."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=from_main)
    set_optimizer_state_dict(model, optimizer, state, options=options)
