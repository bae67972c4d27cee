"""Entry point of the ``unisd`` console script and ``python -m unisd``."""

from __future__ import annotations

from ..plugins import get_plugin_manager
from .app import make_app


def main() -> None:
    app = make_app(get_plugin_manager())
    app(prog_name="unisd")
