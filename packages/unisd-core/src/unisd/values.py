"""Typed values from strings: ``-o NAME.KEY=VALUE`` options and ``--config`` settings alike.

The one conversion both the component machinery and the run configuration use, so neither imports
the other.
"""

from __future__ import annotations

import types
import typing
from typing import Any

from .errors import OptionError

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def convert_value(raw: Any, tp: Any, where: str) -> Any:
    """Turn a string from the command line (or a TOML value) into the option's declared type."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return _convert_optional(raw, args, where)
    if origin is list:
        return _convert_list(raw, args, where)
    if not isinstance(raw, str):
        return _check_typed(raw, tp, where)
    return _parse_text(raw, tp, where)


def _convert_optional(raw: Any, args: tuple[Any, ...], where: str) -> Any:
    """``X | None``: "none", "null" and "" (as well as None itself) mean None; anything else is an X."""
    non_none = [a for a in args if a is not type(None)]
    if isinstance(raw, str) and raw.lower() in {"none", "null", ""}:
        return None
    if raw is None:
        return None
    return convert_value(raw, non_none[0], where)


def _convert_list(raw: Any, args: tuple[Any, ...], where: str) -> list[Any]:
    """``list[X]``: a TOML array, or "a,b" from the command line; each item converted, its index in errors."""
    item = args[0] if args else str
    if isinstance(raw, str):
        raw = [part.strip() for part in raw.split(",") if part.strip()]
    if not isinstance(raw, list | tuple):
        raise OptionError(f"{where}: expected a list, got {raw!r}")
    return [convert_value(value, item, f"{where}[{i}]") for i, value in enumerate(raw)]


def _check_typed(raw: Any, tp: Any, where: str) -> Any:
    """A value TOML already typed: kept when it has the type (an integer is a float too), else an error."""
    if tp is float and isinstance(raw, int | float) and not isinstance(raw, bool):
        return float(raw)
    if isinstance(raw, tp):
        return raw
    raise OptionError(f"{where}: expected {tp.__name__}, got {raw!r}")


def _parse_text(raw: str, tp: Any, where: str) -> Any:
    """A string for a scalar type; an unparsable one, or a type options cannot have, is an OptionError."""
    try:
        if tp is bool:
            return _parse_bool(raw)
        if tp in (int, float, str):
            return tp(raw)
    except ValueError:
        raise OptionError(f"{where}: expected {tp.__name__}, got {raw!r}") from None
    raise OptionError(f"{where}: unsupported option type {tp!r}")


def _parse_bool(raw: str) -> bool:
    """true/yes/on/1 or false/no/off/0, any case; anything else is a ValueError, as for int("x")."""
    low = raw.lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ValueError(raw)
