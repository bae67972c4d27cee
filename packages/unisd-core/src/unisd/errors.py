"""Typed errors. Library code raises these; only the CLI turns them into messages and exit codes."""

from __future__ import annotations


class UnisdError(Exception):
    """Base class of every error unisd raises on purpose."""


class UsageError(UnisdError):
    """Bad input from the user (a name, option, file or value). The CLI exits with code 2."""


class UnknownNameError(UsageError):
    """A component, task, backend or preset name that is not registered."""

    def __init__(self, kind: str, name: str, available: list[str], suggestions: list[str]):
        self.kind, self.name, self.available, self.suggestions = kind, name, available, suggestions
        message = f"Unknown {kind} '{name}'."
        if suggestions:
            message += f" Did you mean: {', '.join(suggestions)}?"
        else:
            message += " (is the plugin installed?)"
        if available:
            message += f" Available: {', '.join(available)}"
        super().__init__(message)


class OptionError(UsageError):
    """A `-o name.key=value` option that does not fit the component's Options."""


class DataError(UsageError):
    """An input data file or record that cannot be used, with where it is and how to fix it."""


class ConfigError(UsageError):
    """A run configuration (TOML or flags) that is inconsistent."""


class CheckpointError(UsageError):
    """A checkpoint or run directory that cannot be resumed from."""


class PluginConflictError(UnisdError):
    """Two plugins register the same name for the same kind of thing."""


class TrainingInterrupted(UnisdError):
    """SIGINT/SIGTERM arrived; the step in progress was finished and checkpointed."""


class TrainingDiverged(UnisdError):
    """Too many optimiser steps in a row had a non-finite loss or gradient."""
