"""Where unisd keeps files of its own between runs: converted models, data indexes, embeddings, negatives."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any


def cache_dir() -> Path:
    """``$UNISD_CACHE_DIR``, else ``$XDG_CACHE_HOME/unisd``, else ``~/.cache/unisd``."""
    env = os.environ.get("UNISD_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "unisd"


def digest(parts: list[Any]) -> str:
    """A cache key: a short SHA-256 of ``parts`` as JSON (anything else as its ``str``)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode("utf-8")).hexdigest()[:32]


def package_versions(names: tuple[str, ...]) -> list[str]:
    """``name==version`` for each installed distribution of ``names`` (``name: none`` where absent), for
    keys of cached results that an upgrade may change."""
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for name in names:
        try:
            found.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            found.append(f"{name}: none")
    return found
