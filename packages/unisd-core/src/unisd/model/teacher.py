"""Teacher views: which weights score the completion under the teacher prompt.

The default teacher under LoRA is the student's own base weights with the adapter disabled, so no
second copy of the model is held. Full fine-tuning keeps one frozen copy of the initial weights.
A component (e.g. an EMA teacher) may provide its own view.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Protocol

import torch

from ..parallel import distributed, sharding
from .scoring import Packed, completion_hidden, lm_head_weight, prompt_learning


class TeacherView(Protocol):
    """Scores sequences with the teacher's weights, without gradients."""

    def hidden(self, packed: Packed, share_prompts: bool = False) -> torch.Tensor:
        """Completion-position final hidden states ``[B, C, H]``. ``share_prompts`` (passed only when a
        run samples several completions per prompt): rows with the same prompt may run it once."""

    def head_weight(self) -> torch.Tensor:
        """The lm-head weight ``[V, H]`` that turns those hidden states into logits."""

    def as_model(self) -> contextlib.AbstractContextManager:
        """A context in which a model with the teacher's weights is yielded (for generation)."""


@contextlib.contextmanager
def eval_mode(model: Any):
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def _flag_switched_layers(model: Any) -> list[Any] | None:
    """The adapter layers of a PEFT model whose forwards skip their adapters on their ``disable_adapters``
    flag alone (LoRA and the other tuner layers, modules-to-save wrappers); None where PEFT's own context is
    needed: no PEFT model, prompt learning or adaption prompts (they swap forwards), a merged layer."""
    if getattr(model, "peft_config", {}).get(getattr(model, "active_adapter", None)) is None or prompt_learning(model):
        return None
    from peft.tuners.tuners_utils import BaseTunerLayer  # a PEFT model is loaded: PEFT is there
    from peft.utils.other import AuxiliaryTrainingWrapper

    # the modules PEFT's own switch (``_set_adapter_layers``) reaches
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer | AuxiliaryTrainingWrapper)]
    if not layers or any(getattr(m, "merged", False) for m in layers):
        return None
    return layers


@contextlib.contextmanager
def adapter_disabled(model: Any):
    """PEFT's ``disable_adapter()``, safe under sharding; under ``torch.no_grad`` only the layers' flags.

    PEFT's context also checks the model's adapter status and switches the adapters' ``requires_grad``
    off and on, 55 ms on a LoRA-wrapped SmolLM2 on this project's CPU, once per teacher forward. Without
    gradients the flags alone give the same forward (``_flag_switched_layers``), in 3 ms; each layer gets
    its own earlier flag back.
    """
    layers = None if torch.is_grad_enabled() else _flag_switched_layers(model)
    if layers is not None:
        before = [getattr(m, "_disable_adapters", False) for m in layers]
        model_before = getattr(model, "_adapters_disabled", None)
        try:
            for m in layers:
                m._disable_adapters = True
            if model_before is not None:
                model._adapters_disabled = True  # what PeftModel.has_active_enabled_adapter reads
            yield
        finally:
            for m, flag in zip(layers, before, strict=True):
                m._disable_adapters = flag
            if model_before is not None:
                model._adapters_disabled = model_before
        return
    with _peft_adapter_disabled(model):
        yield


@contextlib.contextmanager
def _peft_adapter_disabled(model: Any):
    """PEFT's ``disable_adapter()``, safe under sharding.

    PEFT switches the adapters' ``requires_grad`` off on entry and on again on exit, on whatever tensors
    the modules hold at that moment. A sharded block kept whole after a forward (ZeRO-2) holds its
    gathered copy, so the flag would come back on that copy and stay off on the shard, and the next
    student forward would have no gradient. Resharding the blocks first makes both toggles reach the
    shards.
    """
    sharding.reshard_all(model, blocks_only=True)
    with model.disable_adapter():
        try:
            yield
        finally:
            sharding.reshard_all(model, blocks_only=True)


class AdapterDisabledTeacher:
    """The student's base weights: the LoRA adapter switched off for the teacher's forwards."""

    def __init__(self, model: Any):
        self.model = model

    @torch.no_grad()
    def hidden(self, packed: Packed, share_prompts: bool = False) -> torch.Tensor:
        with eval_mode(self.model), adapter_disabled(self.model):
            return completion_hidden(self.model, packed, share_prompts=share_prompts)

    def head_weight(self) -> torch.Tensor:
        return lm_head_weight(self.model).detach()

    @contextlib.contextmanager
    def as_model(self):
        """The model acting as the teacher (for generation, e.g. the privileged-gap evaluation)."""
        with eval_mode(self.model), adapter_disabled(self.model):
            yield self.model


class FrozenCopyTeacher:
    """A frozen copy of the initial weights, for full fine-tuning.

    A component may move the copy's weights (the EMA teacher averages the student into them in place), so
    :meth:`unchanged` tells whether they are still the ones copied.
    """

    def __init__(self, model: Any):
        self.model = copy.deepcopy(model)
        self.model.eval()
        self.model.requires_grad_(False)
        # Only one process holding real (not meta, not about to be sharded) weights can use the base-completion
        # cache (unisd.evaluation.base_cache), so only then is the copy's state worth recording.
        local = not distributed.current().active and not any(p.is_meta for p in self.model.parameters())
        self._fingerprint = weights_fingerprint(self.model) if local else None

    def unchanged(self) -> bool:
        """Whether the copy still holds the weights it was made with (up to a float64 checksum per tensor);
        False where they were not recorded (several processes)."""
        return self._fingerprint is not None and torch.equal(weights_fingerprint(self.model), self._fingerprint)

    @torch.no_grad()
    def hidden(self, packed: Packed, share_prompts: bool = False) -> torch.Tensor:
        return completion_hidden(self.model, packed, share_prompts=share_prompts)

    def head_weight(self) -> torch.Tensor:
        return lm_head_weight(self.model)

    @contextlib.contextmanager
    def as_model(self):
        yield self.model


def default_teacher(model: Any, lora: bool) -> TeacherView:
    return AdapterDisabledTeacher(model) if lora else FrozenCopyTeacher(model)


def _settle(model: Any) -> None:
    """Wait for pending GPU copies: sharded weights offloaded to (pinned) CPU memory are copied to the GPU
    asynchronously, and overwriting them in place before such a copy ran would change what it reads."""
    if torch.cuda.is_available() and sharding.is_sharded(model):
        torch.cuda.synchronize()


FINGERPRINT_CHUNK = 1 << 22  # elements cast to float64 at a time: 32 MiB, whatever the size of the tensor


@torch.no_grad()
def weights_fingerprint(model: Any) -> torch.Tensor:
    """Per parameter, the float64 sum and sum of squares of its values, on the CPU: any update that moves
    the weights (an EMA step, an optimiser step) changes it. It costs one read of the weights; at most
    FINGERPRINT_CHUNK elements are held in float64 at once."""
    sums = []
    for p in model.parameters():
        total = torch.zeros(2, dtype=torch.float64, device=p.device)
        for chunk in p.detach().reshape(-1).split(FINGERPRINT_CHUNK):
            wide = chunk.double()
            total += torch.stack([wide.sum(), wide.square().sum()])
        sums.append(total)
    return torch.stack(sums).cpu() if sums else torch.zeros(0, 2, dtype=torch.float64)


class SwappedWeightsTeacher:
    """The student's model with other values swapped into some of its parameters (e.g. an EMA adapter).

    No second model exists: each teacher forward copies ``values[name]`` into ``params[name]`` under
    no_grad and restores the student's values in a ``finally``, so the student's tensors (and the
    optimiser's references to them) are untouched. Works on sharded (FSDP) models too.
    """

    def __init__(self, model: Any, params: dict[str, torch.nn.Parameter], values: dict[str, torch.Tensor]):
        self.model, self.params, self.shadow = model, params, values

    @contextlib.contextmanager
    def swapped(self):
        """The swapped-in values written into the parameters, the student's restored afterwards.

        Unsharded parameters get the values swapped in with ``.data =`` and back: writing into them in
        place would bump their autograd version counters, and a teacher used between the student's
        forward and backward (leak-guard's lookahead generation) would then break the backward pass.
        A sharded (FSDP) parameter is gathered from its own storage, so there the values are copied in
        place: only values written into that storage reach the forward.
        """
        if not sharding.is_sharded(self.model):
            with self._pointer_swapped():
                yield
            return
        saved: dict[str, torch.Tensor] = {}
        sharding.reshard_all(self.model, blocks_only=True)  # whole (gathered) blocks would not see the values written below
        with torch.no_grad():
            try:
                _settle(self.model)
                for name, p in self.params.items():
                    saved[name] = p.detach().clone()
                    p.detach().copy_(self.shadow[name].to(dtype=p.dtype))
                yield
            finally:
                _settle(self.model)
                for name, data in saved.items():
                    self.params[name].detach().copy_(data)
                sharding.reshard_all(self.model, blocks_only=True)  # and none may keep the teacher's values

    @contextlib.contextmanager
    def _pointer_swapped(self):
        saved = {name: p.data for name, p in self.params.items()}
        try:
            for name, p in self.params.items():
                p.data = self.shadow[name].to(device=p.device, dtype=p.dtype)
            yield
        finally:
            for name, data in saved.items():
                self.params[name].data = data

    @torch.no_grad()
    def swaps_in_current_values(self) -> bool:
        """Whether every value it swaps in equals the student's (e.g. an EMA teacher before any update):
        then it computes the student's own function."""
        return all(torch.equal(self.shadow[name].to(device=p.device, dtype=p.dtype), p.detach())
                   for name, p in self.params.items())

    @torch.no_grad()
    def hidden(self, packed: Packed, share_prompts: bool = False) -> torch.Tensor:
        with eval_mode(self.model), self.swapped():
            return completion_hidden(self.model, packed, share_prompts=share_prompts)

    def head_weight(self) -> torch.Tensor:
        head = lm_head_weight(self.model)
        for name, p in self.params.items():  # a trainable head (modules_to_save) may be swapped too
            if p is head:
                return self.shadow[name].to(device=head.device, dtype=head.dtype)
        return head.detach()

    @contextlib.contextmanager
    def as_model(self):
        with torch.no_grad(), eval_mode(self.model), self.swapped():
            yield self.model
