"""unisd: on-policy self-distillation for large language models.

What a plugin needs is importable from here: ``hookimpl`` to mark hook implementations, ``Component``,
``option`` and ``Preset`` to write components, ``Example``, ``Task`` and ``Score`` to write tasks, and
the error classes. Importing ``unisd`` does not import torch.
"""

from importlib.metadata import PackageNotFoundError, version

from .components import Component, Preset, option
from .data.tasks import Example, Score, Task
from .errors import (
    CheckpointError,
    ConfigError,
    DataError,
    OptionError,
    PluginConflictError,
    TrainingDiverged,
    TrainingInterrupted,
    UnisdError,
    UnknownNameError,
    UsageError,
)
from .hookspecs import hookimpl

try:
    __version__ = version("unisd-core")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

__all__ = [
    "CheckpointError",
    "Component",
    "ConfigError",
    "DataError",
    "Example",
    "OptionError",
    "PluginConflictError",
    "Preset",
    "Score",
    "Task",
    "TrainingDiverged",
    "TrainingInterrupted",
    "UnisdError",
    "UnknownNameError",
    "UsageError",
    "__version__",
    "hookimpl",
    "option",
]
