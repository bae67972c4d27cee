"""EMA teacher: the teacher follows the student slowly (unisd-method.md §2.2).

Every ``sync_steps`` optimiser steps, ``teacher ← β·teacher + (1−β)·student`` over the *effective*
weights. Under LoRA the frozen base is shared by teacher and student, so averaging the effective
weights means averaging the trainable (adapter) tensors: we keep a float32 EMA copy of them and the
teacher is the base plus that EMA adapter. (The research code skipped the LoRA tensors, so its
teacher never moved, §7.1.) Under full fine-tuning the teacher is a frozen copy whose weights are
averaged with the student's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from unisd import runtime
from unisd.components import option
from unisd.hookspecs import hookimpl
from unisd.model.teacher import FrozenCopyTeacher, SwappedWeightsTeacher


def ema_update_(shadow: torch.Tensor, current: torch.Tensor, beta: float) -> None:
    """In place: ``shadow ← β·shadow + (1−β)·current``, computed in float32 (bf16 in-place drifts)."""
    mixed = shadow.float().mul(beta).add(current.detach().to(shadow.device).float(), alpha=1.0 - beta)
    shadow.copy_(mixed.to(shadow.dtype))


class Ema:
    """EMA teacher over the effective weights (an EMA adapter under LoRA, an EMA copy under --full)."""

    name: ClassVar[str] = "ema"
    inactive_hint: ClassVar[str] = "the teacher was never updated; lower -o ema.sync_steps"

    @dataclass
    class Options:
        sync_steps: int = option(10, "Update the teacher every N optimiser steps.")
        beta: float = option(0.9, "Teacher mix-in β: teacher ← β·teacher + (1−β)·student.")

        def __post_init__(self) -> None:
            if self.sync_steps < 1:
                raise ValueError(f"ema.sync_steps must be ≥ 1, got {self.sync_steps}")
            if not 0.0 <= self.beta <= 1.0:
                raise ValueError(f"ema.beta must be in [0, 1], got {self.beta}")

    def __init__(self, options: Options | None = None):
        self.options = options or self.Options()
        self.mode: str | None = None
        self.model: Any = None
        self.params: dict[str, torch.nn.Parameter] = {}
        self.shadow: dict[str, torch.Tensor] = {}
        self.frozen: FrozenCopyTeacher | None = None
        self.updates = 0
        self.updated_this_step = False
        self.view: Any = None
        # It acts once every sync_steps steps: the activity watch waits that long before judging.
        self.activity_window = self.options.sync_steps

    def setup(self, run: Any) -> None:
        self.model = run.model
        if run.config.lora:
            self.mode = "lora"
            self.params = {n: p for n, p in run.model.named_parameters() if p.requires_grad}
            self.shadow = {n: p.detach().float().clone() for n, p in self.params.items()}
            self.view = SwappedWeightsTeacher(run.model, self.params, self.shadow)
        else:
            self.mode = "full"
            # Reuse the loop's frozen copy when it made one: a second full copy would double memory.
            self.frozen = run.teacher if isinstance(run.teacher, FrozenCopyTeacher) else FrozenCopyTeacher(run.model)
            self.params = dict(run.model.named_parameters())
            self.shadow = dict(self.frozen.model.named_parameters())
            self.view = self.frozen

    def teacher(self, run: Any) -> Any:
        return self.view

    @torch.no_grad()
    def update(self) -> None:
        """One EMA step of every tracked tensor towards the student's current value."""
        for name, p in self.params.items():
            ema_update_(self.shadow[name].data, p, self.options.beta)
        self.updates += 1

    def on_step_end(self, run: Any) -> None:
        self.updated_this_step = run.step % self.options.sync_steps == 0
        if self.updated_this_step:
            self.update()

    def inert_reason(self, run: Any) -> str | None:
        """An EMA that is never updated (or whose update changes nothing) is a frozen initial teacher."""
        if self.options.sync_steps >= run.config.steps:
            return (f"ema.sync_steps={self.options.sync_steps} ≥ --steps {run.config.steps}, so the teacher is "
                    "never updated before the run ends: it stays the initial model (a frozen teacher, not an "
                    "EMA); lower -o ema.sync_steps")
        if self.options.beta == 1.0:
            return "ema.beta=1 keeps the teacher's weights unchanged at every update; use a beta below 1"
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "updates": self.updates,
                "shadow": {n: t.detach().cpu().clone() for n, t in self.shadow.items()}}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("mode") != self.mode:
            from unisd.errors import CheckpointError

            raise CheckpointError(f"ema state was saved in {state.get('mode')} mode, resumed in {self.mode} mode")
        for name, tensor in state["shadow"].items():
            runtime.copy_whole_into(self.shadow[name].data, tensor)
        self.updates = int(state.get("updates", 0))

    @torch.no_grad()
    def distance(self) -> float:
        """L2 distance between the teacher's and the student's tracked tensors."""
        total = 0.0
        for name, p in self.params.items():
            total += float(runtime.whole((self.shadow[name].float() - p.detach().float()).pow(2).sum()))
        return math.sqrt(total)

    def metrics(self) -> dict[str, float]:
        """EMA distance teacher↔student and the number of EMA updates so far."""
        if self.mode is None:
            return {}
        return {"distance": self.distance(), "updates": float(self.updates),
                "activity": 1.0 if self.updated_this_step and self.options.beta < 1.0 else 0.0}


@hookimpl
def register_components(register: Any) -> None:
    """This module is its own plugin (entry point ``ema``): ``UNISD_DISABLE_PLUGINS=ema`` leaves it out."""
    register(Ema)
