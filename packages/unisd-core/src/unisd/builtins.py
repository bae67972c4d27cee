"""The plugin that ships with unisd-core: the "hf" backend and the embedded demo task."""

from __future__ import annotations

from .demo import DemoTask
from .hookspecs import hookimpl
from .rollout import HFBackend


@hookimpl
def register_backends(register):
    register(HFBackend)


@hookimpl
def register_tasks(register):
    register(DemoTask)
