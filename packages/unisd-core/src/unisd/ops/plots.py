"""PNG figures of a report (matplotlib, Agg backend), one per metric family, drawn per *group* of seeds.

* ``ablation.png``: the main metric per group: a bar at the mean, an error bar for the 95% interval,
  each seed as a dot, the numbers written beside it (3 significant digits). The axis range follows the
  data, so small differences stay visible (the axis says when it does not start at 0).
* ``curves_loss.png``: training loss, divergence (when it differs from the loss) and the loss terms
  components add (``loss/…``).
* ``curves_eval_TASK.png``: evaluations during training (student and teacher accuracy, privileged gap),
  starting from eval/before.json at step 0 where it measured the same task.
* ``curves_FAMILY.png``: each component's metrics (``ema/…``, ``agreement/…``).

Curves show a group's mean over seeds with a band for its 95% interval. A group keeps one colour, line
style and marker in every figure; a metric that never changes (in any run), or repeats another of its
family exactly, is left out.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from ..errors import UsageError
from .report import Group, RunSummary, num
from .stats import CONFIDENCE, summarize

MAX_PANELS = 6  # per figure; further metrics of a family are in metrics.jsonl / the CSV
LINESTYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
UNTRAINED_STYLE = {"color": "0.45", "linestyle": ":", "marker": "x"}
HELD_OUT_ORDER = ("student_accuracy", "teacher_accuracy", "privileged_gap", "gap_closed")


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


def group_styles(groups: list[Group]) -> dict[str, dict[str, str]]:
    """Colour, line style and marker of each group, the same in every figure. Styles and markers cycle at
    other periods than the 10 colours, so overlapping lines (and groups beyond ten) stay distinguishable."""
    styles: dict[str, dict[str, str]] = {}
    i = 0
    for group in groups:
        if group.untrained:
            styles[group.label] = dict(UNTRAINED_STYLE)
            continue
        styles[group.label] = {"color": f"C{i % 10}", "linestyle": LINESTYLES[i % len(LINESTYLES)],
                               "marker": MARKERS[i % len(MARKERS)]}
        i += 1
    return styles


# ----------------------------------------------------------------------------------------------
# Series


def _series(run: RunSummary, key: str) -> dict[float, float]:
    """step → value of ``key`` in metrics.jsonl. An evaluation series (``eval/TASK/KEY``) on the run's own
    task gets step 0 from eval/before.json and its last step from eval/after.json when they are missing:
    the same evaluation (items, limit, greedy decoding), measured before and after the loop."""
    points: dict[float, float] = {}
    for rec in run.records:
        value = rec.get(key)
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                continue
        if isinstance(value, int | float) and not isinstance(value, bool) and "step" in rec:
            points[float(rec["step"])] = float(value)
    match = re.fullmatch(r"eval/(.+)/([^/]+)", key)
    if points and match and match[1] == run.task and run.config.get("eval_task") == run.task:
        if f"before/{match[2]}" in run.scores:
            points.setdefault(0.0, run.scores[f"before/{match[2]}"])
        if f"after/{match[2]}" in run.scores and run.steps:
            points.setdefault(float(run.steps), run.scores[f"after/{match[2]}"])
    return dict(sorted(points.items()))


def band(group: Group, key: str) -> tuple[list[float], list[float], list[float], list[float], int]:
    """Steps, mean, interval low/high across the group's seeds at each step, and the most seeds at a step."""
    per_run = [_series(r, key) for r in group.runs]
    steps = sorted({x for s in per_run for x in s})
    xs, mean, low, high, most = [], [], [], [], 0
    for x in steps:
        st = summarize([s[x] for s in per_run if x in s], CONFIDENCE)
        if st.n == 0:
            continue
        xs.append(x)
        mean.append(st.mean)
        low.append(st.low if st.n > 1 else st.mean)
        high.append(st.high if st.n > 1 else st.mean)
        most = max(most, st.n)
    return xs, mean, low, high, most


def is_constant(groups: list[Group], key: str) -> bool:
    """Whether ``key`` has one value in every run and step (or none at all): nothing to plot."""
    values = {round(v, 12) for g in groups for r in g.runs for v in _series(r, key).values() if math.isfinite(v)}
    return len(values) <= 1


def _same_series(groups: list[Group], a: str, b: str) -> bool:
    """Whether two metrics have the same values in every run (e.g. loss = divergence without components)."""
    return all(_series(r, a) == _series(r, b) for g in groups for r in g.runs)


def families(groups: list[Group]) -> dict[str, list[str]]:
    """Metric families of metrics.jsonl that vary: ``loss`` (loss, divergence, loss/…), ``eval/TASK``, and
    each component's prefix; keys in a stable order (held-out metrics in their usual order first)."""
    keys = {k for g in groups for r in g.runs for rec in r.records for k in rec}
    out: dict[str, list[str]] = {"loss": [k for k in ("loss", "divergence") if k in keys]}
    for key in sorted(k for k in keys if "/" in k):
        family = key.rsplit("/", 1)[0]
        out.setdefault(family, []).append(key)

    def order(key: str) -> tuple[int, str]:
        last = key.rsplit("/", 1)[-1]
        return (HELD_OUT_ORDER.index(last) if last in HELD_OUT_ORDER else len(HELD_OUT_ORDER), key)

    varying = {}
    for family, members in out.items():
        kept: list[str] = []
        for key in members:  # a constant, or a copy of a series already shown, adds nothing
            if not is_constant(groups, key) and not any(_same_series(groups, key, k) for k in kept):
                kept.append(key)
        if kept:
            varying[family] = kept if family == "loss" else sorted(kept, key=order)
    return varying


# ----------------------------------------------------------------------------------------------
# Figures


def curves_figure(plt: Any, groups: list[Group], keys: list[str], title: str,
                  styles: dict[str, dict[str, str]]) -> Any:
    """One panel per key, stacked with a shared step axis; a line (mean) and band (interval) per group."""
    from matplotlib.ticker import MaxNLocator

    keys = keys[:MAX_PANELS]
    groups = [g for g in groups if any(_series(r, k) for r in g.runs for k in keys)]  # only those with data
    height = 0.8 + 2.4 * len(keys)
    legend_h = _legend_height(len(groups))
    fig, axes = plt.subplots(len(keys), 1, figsize=(8, height + legend_h), sharex=True, squeeze=False)
    for ax, key in zip(axes[:, 0], keys, strict=True):
        for group in groups:
            i = list(styles).index(group.label)  # staggered markers by the group's place in every figure
            xs, mean, low, high, most = band(group, key)
            if not xs:
                continue
            style = styles[group.label]
            # Hollow markers of different shapes, placed at staggered steps: where two groups' lines
            # coincide, both stay visible.
            every = max(1, len(xs) // 12)
            ax.plot(xs, mean, color=style["color"], linestyle=style["linestyle"], marker=style["marker"],
                    markersize=6, markerfacecolor="none", markeredgewidth=1.2, linewidth=1.4,
                    markevery=(i % every, every), label=f"{group.label} (n={most})")
            if most > 1:
                # fainter with many groups, so overlapping bands do not fill the panel
                ax.fill_between(xs, low, high, color=style["color"], alpha=0.15 if len(groups) <= 3 else 0.07,
                                linewidth=0)
        ax.set_ylabel(key.rsplit("/", 1)[-1] if "/" in key else key)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("optimiser step")
    axes[-1, 0].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0, 0].set_title(f"{title}: mean over seeds, band = {CONFIDENCE * 100:g}% CI (Student t)", fontsize=10)
    _legend_below(fig, axes[0, 0], legend_h)
    return fig


def _legend_height(entries: int) -> float:
    """Inches under the axes for a legend of three columns."""
    return 0.25 + 0.2 * math.ceil(entries / 3)


def _legend_below(fig: Any, ax: Any, height: float) -> None:
    """The legend in a band under the axes, where it never covers data or the numbers beside the bars."""
    handles, labels = ax.get_legend_handles_labels()
    bottom = height / fig.get_figheight()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(3, len(labels)), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, bottom if handles else 0, 1, 1))


def _axis_range(lows: list[float], highs: list[float]) -> tuple[float, float, bool]:
    """The value axis of the bar chart: from the data, padded; from 0 only when 0 is near the data
    compared with its spread (else bars of 0.70 and 0.74 would look equal). Also says if 0 was left out."""
    lo, hi = min(lows), max(highs)
    span = hi - lo if hi > lo else max(abs(hi), 1e-3) * 0.2
    left = lo - 0.2 * span
    if lo >= 0 and (left < 0 or lo <= 0.5 * span):
        left = 0.0
    right = hi + 0.35 * (hi - left)  # room for the numbers written beside the bars
    return left, right, left > 0 or hi < 0


def ablation_figure(plt: Any, groups: list[Group], baseline: RunSummary | None, metric: str,
                    styles: dict[str, dict[str, str]]) -> Any | None:
    """Bars at each group's mean of ``metric`` with its 95% interval as error bars and each seed as a dot."""
    items = [(g, g.stats(metric), [v for v in g.values(metric) if math.isfinite(v)]) for g in groups]
    items = [(g, st, vals) for g, st, vals in items if st.n > 0]
    if not items:
        return None
    half = [st.half_width if st.n > 1 else 0.0 for _, st, _ in items]
    lows = [min(st.mean - h, *vals) for (_, st, vals), h in zip(items, half, strict=True)]
    highs = [max(st.mean + h, *vals) for (_, st, vals), h in zip(items, half, strict=True)]
    left, right, cut = _axis_range(lows, highs)
    legend_h = _legend_height(2)
    fig, ax = plt.subplots(figsize=(9, 0.55 * len(items) + 1.8 + legend_h))
    ys = list(range(len(items)))
    means = [st.mean for _, st, _ in items]
    # Bars grow from 0 when it is in view, else from the axis edge nearest to it.
    base = 0.0 if left <= 0 <= right else (left if left > 0 else right)
    ax.barh(ys, [m - base for m in means], left=base, xerr=half, height=0.6, alpha=0.85,
            color=[styles[g.label]["color"] for g, _, _ in items],
            error_kw={"ecolor": "black", "capsize": 4, "elinewidth": 1.2})
    for y, (_, _, vals) in zip(ys, items, strict=True):
        ax.scatter(vals, [y] * len(vals), s=14, color="white", edgecolor="black", linewidth=0.8, zorder=3)
    for y, (_, st, _), h, top in zip(ys, items, half, highs, strict=True):
        text = num(st.mean) + (f" ± {num(h)}" if st.n > 1 else "") + f"  (n={st.n})"
        ax.annotate(text, (top, y), xytext=(5, 0), textcoords="offset points", va="center", fontsize=8)
    ax.scatter([], [], s=14, color="white", edgecolor="black", label="one seed")
    base = next((g for g, _, _ in items if baseline is not None and baseline in g.runs), None)
    if base is not None:
        ax.axvline(base.stats(metric).mean, color="black", linestyle="--", linewidth=1, label="baseline mean")
    ax.set_yticks(ys, [g.label for g, _, _ in items], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(left, right)
    ax.set_xlabel(metric + ("  (axis does not start at 0)" if cut else ""))
    ax.set_title(f"{metric} by group: mean, {CONFIDENCE * 100:g}% CI over seeds (Student t)", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    _legend_below(fig, ax, legend_h)
    return fig


def _save(plt: Any, fig: Any, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _file_name(family: str) -> str:
    return "curves_" + re.sub(r"[^A-Za-z0-9._-]+", "_", family) + ".png"


def plot_all(groups: list[Group], baseline: RunSummary | None, metric: str, output: Path) -> list[Path]:
    """Write every figure that has data; returns the files written."""
    plt = require_matplotlib()
    styles = group_styles(groups)
    written = []
    fig = ablation_figure(plt, groups, baseline, metric, styles)
    if fig is not None:
        written.append(_save(plt, fig, output / "ablation.png"))
    trained = [g for g in groups if not g.untrained]  # the untrained base has no training curves
    for family, keys in families(trained).items():
        title = "training loss" if family == "loss" else family
        written.append(_save(plt, curves_figure(plt, trained, keys, title, styles), output / _file_name(family)))
    return written
