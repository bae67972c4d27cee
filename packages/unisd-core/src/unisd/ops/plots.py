"""PNG figures of a report (matplotlib, Agg backend): training curves, component metrics, ablation bars."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..errors import UsageError
from .report import RunSummary, value_of

MAX_PANELS = 24  # per-component metrics beyond this are left to the CSV/metrics.jsonl


class MissingDependencyError(UsageError):
    """An optional dependency a command needs is not installed."""


def require_matplotlib() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise MissingDependencyError(
            "unisd report draws its plots with matplotlib, which is not installed. "
            "Install it with: pip install 'unisd-core[report]' (or pip install matplotlib), "
            "or pass --no-plots for the tables only."
        ) from None
    matplotlib.use("Agg", force=True)  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def _series(run: RunSummary, key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for rec in run.records:
        value = rec.get(key)
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                continue
        if isinstance(value, int | float) and not isinstance(value, bool) and "step" in rec:
            xs.append(float(rec["step"]))
            ys.append(float(value))
    return xs, ys


def _curves(plt: Any, runs: list[RunSummary], key: str, path: Path) -> Path | None:
    fig, ax = plt.subplots(figsize=(7, 4.2))
    drawn = 0
    for run in runs:
        xs, ys = _series(run, key)
        if xs:
            ax.plot(xs, ys, marker="." if len(xs) < 30 else None, label=run.name)
            drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("optimiser step")
    ax.set_ylabel(key)
    ax.set_title(f"training {key}")
    ax.grid(alpha=0.3)
    if drawn <= 12:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def component_keys(runs: list[RunSummary]) -> list[str]:
    """Per-component metrics: the ``name/key`` entries of metrics.jsonl."""
    keys = {k for r in runs for rec in r.records for k in rec if "/" in k}
    return sorted(keys)


def _components(plt: Any, runs: list[RunSummary], path: Path) -> Path | None:
    keys = component_keys(runs)[:MAX_PANELS]
    if not keys:
        return None
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys, strict=False):
        for i, run in enumerate(runs):  # one colour per run across panels, so one legend serves all
            xs, ys = _series(run, key)
            if xs:
                ax.plot(xs, ys, color=f"C{i % 10}", marker="." if len(xs) < 30 else None)
        ax.set_title(key, fontsize=9)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=f"C{i % 10}") for i in range(len(runs))]
    labels = [run.name for run in runs]
    if len(labels) <= 12:
        fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=7)
        fig.tight_layout(rect=(0, 0.08, 1, 1))
    else:
        fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _ablation(plt: Any, runs: list[RunSummary], baseline: RunSummary | None, metric: str, path: Path) -> Path | None:
    pairs = [(r, value_of(r, metric)) for r in runs]
    pairs = [(r, v) for r, v in pairs if not math.isnan(v)]
    if not pairs:
        return None
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(pairs) + 1.5))
    names = [r.name for r, _ in pairs]
    values = [v for _, v in pairs]
    colors = ["tab:orange" if baseline is not None and r is baseline else "tab:blue" for r, _ in pairs]
    bars = ax.barh(range(len(pairs)), values, color=colors)
    ax.set_yticks(range(len(pairs)), names, fontsize=7)
    ax.invert_yaxis()
    for bar, value in zip(bars, values, strict=True):
        ax.annotate(f"{value:.4g}", (bar.get_width(), bar.get_y() + bar.get_height() / 2), xytext=(3, 0),
                    textcoords="offset points", va="center", fontsize=7)
    if baseline is not None and not math.isnan(value_of(baseline, metric)):
        ax.axvline(value_of(baseline, metric), color="tab:orange", linestyle="--", linewidth=1)
    ax.set_xlabel(metric)
    ax.set_title(f"ablation: {metric}" + (f" (baseline: {baseline.name})" if baseline else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_all(runs: list[RunSummary], baseline: RunSummary | None, metric: str, output: Path) -> list[Path]:
    """Write every figure that has data; returns the files written."""
    plt = require_matplotlib()
    made = [
        _curves(plt, runs, "loss", output / "curves_loss.png"),
        _curves(plt, runs, "divergence", output / "curves_divergence.png"),
        _components(plt, runs, output / "components.png"),
        _ablation(plt, runs, baseline, metric, output / "ablation.png"),
    ]
    return [p for p in made if p is not None]
