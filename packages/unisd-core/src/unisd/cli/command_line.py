"""The command a user typed, rebuilt from the parsed options (for model cards and run records).

Rebuilt rather than read from ``sys.argv``: the same function serves a console script, ``python -m
unisd``, a relaunched multi-process run and an in-process call (tests, notebooks), and it leaves out
options that were not given. Parameters are read by duck typing (``param_type_name``, ``opts``):
Typer ships its own copy of click's classes, so ``isinstance`` checks against click would fail.
"""

from __future__ import annotations

import shlex
from typing import Any


def _words(param: Any, value: Any) -> list[str]:
    values = list(value) if isinstance(value, list | tuple) else [value]
    if param.param_type_name == "argument":
        return [str(v) for v in values]
    if param.param_type_name != "option":
        return []
    if getattr(param, "is_flag", False):
        if value is False and param.secondary_opts:
            return [param.secondary_opts[0]]
        return [param.opts[0]] if value else []
    return [word for v in values for word in (param.opts[0], str(v))]


def command_line(ctx: Any, program: str = "unisd") -> str:
    """``unisd train --model M --steps 2 ...`` for the command that ``ctx`` (a click/Typer context) runs."""
    words = [program, *ctx.command_path.split()[1:]]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if value is None or value == [] or value == () or (param.param_type_name == "option" and value == param.default):
            continue
        words += _words(param, value)
    return shlex.join(words)
