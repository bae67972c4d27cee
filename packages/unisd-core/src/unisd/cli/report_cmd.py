"""``unisd report RUNS...``: results tables (per run, and per group of seeds with mean, sd and 95% CI) and PNG plots."""

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
        metric: str = typer.Option(None, "--metric", help="Main score of the ablation chart: after/student_accuracy, "
                                   "after/gap_closed, eval/TASK/student_accuracy, TASK/accuracy, final_loss or any "
                                   "metrics.jsonl key (default: held-out student accuracy, else the final loss)."),
        plots: bool = typer.Option(True, "--plots/--no-plots", help="Draw PNG figures (needs matplotlib: unisd-core[report])."),
    ) -> None:
        """Collect runs into results tables and plots. Runs that differ only in seed form a group, reported
        as n, mean, sd and a 95% Student-t interval over seeds (printed, and in results.md/groups.csv)."""
        with cli_errors():
            summaries, base = collect(list(runs), baseline)
            written, summary = write_report(summaries, base, output, metric=metric, plots=plots)
        for line in summary:
            typer.echo(line)
        typer.echo(f"Reported {len(summaries)} run(s):")
        for path in written:
            typer.echo(f"  {path}")
