"""``make_app(pm)``: the Typer application for one plugin manager (no hook runs at import time)."""

from __future__ import annotations

import typer

from .. import __version__
from ..plugins import UnisdPluginManager
from . import plugins_cmd, train_cmd

HELP = """On-policy self-distillation of LLMs, with composable mechanisms.

Examples:

  unisd train                                   # built-in demo on SmolLM2-135M (CPU, < 10 min)

  unisd train --model DIR --data train.jsonl --steps 100 --output runs/x

  unisd train --task demo --with ema --with clip -o clip.max_value=5

  unisd plugins --json
"""


def _version(value: bool) -> None:
    if value:
        typer.echo(f"unisd {__version__}")
        raise typer.Exit()


def make_app(pm: UnisdPluginManager) -> typer.Typer:
    # Commands (also those added by plugins) reach the plugin manager as `ctx.obj`.
    app = typer.Typer(
        help=HELP, no_args_is_help=True, add_completion=False, rich_markup_mode=None,
        context_settings={"obj": pm},
    )

    @app.callback()
    def root(
        version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version and exit."),
    ) -> None:
        pass

    train_cmd.register(app, pm)
    plugins_cmd.register(app, pm)
    pm.hook.register_commands(app=app)
    return app
