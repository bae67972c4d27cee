"""What a plugin's ``register_commands`` hook needs so its commands behave like unisd's own.

``cli_errors()`` wraps a command's body: library errors (:mod:`unisd.errors`) become one clear message
and exit code 2 for bad input (1 for other failures, 130 for an interrupt). Plugins import it from here,
not from ``unisd.cli``, whose modules are the CLI's own and may move.
"""

from __future__ import annotations

from .cli.errors import cli_errors

__all__ = ["cli_errors"]
