"""Where unisd keeps files of its own between runs: converted models, data indexes, embeddings, negatives."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$UNISD_CACHE_DIR``, else ``$XDG_CACHE_HOME/unisd``, else ``~/.cache/unisd``."""
    env = os.environ.get("UNISD_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "unisd"
