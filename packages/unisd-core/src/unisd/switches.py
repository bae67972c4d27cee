"""``UNISD_*`` environment switches: implementation choices that change speed, not results beyond float
rounding (oneDNN products, the lean decoding loop and forward, transformers' Hub kernels, the chunked divergence's
low-precision products). Every switch reads its value the same way (:func:`env_flag`)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from .errors import UsageError

_ON = ("1", "true", "on", "yes")
_OFF = ("0", "false", "off", "no")


def env_flag(name: str, default: bool) -> bool:
    """The switch ``name``: ``default`` when unset or empty, True for 1/true/on/yes, False for 0/false/off/no
    (any case); anything else is a :class:`~unisd.errors.UsageError` naming the variable."""
    raw = os.environ.get(name, "")
    value = raw.strip().lower()
    if not value:
        return default
    if value in _ON:
        return True
    if value in _OFF:
        return False
    raise UsageError(f"environment variable {name}={raw!r} is not a switch value: "
                     f"use one of {', '.join(_ON)} or {', '.join(_OFF)}")


# every switch unisd reads, with its default (read in the hot path, so checked once up front by the CLI)
SWITCHES = {"UNISD_ONEDNN": True, "UNISD_LEAN_DECODING": True, "UNISD_LEAN_FORWARD": True,
            "UNISD_HUB_KERNELS": False, "UNISD_CHUNKED_LOWP": True}


def switch(name: str) -> bool:
    """The switch ``name`` (one of :data:`SWITCHES`) with its default: :func:`env_flag`."""
    return env_flag(name, SWITCHES[name])


def check_switches() -> None:
    """Reads every switch once: a bad value is a :class:`~unisd.errors.UsageError` before any work starts,
    not in the middle of a forward pass where the switch is next read."""
    for name in SWITCHES:
        switch(name)


@contextlib.contextmanager
def environ_set(name: str, value: str) -> Iterator[None]:
    """Within the block the environment variable ``name`` is ``value``; its earlier value (or its absence) is
    restored after, also after an exception."""
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before
