"""``unisd sweep SWEEP.toml``: run a grid of trainings and their evaluations, one job per device."""

from __future__ import annotations

from pathlib import Path

import typer

from ..ops.scheduler import SweepRunner, parse_devices, shell_command, slot_gpus
from ..ops.sweep import PHASES, Job, load_sweep, only_methods, plan
from ..plugins import UnisdPluginManager
from .errors import cli_errors


def has_command(app: typer.Typer, name: str) -> bool:
    """Whether ``app`` has a command ``name`` (registered directly or by a plugin's hook)."""
    for info in app.registered_commands:
        callback_name = getattr(info.callback, "__name__", "")
        if info.name == name or (info.name is None and callback_name.replace("_", "-") in (name, f"{name}-command")):
            return True
    return any(g.name == name for g in app.registered_groups)


def describe(job: Job) -> str:
    """One line about what a job trains with (components and their options)."""
    if job.config is None or job.phase != "train":
        return ""
    comps = ", ".join(
        f"{name}({', '.join(f'{k}={v}' for k, v in sorted(opts.items()))})" if opts else name
        for name, opts in sorted(job.config.components.items())
    ) or "none"
    cfg = job.config
    control = f" reference_control={cfg.reference_control}" if cfg.reference_control != "none" else ""
    return (f"components: {comps} | steps={cfg.steps} batch_size={cfg.batch_size} grad_accum={cfg.grad_accum} "
            f"alpha={cfg.alpha} lr={cfg.lr} seed={cfg.seed}{control}")


def register(app: typer.Typer, pm: UnisdPluginManager) -> None:
    @app.command("sweep")
    def sweep_command(
        sweep_file: Path = typer.Argument(..., help="The sweep TOML (format: see `python -m pydoc unisd.ops.sweep`)."),
        devices: str = typer.Option(None, "--devices", help="'cpu' or GPU indices 0,1,...: one job per entry at a time; "
                                    "0+1,2+3: slots of two GPUs, training on both (default: every visible GPU, else cpu)."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Print every job and its command; run nothing."),
        output_root: Path = typer.Option(None, "--output-root", help="Where runs go (overrides output_root in the file)."),
        only: list[str] = typer.Option(None, "--only", metavar="METHOD", help="Run only this method of the file "
                                       "(repeatable); the others' runs are left as they are."),
        cleanup: bool = typer.Option(False, "--cleanup", help="Delete each run's checkpoints/ once its evaluations are "
                                     "done (final/ is kept). Off by default: nothing is ever deleted."),
    ) -> None:
        """Run a sweep: models × tasks × presets/components × option grids × seeds; phases cache → train → eval.

        Finished jobs are skipped, so rerunning the same command resumes an interrupted sweep.
        Failed jobs are listed with their commands in OUTPUT_ROOT/failed_jobs.md.
        """
        with cli_errors():
            spec = only_methods(load_sweep(sweep_file, output_root), list(only or []))
            jobs = plan(spec, pm)
            slots = parse_devices(devices)
            eval_ok = has_command(app, "eval")
            counts = {p: sum(j.phase == p for j in jobs) for p in PHASES}
            seeds = f" ({len(spec.seeds)} seeds each: {', '.join(map(str, spec.seeds))})" if spec.seeds else ""
            typer.echo(f"Sweep {sweep_file}: {counts['train']} train{seeds}, {counts['eval']} eval, {counts['cache']} "
                       f"cache job(s) on {','.join(slots)} → {spec.output_root}")
            if dry_run:
                _print_plan(jobs, slots, eval_ok, spec.output_root)
                return
            runner = SweepRunner(jobs, spec.output_root, slots, echo=typer.echo, eval_available=eval_ok,
                                 cleanup=cleanup)
            statuses = runner.run()
            summary: dict[str, int] = {}
            for st in statuses.values():
                summary[st.status] = summary.get(st.status, 0) + 1
            typer.echo("Sweep finished: " + ", ".join(f"{v} {k}" for k, v in sorted(summary.items())))
            if summary.get("failed") or summary.get("blocked"):
                typer.echo(f"See {spec.output_root / 'failed_jobs.md'} for the failed commands.", err=True)
                raise typer.Exit(1)


def _print_plan(jobs: list[Job], slots: list[str], eval_ok: bool, root: Path) -> None:
    python = ["python"]
    for phase in PHASES:
        phase_jobs = [j for j in jobs if j.phase == phase]
        if not phase_jobs:
            continue
        typer.echo(f"\n# {phase} ({len(phase_jobs)})")
        for job in phase_jobs:
            if job.marker.exists():
                state = f"skip: {job.marker.name} exists"
            elif phase == "eval" and not eval_ok:
                state = "skip: `unisd eval` is not installed"
            else:
                state = "run"
            typer.echo(f"[{state}] {job.label}")
            if job.config is not None:
                typer.echo(f"    {describe(job)}")
            typer.echo(f"    {shell_command(python, job)}")
    typer.echo(f"\nDry run: nothing was started. Each training job's full config is written to {root / 'jobs'} "
               f"when it starts; jobs run {len(slots)} at a time.")
    widths = sorted({len(slot_gpus(s)) for s in slots if len(slot_gpus(s)) > 1})
    if widths:
        typer.echo(f"Training jobs on a slot of {' or '.join(map(str, widths))} GPUs run with --num-processes "
                   f"equal to the slot's GPU count (one process per GPU); evaluations use one process.")
