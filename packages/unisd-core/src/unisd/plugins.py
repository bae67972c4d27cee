"""Discovering plugins: entry points of group ``unisd``, allow/deny lists, failure reports.

``get_plugin_manager()`` is a factory, never a module-level singleton, so every test and every CLI
invocation gets a fresh manager and nothing is registered at import time.
"""

from __future__ import annotations

import importlib
import os
import traceback
from collections import defaultdict
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from typing import Any

import pluggy

from . import hookspecs
from .errors import PluginConflictError
from .registry import Registry

GROUP = "unisd"
ENV_ALLOW = "UNISD_LOAD_PLUGINS"
ENV_DENY = "UNISD_DISABLE_PLUGINS"
BUILTIN_PLUGIN = "unisd.builtins"


@dataclass
class PluginReport:
    """What happened to one plugin: loaded, failed (with the error) or disabled."""

    name: str
    distribution: str
    status: str  # "loaded" | "failed" | "disabled" | "duplicate"
    error: str | None = None
    module: str | None = None


@dataclass
class Registries:
    """Everything the installed plugins registered, by kind."""

    components: Registry = field(default_factory=lambda: Registry("component"))
    tasks: Registry = field(default_factory=lambda: Registry("task"))
    backends: Registry = field(default_factory=lambda: Registry("backend"))
    presets: Registry = field(default_factory=lambda: Registry("preset"))
    trackers: Registry = field(default_factory=lambda: Registry("tracker"))


def _split_env(var: str) -> set[str] | None:
    value = os.environ.get(var)
    if value is None:
        return None
    return {part.strip() for part in value.split(",") if part.strip()}


def _distribution_name(ep: EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return dist.metadata["Name"] if dist is not None else "unknown"


class UnisdPluginManager(pluggy.PluginManager):
    """A pluggy manager that also keeps a report per plugin and the registries built from them."""

    def __init__(self) -> None:
        super().__init__(GROUP)
        self.add_hookspecs(hookspecs)
        self.reports: list[PluginReport] = []
        self._providers: dict[str, str] = {}  # plugin name -> distribution
        self._registries: Registries | None = None

    def register_plugin(self, plugin: Any, name: str, distribution: str) -> None:
        """Register a plugin object (module or instance) under ``name``, provided by ``distribution``."""
        self.register(plugin, name=name)
        self._providers[name] = distribution
        self.reports.append(PluginReport(name, distribution, "loaded", module=getattr(plugin, "__name__", None)))
        self._registries = None

    def provider_of(self, plugin: Any) -> str:
        name = self.get_name(plugin)
        return self._providers.get(name, name or "unknown")

    @property
    def registries(self) -> Registries:
        """Collect what every plugin registers, once; conflicts raise naming both providers."""
        if self._registries is None:
            self._registries = self._collect()
        return self._registries

    def _collect(self) -> Registries:
        regs = Registries()
        hooks = {
            "register_components": regs.components,
            "register_tasks": regs.tasks,
            "register_backends": regs.backends,
            "register_presets": regs.presets,
            "register_trackers": regs.trackers,
        }
        for hook_name, registry in hooks.items():
            # Call each implementation on its own so every registered item knows its provider.
            for impl in getattr(self.hook, hook_name).get_hookimpls():
                provider = self.provider_of(impl.plugin)

                def register(item: Any, _registry: Registry = registry, _provider: str = provider) -> None:
                    _registry.register(getattr(item, "name", None), item, _provider)

                try:
                    impl.function(register=register)
                except PluginConflictError:
                    raise
                except Exception as exc:  # a broken plugin is reported, never fatal
                    self._mark_failed(impl.plugin_name, exc)
        return regs

    def _mark_failed(self, plugin_name: str, exc: BaseException) -> None:
        for report in self.reports:
            if report.name == plugin_name:
                report.status = "failed"
                report.error = f"{type(exc).__name__}: {exc}"


def _allowed(name: str, dist: str, allow: set[str] | None, deny: set[str] | None) -> bool:
    if deny and (name in deny or dist in deny):
        return False
    if allow is not None and name not in allow and dist not in allow:
        return False
    return True


def get_plugin_manager(load_entry_points: bool = True) -> UnisdPluginManager:
    """Build a fresh plugin manager: specs, installed entry points, built-ins, then check_pending().

    ``UNISD_LOAD_PLUGINS=a,b`` loads only the named plugins (entry-point or distribution names;
    the built-ins are always kept); ``UNISD_DISABLE_PLUGINS=a,b`` skips the named ones. A plugin that
    fails to import is reported with its error and listed as failed; two entry points with the same
    name are reported naming both distributions (pluggy alone would silently drop one).
    """
    pm = UnisdPluginManager()
    allow, deny = _split_env(ENV_ALLOW), _split_env(ENV_DENY)

    if load_entry_points:
        by_name: dict[str, list[EntryPoint]] = defaultdict(list)
        for ep in entry_points(group=GROUP):
            by_name[ep.name].append(ep)
        for name, eps in sorted(by_name.items()):
            dists = sorted({_distribution_name(ep) for ep in eps})
            if len(eps) > 1 and len(dists) > 1:
                pm.reports.append(
                    PluginReport(
                        name, " and ".join(dists), "duplicate",
                        error=f"entry point '{name}' is provided by both {dists[0]} and {dists[1]}; "
                        f"only the first is loaded. Uninstall one or disable it with {ENV_DENY}.",
                    )
                )
            ep = eps[0]
            dist = _distribution_name(ep)
            if ep.value == BUILTIN_PLUGIN:
                continue  # registered below, exactly once
            if not _allowed(name, dist, allow, deny):
                pm.reports.append(PluginReport(name, dist, "disabled", module=ep.value))
                continue
            try:
                plugin = ep.load()
            except Exception as exc:
                pm.reports.append(
                    PluginReport(name, dist, "failed", error=_short_error(exc), module=ep.value)
                )
                continue
            try:
                pm.register_plugin(plugin, name, dist)
                pm.check_pending()  # a misspelt hook name is this plugin's failure, not everyone's
            except Exception as exc:
                if pm.is_registered(plugin):
                    pm.unregister(plugin)
                pm.reports = [r for r in pm.reports if r.name != name]
                pm.reports.append(PluginReport(name, dist, "failed", error=_short_error(exc), module=ep.value))

    pm.register_plugin(importlib.import_module(BUILTIN_PLUGIN), "core", "unisd-core")
    pm.check_pending()
    return pm


def _short_error(exc: BaseException) -> str:
    last = traceback.format_exception_only(type(exc), exc)[-1].strip()
    return last
