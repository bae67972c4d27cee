"""The plugin that ships with unisd-core: generation backends (hf, vllm, vllm-server) and the demo task."""

from __future__ import annotations

from .demo import DemoTask
from .hookspecs import hookimpl
from .rollout import HFBackend
from .vllm_backend import VLLMBackend, VLLMServerBackend


@hookimpl
def register_backends(register):
    register(HFBackend)
    register(VLLMBackend)  # imports vllm only when a run selects it
    register(VLLMServerBackend)


@hookimpl
def register_tasks(register):
    register(DemoTask)
