"""``unisd report RUNS...``: one results table (markdown, CSV) and PNG plots from run directories."""

from __future__ import annotations

from pathlib import Path

import typer

from ..ops.report import collect, write_report
from ..plugins import UnisdPluginManager
from .errors import cli_errors


def register(app: typer.Typer, pm: UnisdPluginManager) -> None:
    @app.command("report")
    def report_command(
        runs: list[Path] = typer.Argument(..., help="Run directories, or folders holding them (e.g. a sweep's output root)."),
        baseline: Path = typer.Option(None, "--baseline", help="The run every delta is computed against."),
        output: Path = typer.Option(Path("report"), "--output", help="Folder for results.md/.csv, report.json and the PNGs."),
        metric: str = typer.Option(None, "--metric", help="Main score of the ablation chart, e.g. demo/accuracy "
                                   "(default: the first accuracy found, else the final loss)."),
        plots: bool = typer.Option(True, "--plots/--no-plots", help="Draw PNG figures (needs matplotlib: unisd-core[report])."),
    ) -> None:
        """Collect runs into a results table with deltas vs a baseline, and plot curves and an ablation chart."""
        with cli_errors():
            summaries, base = collect(list(runs), baseline)
            written = write_report(summaries, base, output, metric=metric, plots=plots)
        typer.echo(f"Reported {len(summaries)} run(s):")
        for path in written:
            typer.echo(f"  {path}")
