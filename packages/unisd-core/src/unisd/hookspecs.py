"""Hook specifications of the `unisd` plugin system.

Hooks only *register* named things. Behaviour during training is never broadcast through
pluggy: the loop calls methods on the components the user selected (``--with NAME``).
Every hook here is documented in docs/plugin-hooks.md.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("unisd")
hookimpl = pluggy.HookimplMarker("unisd")


@hookspec
def register_components(register: Callable[[type], None]) -> None:
    """Register Component classes: call ``register(ComponentClass)`` once for each.

    A component class has a ``name`` (what ``--with`` selects), an ``Options`` dataclass and any of
    the methods of :class:`unisd.components.Component`.
    """


@hookspec
def register_tasks(register: Callable[[type], None]) -> None:
    """Register Task classes: call ``register(TaskClass)`` once for each.

    A task class has a ``name`` (what ``--task`` and ``unisd eval`` select) and implements
    :class:`unisd.data.tasks.Task`.
    """


@hookspec
def register_backends(register: Callable[[type], None]) -> None:
    """Register generation backends: call ``register(BackendClass)`` once for each.

    A backend class has a ``name`` (what ``--backend`` selects) and implements
    :class:`unisd.model.rollout.Backend`.
    """


@hookspec
def register_presets(register: Callable[[Any], None]) -> None:
    """Register presets: call ``register(Preset(...))`` once for each.

    A preset is a named list of components with option values, selected by ``--preset NAME``.
    """


@hookspec
def register_trackers(register: Callable[[type], None]) -> None:
    """Register experiment trackers: call ``register(TrackerClass)`` once for each.

    A tracker class has a ``name`` (what ``--report-to`` selects) and the methods of
    :class:`unisd.io.trackers.Tracker` (``check``, ``log_metrics``, ``log_summary``, ``close``).
    """


@hookspec
def register_commands(app: Any) -> None:
    """Add commands to the ``unisd`` Typer application, e.g. ``app.command()(my_command)``.

    Called once per application built by :func:`unisd.cli.app.make_app`, never at import time.
    """
