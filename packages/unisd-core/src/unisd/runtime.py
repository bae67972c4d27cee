"""What a component may ask of the training runtime; the parallel machinery itself stays private.

Components (in ``unisd_components`` or third-party plugins) must not import :mod:`unisd.parallel.sharding` or
:mod:`unisd.parallel.distributed` (a test enforces it for the shipped ones): those modules change with the
launchers unisd supports. These few questions and operations are the stable part.
"""

from __future__ import annotations

from typing import Any

import torch


def several_processes() -> bool:
    """Whether this run has more than one training process (torchrun, accelerate launch, --num-processes)."""
    from .parallel import distributed

    return distributed.current().active


def is_sharded(model: Any) -> bool:
    """Whether the model's weights are sharded over the processes (FSDP)."""
    from .parallel import sharding

    return sharding.is_sharded(model)


def whole(value: Any) -> Any:
    """A possibly sharded tensor as one ordinary tensor (collective under sharding: every process calls it);
    anything else unchanged."""
    from .parallel import sharding

    return sharding.whole(value)


def copy_whole_into(target: torch.Tensor, source: torch.Tensor) -> None:
    """Copy an ordinary tensor into ``target``, which may be the local shard of a sharded tensor."""
    from .parallel import sharding

    sharding.copy_whole_into(target, source)
