"""``make_app(pm)``: the Typer application for one plugin manager (no hook runs at import time)."""

from __future__ import annotations

import typer

from .. import __version__
from ..plugins import UnisdPluginManager
from ..switches import check_switches
from . import doctor_cmd, export_cmd, plugins_cmd, report_cmd, sweep_cmd, train_cmd
from .errors import cli_errors

HELP = """On-policy self-distillation of LLMs, with composable mechanisms.

\b
Examples:
  unisd train                          # built-in demo: SmolLM2-135M, CPU, < 10 min
  unisd train --model DIR --data train.jsonl --steps 100 --output runs/x
  unisd train --task demo --with ema --with clip -o clip.max_value=5
  unisd train --resume runs/x          # continue a run exactly
  unisd plugins --json                 # what is installed, from which package
  unisd export runs/x -o merged        # one merged model for serving, with a model card
"""


def _version(value: bool) -> None:
    if value:
        typer.echo(f"unisd {__version__}")
        raise typer.Exit()


def _quiet_libraries() -> None:
    """Our own progress bar and messages are enough: silence the libraries' per-file loading bars."""
    import os
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")


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
        _quiet_libraries()
        with cli_errors():
            check_switches()  # a bad UNISD_* value exits 2 here, before any command's work

    train_cmd.register(app, pm)
    plugins_cmd.register(app, pm)
    doctor_cmd.register(app, pm)
    report_cmd.register(app, pm)
    sweep_cmd.register(app, pm)
    export_cmd.register(app, pm)
    pm.hook.register_commands(app=app)
    return app
