"""``unisd export RUN --output DIR`` (a merged model for serving) and ``unisd push RUN REPO`` (the Hub)."""

from __future__ import annotations

from pathlib import Path

import typer

from ..model.export import DTYPES, export_run, push_run
from ..plugins import UnisdPluginManager
from .errors import cli_errors


def register(app: typer.Typer, pm: UnisdPluginManager) -> None:  # noqa: ARG001 - same signature as every command
    @app.command("export")
    def export_command(
        run: Path = typer.Argument(..., help="A run directory (its final/ is exported)."),
        output: Path = typer.Option(..., "--output", "-o", help="Where to write the model."),
        merge: bool = typer.Option(True, "--merge/--no-merge", help="Fold a LoRA adapter into the base weights "
                                   "(one plain model for serving); --no-merge copies the adapter as it is."),
        dtype: str = typer.Option("auto", "--dtype", help=f"Weights' dtype when merging: {', '.join(DTYPES)} "
                                  "(auto: the base model's own)."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --output."),
    ) -> None:
        """Write a run's model, merged for serving, with a model card (README.md)."""
        with cli_errors():
            path = export_run(run, output, merge=merge, dtype=dtype, overwrite=overwrite)
        typer.echo(f"Wrote {path}")

    @app.command("push")
    def push_command(
        run: Path = typer.Argument(..., help="A run directory (its final/ is uploaded)."),
        repo: str = typer.Argument(..., help="Hub repository id, e.g. me/smollm2-sd."),
        merge: bool = typer.Option(False, "--merge/--no-merge", help="Upload the merged model instead of the adapter."),
        private: bool = typer.Option(False, "--private", help="Create the repository as private."),
        token: str = typer.Option(None, "--token", help="Hub token (default: HF_TOKEN or `hf auth login`)."),
    ) -> None:
        """Upload a run's model and its model card to the Hugging Face Hub."""
        with cli_errors():
            url = push_run(run, repo, merge=merge, private=private, token=token)
        typer.echo(f"Pushed to {url}")
