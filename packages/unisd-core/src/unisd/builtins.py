"""The plugin that ships with unisd-core: generation backends (hf, vllm, vllm-server), the demo task and
the experiment trackers (tensorboard, wandb, trackio, mlflow)."""

from __future__ import annotations

from .data.demo import DemoTask
from .hookspecs import hookimpl
from .io.trackers import BUILTIN_TRACKERS
from .model.rollout import HFBackend
from .model.vllm_backend import VLLMBackend, VLLMServerBackend


@hookimpl
def register_backends(register):
    register(HFBackend)
    register(VLLMBackend)  # imports vllm only when a run selects it
    register(VLLMServerBackend)


@hookimpl
def register_tasks(register):
    register(DemoTask)


@hookimpl
def register_trackers(register):
    for tracker in BUILTIN_TRACKERS:  # each imports its package only when a run selects it
        register(tracker)
