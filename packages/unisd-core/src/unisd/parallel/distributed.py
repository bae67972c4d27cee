"""Data parallelism without a wrapper: each process trains on its share of the global batch.

Launch with ``accelerate launch -m unisd train ...``, ``torchrun -m unisd train ...`` or
``unisd train --num-processes N``; all set RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT. Every process
holds the same weights; the gradients are summed across processes during the step's last backward pass
(``gradient_sync``), and because
every process divides its loss by the token count of the *global* batch, the sum is exactly the gradient
a single process would compute on the whole batch. Optimiser steps are then identical everywhere.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from ..errors import UsageError

# Whether this module started the process group. Only then is it ours to destroy: an in-process vLLM
# engine starts a one-process group of its own and tears it down at exit.
_started_group = False
T = TypeVar("T")


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def init_from_env() -> DistEnv:
    """Join the process group the launcher described in the environment (a no-op for one process)."""
    global _started_group
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv()
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        here = int(os.environ.get("LOCAL_WORLD_SIZE", local_rank + 1))
        if here > torch.cuda.device_count():  # NCCL needs one GPU per process
            raise UsageError(f"{here} processes on this machine but {torch.cuda.device_count()} GPU(s) visible: "
                             f"start at most {torch.cuda.device_count()} (one per GPU), or check CUDA_VISIBLE_DEVICES")
    if not dist.is_initialized():
        # On GPUs: NCCL for CUDA tensors (gradients, FSDP) and gloo for the small CPU tensors the loop
        # reduces (token counts, losses, RNG states); NCCL alone rejects CPU tensors.
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
        _started_group = True
    return DistEnv(dist.get_rank(), dist.get_world_size())


def shutdown(clean: bool = True) -> None:
    """Leave the process group (its background threads must not outlive the interpreter).

    ``clean``: all processes got here normally; meet at a barrier first, so no process tears its
    connections down while a peer still uses them. After an error the peers may be gone: no barrier.
    """
    global _started_group
    if _started_group and dist.is_available() and dist.is_initialized():
        _started_group = False
        # A sharded model's units hold the process group, and their reference cycles would keep it
        # alive until interpreter teardown, where destroying it can abort the process ("terminate
        # called without an active exception"). Collect them first so it goes down here.
        gc.collect()
        if clean:
            dist.barrier()
        dist.destroy_process_group()


def current() -> DistEnv:
    if dist.is_available() and dist.is_initialized():
        return DistEnv(dist.get_rank(), dist.get_world_size())
    return DistEnv()


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over processes in place (and return it). Identity for one process."""
    if current().active:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def sum_scalar(value: float) -> float:
    if not current().active:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    all_reduce_sum(t)
    return float(t.item())


def all_gather_cat(value: torch.Tensor) -> torch.Tensor:
    """Concatenate a 1-D tensor of any length from every process (for global quantiles)."""
    env = current()
    if not env.active:
        return value
    sizes = [None] * env.world_size
    dist.all_gather_object(sizes, int(value.numel()))
    width = max(sizes)
    padded = torch.zeros(width, dtype=value.dtype)
    padded[: value.numel()] = value.detach().cpu().reshape(-1)
    gathered = [torch.zeros(width, dtype=value.dtype) for _ in range(env.world_size)]
    dist.all_gather(gathered, padded)
    return torch.cat([g[:n] for g, n in zip(gathered, sizes, strict=True)]).to(value.device)


def gather_objects(obj: Any) -> list[Any]:
    """Every process's ``obj``, in rank order (a one-element list for one process)."""
    env = current()
    if not env.active:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if current().active:
        dist.barrier()


def shard(items: list[Any], env: DistEnv) -> list[Any]:
    """This process's share of the global batch (strided, so shares differ by at most one item)."""
    return items[env.rank :: env.world_size]


def on_main_only(work: Callable[[], T], error_type: type[Exception]) -> T | None:
    """``work()`` on the main process only; None elsewhere. Collective: every process must call this.

    Whatever goes wrong there is raised on every process as one ``error_type`` with its message, so no
    process is left waiting (at a barrier, or for a broadcast) on a main process that has stopped.
    """
    result, error = None, None
    if current().is_main:
        try:
            result = work()
        except Exception as exc:  # noqa: BLE001 (raised again everywhere below, with its message)
            error = str(exc) if isinstance(exc, error_type) else f"{type(exc).__name__}: {exc}"
    error = gather_objects(error)[0]
    if error is not None:
        raise error_type(error)
    return result


def main_first(work: Callable[[], T], error_type: type[Exception]) -> T:
    """``work()`` on the main process, then, once it has finished, on every other. Collective.

    For work that fills a cache: the main process fills it (e.g. a large data file's index, minutes
    for millions of records) while the others wait, and they then read it instead of each repeating
    the work. An error on the main process is raised on every process, as by :func:`on_main_only`.
    """
    if not current().active:
        return work()
    result = on_main_only(work, error_type)
    return result if current().is_main else work()  # type: ignore[return-value]

