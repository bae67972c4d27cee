"""Named collections of plugin-provided classes, with helpful errors for unknown names."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Generic, TypeVar

from .errors import PluginConflictError, UnknownNameError

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered item and the plugin (distribution) that provided it."""

    name: str
    item: T
    provider: str


class Registry(Generic[T]):
    """Maps names to registered items of one kind ("component", "task", ...).

    Registering the same name twice raises :class:`PluginConflictError` naming both providers:
    silently letting the last one win hides which implementation a run used.
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def register(self, name: str, item: T, provider: str = "unknown") -> None:
        if not name or not isinstance(name, str):
            raise ValueError(f"{self.kind} {item!r} from {provider} has no usable name")
        existing = self._entries.get(name)
        if existing is not None and existing.item is not item:
            raise PluginConflictError(
                f"{self.kind} '{name}' is registered twice: by {existing.provider} and by {provider}. "
                f"Uninstall one of them or disable it with UNISD_DISABLE_PLUGINS."
            )
        self._entries[name] = Entry(name, item, provider)

    def get(self, name: str) -> T:
        return self.entry(name).item

    def entry(self, name: str) -> Entry[T]:
        """The entry registered as ``name``; a name that differs only in ``_`` for ``-`` (or back) finds it too,
        so the research code's spellings (``unisd_star``) work without being listed twice."""
        for candidate in (name, name.replace("_", "-"), name.replace("-", "_")):
            if candidate in self._entries:
                return self._entries[candidate]
        raise UnknownNameError(self.kind, name, self.names(), self.suggest(name))

    def suggest(self, name: str) -> list[str]:
        return difflib.get_close_matches(name, self.names(), n=3, cutoff=0.6)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entries(self) -> list[Entry[T]]:
        return [self._entries[n] for n in self.names()]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and any(
            c in self._entries for c in (name, name.replace("_", "-"), name.replace("-", "_")))

    def __len__(self) -> int:
        return len(self._entries)
