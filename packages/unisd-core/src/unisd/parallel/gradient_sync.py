"""How one optimiser step's gradients become the sum over every process.

The step runs ``grad_accum`` micro-batches, each with its own backward pass. Only the last one needs
to communicate: the earlier ones accumulate locally. How the sum is formed depends on the run:

- one process: nothing to do (:class:`GradientSync`);
- replicated weights (plain data parallelism): gradients are all-reduced in buckets, each started
  asynchronously from the last backward pass as soon as its parameters' gradients are final, so the
  communication overlaps the rest of the backward pass (:class:`BucketedAllReduce`, the scheme of
  PyTorch's DDP reducer, without its wrapper around the model);
- sharded weights (FSDP2): the sharded units reduce-scatter during backward themselves; they are told
  not to on every micro-batch but the last (:class:`ShardedGradientSync`).

Every process divides its loss by the *global* token count, so the sum is exactly the gradient one
process computes over the whole batch (see ``unisd.divergence.reduction``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist

from . import distributed, sharding

# DDP's default bucket sizes: large enough that per-collective latency does not dominate; the first
# bucket small, so communication starts early in the backward pass (a LoRA adapter's gradients, ~20 MB
# for a 135M model, would otherwise be one bucket, ready only when backward ends).
BUCKET_BYTES = 25 * 2**20
FIRST_BUCKET_BYTES = 2**20


class GradientSync:
    """One process: gradients are already the step's; every method is a no-op."""

    @contextmanager
    def micro_batch(self, last: bool) -> Iterator[None]:
        """Around one micro-batch's forward and backward; ``last``: the step's final micro-batch."""
        yield

    def finish(self) -> None:
        """After the last micro-batch: every process's gradients hold the sum over all processes."""


def for_model(model: Any) -> GradientSync:
    """The gradient synchronisation this model needs in the current process group."""
    if not distributed.current().active:
        return GradientSync()
    if sharding.is_sharded(model):
        return ShardedGradientSync(model)
    return BucketedAllReduce([p for p in model.parameters() if p.requires_grad])


class ShardedGradientSync(GradientSync):
    """FSDP2: accumulate unsharded gradients locally, reduce-scatter only in the last backward pass."""

    def __init__(self, model: Any):
        self.model = model

    @contextmanager
    def micro_batch(self, last: bool) -> Iterator[None]:
        self.model.set_requires_gradient_sync(last)
        try:
            yield
        finally:
            # whatever runs outside the step (an evaluation, a checkpoint) sees the default again
            self.model.set_requires_gradient_sync(True)


class _Bucket:
    """Parameters whose gradients travel in one collective, and its progress in the current step."""

    def __init__(self, params: list[torch.nn.Parameter]):
        self.params = params
        self.waiting = len(params)
        self.work: Any = None
        self.flat: torch.Tensor | None = None

    def pack(self) -> torch.Tensor:
        """The gradients, flattened, then one presence count per parameter (1: it has a gradient here),
        so a parameter no process used keeps no gradient, as it would with one process."""
        first = self.params[0]
        parts = [p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), dtype=first.dtype,
                                                                           device=first.device)
                 for p in self.params]
        present = torch.tensor([float(p.grad is not None) for p in self.params], dtype=first.dtype, device=first.device)
        return torch.cat([*parts, present])

    def unpack(self) -> None:
        assert self.flat is not None
        present = self.flat[-len(self.params):]
        offset = 0
        for p, used in zip(self.params, present.tolist(), strict=True):
            summed = self.flat[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
            if p.grad is not None:
                p.grad.copy_(summed)
            elif used:
                p.grad = summed.clone()


def _buckets(params: Iterable[torch.nn.Parameter], bucket_bytes: int, first_bytes: int) -> list[_Bucket]:
    """Consecutive parameters of one dtype and device, up to ``first_bytes`` in the first bucket and
    ``bucket_bytes`` in each other."""
    buckets: list[list[torch.nn.Parameter]] = []
    size = 0
    for p in params:
        current = buckets[-1] if buckets else None
        limit = first_bytes if len(buckets) == 1 else bucket_bytes
        fits = current is not None and size + p.numel() * p.element_size() <= limit
        if current is not None and fits and (p.dtype, p.device) == (current[0].dtype, current[0].device):
            current.append(p)
            size += p.numel() * p.element_size()
        else:
            buckets.append([p])
            size = p.numel() * p.element_size()
    return [_Bucket(group) for group in buckets]


class BucketedAllReduce(GradientSync):
    """Replicated weights: all-reduce gradient buckets while the last backward pass is still running.

    Buckets hold parameters in reverse order (roughly the order backward finishes them), and from the
    second step on in the order their gradients arrived in the first (as DDP rebuilds its buckets). A hook on each
    parameter (``register_post_accumulate_grad_hook``: it fires once its gradient is accumulated) counts
    down its bucket; a full bucket is started asynchronously. Buckets are started strictly in order, so
    every process issues the same sequence of collectives whatever the order the hooks fire in. A
    bucket with a parameter that got no gradient on this process (and every bucket after it) is started
    at :meth:`finish`: correct, but not overlapped. A model's trainable weights are all used in every
    step, so this is the exception.
    """

    def __init__(self, params: list[torch.nn.Parameter], bucket_bytes: int = BUCKET_BYTES,
                 first_bucket_bytes: int = FIRST_BUCKET_BYTES):
        self.params, self.sizes = params, (bucket_bytes, first_bucket_bytes)
        self._set_buckets(list(reversed(params)))
        self._arrivals: list[torch.nn.Parameter] | None = []  # the first step's gradient order, then None
        self._armed = False
        self._next = 0  # the next bucket to start
        for p in params:
            p.register_post_accumulate_grad_hook(self._on_gradient)

    def _set_buckets(self, ordered: list[torch.nn.Parameter]) -> None:
        self.buckets = _buckets(ordered, *self.sizes)
        self._bucket_of = {id(p): b for b in self.buckets for p in b.params}

    def _rebucket_by_arrival(self) -> None:
        """After the first step: buckets in the order gradients actually arrived (process 0's order, so
        all processes agree), so no bucket waits on a parameter that backward reaches late or never."""
        assert self._arrivals is not None
        index = {id(p): i for i, p in enumerate(self.params)}
        arrived = [index[id(p)] for p in self._arrivals]
        seen = set(arrived)
        late = [i for i in reversed(range(len(self.params))) if i not in seen]
        order = distributed.gather_objects(arrived + late)[0]
        self._arrivals = None
        self._set_buckets([self.params[i] for i in order])

    @contextmanager
    def micro_batch(self, last: bool) -> Iterator[None]:
        if last:
            for bucket in self.buckets:
                bucket.waiting, bucket.work, bucket.flat = len(bucket.params), None, None
            self._next, self._armed = 0, True
        yield

    def _on_gradient(self, param: torch.nn.Parameter) -> None:
        if not self._armed:  # an earlier micro-batch: accumulate locally
            return
        if self._arrivals is not None:
            self._arrivals.append(param)
        bucket = self._bucket_of[id(param)]
        if bucket.work is not None:
            raise RuntimeError("a gradient arrived after its bucket was sent: the last micro-batch must run "
                               "a single backward pass")
        bucket.waiting -= 1
        self._start_ready()

    def _start_ready(self, everything: bool = False) -> None:
        while self._next < len(self.buckets):
            bucket = self.buckets[self._next]
            if bucket.waiting > 0 and not everything:
                return
            bucket.flat = bucket.pack()
            bucket.work = dist.all_reduce(bucket.flat, op=dist.ReduceOp.SUM, async_op=True)
            self._next += 1

    def finish(self) -> None:
        if not self._armed:
            raise RuntimeError("GradientSync.finish without a last micro-batch")
        self._armed = False
        self._start_ready(everything=True)
        for bucket in self.buckets:
            bucket.work.wait()
            bucket.unpack()
            bucket.work, bucket.flat = None, None
        if self._arrivals is not None:
            self._rebucket_by_arrival()
