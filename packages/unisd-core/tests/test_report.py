"""`unisd report`: reading run directories tolerantly, the results table with deltas, and the PNGs."""

from __future__ import annotations

import csv
import io
import json
import math
import random
import sys

import pytest
import typer
from typer.testing import CliRunner

from unisd.cli import report_cmd
from unisd.config import RunConfig, dump_config
from unisd.errors import UsageError
from unisd.ops.report import collect, find_runs, load_run, main_metric
from unisd.plugins import get_plugin_manager

PNG = b"\x89PNG\r\n\x1a\n"


def make_app():
    app = typer.Typer()

    @app.callback()
    def root() -> None:
        pass

    report_cmd.register(app, get_plugin_manager(load_entry_points=False))
    return app


def make_run(path, *, losses, accuracy=None, gap=None, components=None, preset=None, extra=None, cut_last=False):
    path.mkdir(parents=True)
    cfg = RunConfig(model="m", task="demo", steps=len(losses), components=components or {}, preset=preset)
    (path / "config.toml").write_text(dump_config(cfg))
    lines = []
    for step, loss in enumerate(losses, start=1):
        rec = {"step": step, "loss": loss, "divergence": loss * 0.9, "learning_rate": 1e-5}
        if components:
            rec["ema/teacher_drift"] = 0.01 * step
        lines.append(json.dumps(rec))
    text = "\n".join(lines) + "\n"
    if cut_last:
        text += '{"step": 99, "loss": '  # a crash cut this line short
    (path / "metrics.jsonl").write_text(text)
    if gap is not None:
        (path / "eval").mkdir(exist_ok=True)
        (path / "eval" / "after.json").write_text(json.dumps(
            {"student_accuracy": 0.5, "teacher_accuracy": 0.5 + gap, "privileged_gap": gap, "n": 48}))
    if accuracy is not None:
        (path / "eval" / "demo").mkdir(parents=True, exist_ok=True)
        (path / "eval" / "demo" / "results.json").write_text(json.dumps(
            {"task": "demo", "metrics": {"accuracy": accuracy, "extraction_rate": 1.0}, "n": 48, "note": "text"}))
    if extra:
        extra(path)
    return path


@pytest.fixture
def runs(tmp_path):
    rng = random.Random(0)
    root = tmp_path / "sweep"
    base = make_run(root / "base" / "m", losses=[rng.random() for _ in range(5)], accuracy=0.25, gap=0.30)
    ema = make_run(root / "ema" / "m", losses=[rng.random() for _ in range(5)], accuracy=0.375, gap=0.20,
                   components={"ema": {"beta": 0.98}}, preset="ema-preset")
    clip = make_run(root / "clip" / "m", losses=[rng.random() for _ in range(3)], cut_last=True,
                    components={"clip": {"max_value": 5.0}})
    (root / "ema" / "m" / "checkpoints" / "step-5").mkdir(parents=True)  # not a run of its own
    (root / "ema" / "m" / "final").mkdir()
    return root, base, ema, clip


def test_find_runs_below_a_folder_skips_checkpoints_and_final(runs):
    root, base, ema, clip = runs
    assert sorted(find_runs([root])) == sorted(p.resolve() for p in (base, ema, clip))


def test_load_run_reads_everything_tolerantly(runs):
    _, base, ema, clip = runs
    r = load_run(ema)
    losses = [json.loads(line)["loss"] for line in (ema / "metrics.jsonl").read_text().splitlines()]
    assert r.final_loss == losses[-1] and r.steps == 5
    assert math.isclose(r.final_divergence, losses[-1] * 0.9)
    assert r.scores["demo/accuracy"] == 0.375 and r.scores["demo/extraction_rate"] == 1.0
    assert r.scores["demo/n"] == 48 and "demo/note" not in r.scores and "demo/task" not in r.scores
    assert r.privileged_gap == 0.20
    assert r.method == "ema-preset" and r.components == "ema(beta=0.98)"
    c = load_run(clip)
    assert c.steps == 3  # the cut-off last line is ignored
    assert math.isnan(c.privileged_gap) and c.method == "clip"
    (base / "eval" / "broken.json").write_text("{not json")
    b = load_run(base)
    assert b.notes and "broken.json" in b.notes[0]
    assert b.scores["demo/accuracy"] == 0.25


def test_table_deltas_against_baseline(runs, tmp_path):
    root, base, ema, clip = runs
    out = tmp_path / "out"
    result = CliRunner().invoke(make_app(), ["report", str(root), "--baseline", str(base), "--output", str(out)])
    assert result.exit_code == 0, result.output
    rows = {r["run"]: r for r in csv.DictReader(io.StringIO((out / "results.csv").read_text()))}
    assert set(rows) == {"base/m", "ema/m", "clip/m"}
    ema_run, base_run = load_run(ema), load_run(base)
    assert float(rows["ema/m"]["delta final_loss"]) == pytest.approx(ema_run.final_loss - base_run.final_loss, abs=1e-12)
    assert float(rows["ema/m"]["delta demo/accuracy"]) == pytest.approx(0.125)
    assert float(rows["ema/m"]["delta privileged_gap"]) == pytest.approx(-0.10)
    assert float(rows["base/m"]["delta demo/accuracy"]) == 0.0
    assert rows["clip/m"]["demo/accuracy"] == "" and rows["clip/m"]["delta demo/accuracy"] == ""
    md = (out / "results.md").read_text()
    assert "| run | task | method | seed | components | steps |" in md
    assert "0.375 (+0.125)" in md and "0.200 (-0.100)" in md
    assert "Main metric: `after/student_accuracy`" in md and "baseline run `base/m`" in md
    report = json.loads((out / "report.json").read_text())
    assert report["metric"] == "after/student_accuracy" and len(report["runs"]) == 3
    for name in ("curves_loss.png", "curves_ema.png", "ablation.png"):
        assert (out / name).read_bytes()[:8] == PNG, name
    import matplotlib.image

    assert matplotlib.image.imread(out / "ablation.png").shape[0] > 100


def test_baseline_outside_the_given_runs_is_added(runs):
    root, base, ema, _ = runs
    summaries, baseline = collect([ema], base)
    assert baseline is not None and baseline.path == base.resolve()
    assert [s.path for s in summaries] == [base.resolve(), ema.resolve()]


def test_main_metric_choice(runs):
    root, base, ema, clip = runs
    summaries, _ = collect([root])
    assert main_metric(summaries) == "after/student_accuracy"  # held-out student accuracy first
    assert main_metric([load_run(ema)], None) == "after/student_accuracy"
    assert main_metric(summaries, "after/privileged_gap") == "after/privileged_gap"
    assert main_metric(summaries, "demo/accuracy") == "demo/accuracy"
    assert main_metric(summaries, "learning_rate") == "learning_rate"  # any metrics.jsonl key: its last value
    assert main_metric([load_run(clip)]) == "final_loss"
    with pytest.raises(UsageError, match="--metric nope: no run has it.*Available: demo/accuracy"):
        main_metric(summaries, "nope")


def test_missing_matplotlib_is_a_clear_error_and_no_plots_still_works(runs, tmp_path, monkeypatch):
    root, *_ = runs
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    out = tmp_path / "out"
    result = CliRunner().invoke(make_app(), ["report", str(root), "--output", str(out)])
    assert result.exit_code == 2
    assert "unisd-core[report]" in result.output and "--no-plots" in result.output
    assert not out.exists()
    result = CliRunner().invoke(make_app(), ["report", str(root), "--output", str(out), "--no-plots"])
    assert result.exit_code == 0, result.output
    assert (out / "results.md").is_file() and not list(out.glob("*.png"))


@pytest.mark.parametrize("args, message", [
    (["{missing}"], "no such run directory"),
    (["{empty}"], "no run directories found"),
    (["{root}", "--baseline", "{empty}"], "not a run directory"),
])
def test_bad_inputs_exit_2(runs, tmp_path, args, message):
    root, *_ = runs
    (tmp_path / "empty").mkdir()
    paths = {"missing": tmp_path / "missing", "empty": tmp_path / "empty", "root": root}
    result = CliRunner().invoke(make_app(), ["report", *[a.format(**paths) for a in args], "--no-plots",
                                             "--output", str(tmp_path / "o")])
    assert result.exit_code == 2 and message in result.output


# ----------------------------------------------------------------------------------------------
# Seeds: groups, mean ± t-interval checked by hand, evaluation metrics as first-class metrics, plots

# Held-out student accuracy after training of each (method, seed); before training every run has
# student 0.0 and teacher-with-reference 0.625 (the base model, greedy: the same for every seed).
AFTER = {"plain": {1: 0.125, 2: 0.1875, 3: 0.25}, "ema": {1: 0.25, 2: 0.3125, 3: 0.4375}}
T_975_DF2 = 4.302652729749464  # Student t, two-sided 95%, 2 degrees of freedom (any t table: 4.303)


def make_seed_run(root, method, seed):
    """A run as `unisd sweep` with seeds = [1, 2, 3] writes it: METHOD/demo/m-sSEED."""
    path = root / method / "demo" / f"m-s{seed}"
    path.mkdir(parents=True)
    components = {"ema": {"beta": 0.9}} if method == "ema" else {}
    cfg = RunConfig(model="m", task="demo", steps=4, seed=seed, components=components, eval_task="demo",
                    eval_every=2, output=str(path))
    (path / "config.toml").write_text(dump_config(cfg))
    after = AFTER[method][seed]
    lines = []
    for step in range(1, 5):
        rec = {"step": step, "loss": 1.0 / step + seed / 100, "divergence": 0.5 / step, "nonfinite_skipped": 0}
        if method == "ema":
            rec["ema/teacher_drift"] = 0.01 * step * seed
        if step % 2 == 0:  # --eval-every 2: the student climbs to its after-training accuracy
            rec |= {"eval/demo/student_accuracy": after * step / 4, "eval/demo/teacher_accuracy": 0.625,
                    "eval/demo/privileged_gap": 0.625 - after * step / 4, "eval/demo/n": 16}
        lines.append(json.dumps(rec))
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (path / "eval").mkdir()
    for name, student in (("before", 0.0), ("after", after)):
        (path / "eval" / f"{name}.json").write_text(json.dumps(
            {"student_accuracy": student, "teacher_accuracy": 0.625, "privileged_gap": 0.625 - student, "n": 16}))
    return path


@pytest.fixture
def seeded(tmp_path):
    root = tmp_path / "sweep"
    for method in AFTER:
        for seed in (1, 2, 3):
            make_seed_run(root, method, seed)
    return root


def hand_stats(values):
    """Mean, sample sd and 95% t half-width written out for three values."""
    a, b, c = values
    mean = (a + b + c) / 3
    sd = math.sqrt(((a - mean) ** 2 + (b - mean) ** 2 + (c - mean) ** 2) / (3 - 1))
    return mean, sd, T_975_DF2 * sd / math.sqrt(3)


def test_t_quantile_matches_tables():
    from unisd.ops.stats import t_quantile

    table = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 9: 2.262, 10: 2.228, 30: 2.042, 120: 1.980}
    for df, value in table.items():
        assert t_quantile(0.95, df) == pytest.approx(value, abs=5e-4), df
    assert t_quantile(0.95, 2) == pytest.approx(T_975_DF2, rel=1e-12)
    assert t_quantile(0.99, 4) == pytest.approx(4.604, abs=5e-4)


def test_t_quantile_agrees_with_scipy_where_installed():
    scipy_stats = pytest.importorskip("scipy.stats")
    from unisd.ops.stats import t_quantile

    for df in (1, 2, 3, 7, 20, 63, 500):
        for conf in (0.8, 0.95, 0.99):
            assert t_quantile(conf, df) == pytest.approx(scipy_stats.t.ppf((1 + conf) / 2, df), rel=1e-9)


def test_summarize_edge_cases():
    from unisd.ops.stats import summarize

    assert summarize([]).n == 0 and math.isnan(summarize([]).mean)
    one = summarize([0.5, math.nan])  # a missing value is not a seed
    assert one.n == 1 and one.mean == 0.5 and math.isnan(one.sd) and math.isnan(one.half_width)
    same = summarize([0.25, 0.25, 0.25])
    assert same.sd == 0.0 and same.half_width == 0.0


def test_report_groups_seeds_and_prints_mean_sd_and_t_interval(seeded, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(make_app(), ["report", str(seeded), "--output", str(out)])
    assert result.exit_code == 0, result.output
    text = result.output
    assert "Main metric: after/student_accuracy" in text and "Student t" in text
    for method in AFTER:
        mean, sd, half = hand_stats([AFTER[method][s] for s in (1, 2, 3)])
        assert f"\n{method}  (n=3; seeds 1, 2, 3)" in text
        line = next(ln for ln in text.splitlines() if ln.strip().startswith("after/student_accuracy")
                    and f"mean {mean:#.3g} " in ln)
        assert f"sd {sd:#.3g}" in line and f"95% CI [{mean - half:#.3g}, {mean + half:#.3g}]" in line
    # plain: 0.1875 ± 4.303 · 0.0625/√3 → [0.0322, 0.343]; printed to 3 significant digits
    assert "mean 0.188   sd 0.0625  95% CI [0.0322, 0.343]" in text

    rows = {(r["group"], r["metric"]): r for r in csv.DictReader(io.StringIO((out / "groups.csv").read_text()))}
    for method in AFTER:
        mean, sd, half = hand_stats([AFTER[method][s] for s in (1, 2, 3)])
        row = rows[(method, "after/student_accuracy")]
        assert int(row["n"]) == 3 and row["seeds"] == "1 2 3"
        assert float(row["mean"]) == pytest.approx(mean, rel=1e-12)
        assert float(row["sd"]) == pytest.approx(sd, rel=1e-12)
        assert float(row["ci_low"]) == pytest.approx(mean - half, rel=1e-9)
        assert float(row["ci_high"]) == pytest.approx(mean + half, rel=1e-9)
        # fraction of the gap closed = (after − before) / (teacher − before) = after / 0.625 here
        closed = rows[(method, "after/gap_closed")]
        assert float(closed["mean"]) == pytest.approx(mean / 0.625, rel=1e-12)
        assert float(closed["ci_high"]) - float(closed["mean"]) == pytest.approx(half / 0.625, rel=1e-9)
        # the training loss is reported beside them: final losses 0.25 + seed/100
        loss = rows[(method, "final_loss")]
        assert float(loss["mean"]) == pytest.approx(0.27) and float(loss["sd"]) == pytest.approx(0.01)
    base = rows[("untrained (before training)", "after/student_accuracy")]
    assert float(base["mean"]) == 0.0 and float(base["sd"]) == 0.0 and int(base["n"]) == 3

    md = (out / "results.md").read_text()
    mean, sd, half = hand_stats([AFTER["ema"][s] for s in (1, 2, 3)])
    assert f"| ema | ema | 1, 2, 3 | 3 | {mean:#.3g} | {sd:#.3g} | [{mean - half:#.3g}, {mean + half:#.3g}] |" in md
    assert "Student t" in md and "2 group(s)" in md and "leave out what every group's runs share: `demo/m`" in md
    report = json.loads((out / "report.json").read_text())
    assert {g["group"] for g in report["groups"]} == {"plain", "ema", "untrained (before training)"}


def test_eval_metrics_logged_during_training_are_first_class(seeded, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(make_app(), ["report", str(seeded), "--output", str(out),
                                             "--metric", "eval/demo/student_accuracy"])
    assert result.exit_code == 0, result.output
    assert "Main metric: eval/demo/student_accuracy" in result.output
    rows = {(r["group"], r["metric"]): r for r in csv.DictReader(io.StringIO((out / "groups.csv").read_text()))}
    mean, _, _ = hand_stats([AFTER["ema"][s] for s in (1, 2, 3)])  # the last logged value: step 4
    assert float(rows[("ema", "eval/demo/student_accuracy")]["mean"]) == pytest.approx(mean)
    runs = {r["run"]: r for r in csv.DictReader(io.StringIO((out / "results.csv").read_text()))}
    assert float(runs["ema/demo/m-s3"]["eval/demo/student_accuracy"]) == 0.4375
    assert runs["ema/demo/m-s3"]["seed"] == "3" and runs["ema/demo/m-s3"]["group"] == "ema"
    assert (out / "curves_eval_demo.png").read_bytes()[:8] == PNG


def test_unknown_metric_exits_2_naming_the_available_ones(seeded, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(make_app(), ["report", str(seeded), "--output", str(out), "--metric",
                                             "eval/demo/student_acc"])
    assert result.exit_code == 2
    assert "--metric eval/demo/student_acc: no run has it" in result.output
    assert "eval/demo/student_accuracy" in result.output and "after/gap_closed" in result.output
    assert not out.exists()  # refused before anything is written


def test_plots_error_bars_data_range_and_curve_families(seeded, tmp_path):
    from matplotlib.container import ErrorbarContainer

    from unisd.ops.plots import ablation_figure, families, group_styles, require_matplotlib
    from unisd.ops.report import group_runs

    plt = require_matplotlib()
    runs, _ = collect([seeded])
    groups = group_runs(runs)
    assert [g.label for g in groups] == ["untrained (before training)", "ema", "plain"]
    styles = group_styles(groups)
    assert len({(s["color"], s["linestyle"], s["marker"]) for s in styles.values()}) == 3

    fig = ablation_figure(plt, groups, None, "after/student_accuracy", styles)
    ax = fig.axes[0]
    bars = next(c for c in ax.containers if getattr(c, "errorbar", None) is not None)
    assert isinstance(bars.errorbar, ErrorbarContainer)
    # each error bar spans mean ± half-width (the untrained base has no spread: a zero-length bar)
    segments = bars.errorbar.lines[2][0].get_segments()
    for group, seg in zip(groups, segments, strict=True):
        st = group.stats("after/student_accuracy")
        assert seg[0][0] == pytest.approx(st.mean - st.half_width) and seg[1][0] == pytest.approx(st.mean + st.half_width)
    texts = [t.get_text() for t in ax.texts]
    assert "0.188 ± 0.155  (n=3)" in texts  # 3 significant digits
    assert ax.get_xlim()[0] == 0.0  # the untrained base sits at 0: the axis starts there
    assert ax.get_xlabel() == "after/student_accuracy"
    plt.close(fig)

    # Close values: the axis follows the data instead of starting at 0
    trained = [g for g in groups if not g.untrained]
    fig = ablation_figure(plt, trained, None, "after/teacher_accuracy", styles)
    assert fig is not None
    fig2 = ablation_figure(plt, trained, None, "final_loss", styles)
    left = fig2.axes[0].get_xlim()[0]
    assert 0.2 < left < 0.26 and "does not start at 0" in fig2.axes[0].get_xlabel()
    plt.close("all")

    fams = families(trained)
    assert fams["eval/demo"] == ["eval/demo/student_accuracy", "eval/demo/privileged_gap"]  # constants dropped
    assert fams["loss"] == ["loss", "divergence"] and "nonfinite_skipped" not in str(fams)
    assert fams["ema"] == ["ema/teacher_drift"]


def test_report_writes_readable_pngs(seeded, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(make_app(), ["report", str(seeded), "--output", str(out),
                                             "--baseline", str(seeded / "plain" / "demo" / "m-s1")])
    assert result.exit_code == 0, result.output
    import matplotlib.image

    names = sorted(p.name for p in out.glob("*.png"))
    assert names == ["ablation.png", "curves_ema.png", "curves_eval_demo.png", "curves_loss.png"]
    for name in names:
        assert matplotlib.image.imread(out / name).shape[0] > 200, name
    md = (out / "results.md").read_text()
    assert "| plain | plain | 1, 2, 3 | 3 |" in md
    assert "| ema | ema | 1, 2, 3 | 3 | 0.333 |" in md and "| +0.146 |" in md  # Δ vs the baseline group


def test_strip_seed_names():
    from unisd.ops.report import strip_seed

    assert strip_seed("plain/demo/m-s1", 1) == "plain/demo/m"
    assert strip_seed("a/seed12_alpha0.0/m", 12) == "a/alpha0.0/m"
    assert strip_seed("a/alpha0.0_seed3/m", 3) == "a/alpha0.0/m"
    assert strip_seed("a/seed3/m", 3) == "a/m"
    assert strip_seed("runs-s1", 2) == "runs-s1"  # another seed's suffix is part of the name


def test_groups_split_on_any_setting_but_the_seed(seeded):
    extra = make_seed_run(seeded / "x", "plain", 1)  # plain's settings, but a different learning rate
    text = (extra / "config.toml").read_text().replace("lr = 2e-05", "lr = 0.001")
    assert text != (extra / "config.toml").read_text()
    (extra / "config.toml").write_text(text)
    twin = make_seed_run(seeded / "y", "plain", 2)  # equal settings, another sweep method: its own group
    (twin / "sweep_job.json").write_text(json.dumps({"method": "control", "seed": 2}))
    runs, _ = collect([seeded])
    from unisd.ops.report import group_runs

    sizes = {g.label: len(g.runs) for g in group_runs(runs) if not g.untrained}
    assert sorted(sizes.values()) == [1, 1, 3, 3] and len(sizes) == 4


def test_attempts_moved_aside_by_the_sweep_are_not_runs_and_repeated_seeds_are_flagged(seeded, tmp_path):
    import shutil

    shutil.copytree(seeded / "plain" / "demo" / "m-s1", seeded / "plain" / "demo" / "m-s1.partial-1")
    shutil.copytree(seeded / "ema" / "demo" / "m-s1", seeded / "ema" / "demo" / "m-s1.oom-2")
    assert len(find_runs([seeded])) == 6
    shutil.copytree(seeded / "ema" / "demo" / "m-s1", seeded / "ema" / "demo" / "m-s1-copy")
    out = tmp_path / "out"
    result = CliRunner().invoke(make_app(), ["report", str(seeded), "--output", str(out), "--no-plots"])
    assert result.exit_code == 0, result.output
    assert "has runs with the same seed (1, 1, 2, 3)" in (out / "results.md").read_text()


def test_component_activity_is_averaged_over_steps_and_shown_beside_the_outcome(tmp_path):
    def with_activity(values):
        def write(path):
            records = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
            for rec, value in zip(records, values, strict=True):
                rec["clip/activity"] = value
                rec["clip/fraction"] = value
            (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        return write

    acting = make_run(tmp_path / "acting", losses=[1.0, 0.8, 0.6, 0.5], gap=0.2, components={"clip": {}},
                      extra=with_activity([0.0, 0.1, 0.3, 0.2]))
    idle = make_run(tmp_path / "idle", losses=[1.0, 0.8, 0.6, 0.5], gap=0.2, components={"clip": {"max_value": 1e6}},
                    extra=with_activity([0.0, 0.0, 0.0, 0.0]))
    plain = make_run(tmp_path / "plain", losses=[1.0, 0.8, 0.6, 0.5], gap=0.2)
    assert load_run(acting).scores["activity/clip"] == pytest.approx(0.15)
    assert load_run(idle).scores["activity/clip"] == 0.0
    assert "activity/clip" not in load_run(plain).scores
    out = tmp_path / "report"
    result = CliRunner().invoke(make_app(), ["report", str(acting), str(idle), str(plain), "--output", str(out),
                                             "--no-plots"])
    assert result.exit_code == 0, result.output
    assert "activity/clip" in result.output
    md = (out / "results.md").read_text()
    assert "component activity" in md and "activity/clip" in md
    assert "| clip | 4 | 0.500 | 0.700 | 0.200 | 0.500 | 0.150 |" in md  # the acting run's row, activity last
    assert "| clip(max_value=1000000.0) | 4 | 0.500 | 0.700 | 0.200 | 0.500 | 0.00 |" in md


def test_a_setting_an_older_config_lacks_counts_as_its_default(tmp_path):
    from unisd.ops.report import group_runs

    root = tmp_path / "sweep"
    for seed in (1, 2):
        make_seed_run(root, "plain", seed)
    old = root / "plain" / "demo" / "m-s1" / "config.toml"
    lines = [line for line in old.read_text().splitlines() if not line.startswith(("reference_control", "build_cache"))]
    old.write_text("\n".join(lines) + "\n")  # written before those settings existed
    runs, baseline = collect([root])
    assert [len(g.runs) for g in group_runs(runs, baseline) if not g.untrained] == [2]
    changed = root / "plain" / "demo" / "m-s2" / "config.toml"
    changed.write_text(changed.read_text().replace('reference_control = "none"', 'reference_control = "shuffled"'))
    runs, baseline = collect([root])
    assert sorted(len(g.runs) for g in group_runs(runs, baseline) if not g.untrained) == [1, 1]  # a real difference


def test_a_preset_name_does_not_split_runs_whose_resolved_settings_agree(tmp_path):
    from unisd.ops.report import group_runs

    root = tmp_path / "sweep"
    for seed in (1, 2):
        make_seed_run(root, "plain", seed)
    named = root / "plain" / "demo" / "m-s1" / "config.toml"
    named.write_text('preset = "unisd-star"\n' + named.read_text())  # started with --preset, same settings
    runs, baseline = collect([root])
    assert [len(g.runs) for g in group_runs(runs, baseline) if not g.untrained] == [2]


def test_unisd_eval_leakage_and_strict_accuracy_are_headline_columns(tmp_path):
    """Beside a `unisd eval` accuracy the tables show its strict accuracy, leakage and overrun (a first-line
    accuracy alone counts an answer followed by copied template text), not its bookkeeping."""
    from unisd.ops.report import headline_columns

    run = make_run(tmp_path / "plain" / "m", losses=[0.5, 0.4], accuracy=0.25)
    results = run / "eval" / "demo" / "results.json"
    data = json.loads(results.read_text())
    data["metrics"].update(strict_accuracy=0.125, leakage=0.3, overrun=0.2, items=384)
    results.write_text(json.dumps(data))
    runs, _ = collect([tmp_path])
    columns = headline_columns(runs, main_metric(runs))
    assert columns[0] == "demo/accuracy"
    assert {"demo/strict_accuracy", "demo/leakage", "demo/overrun"} <= set(columns)
    assert "demo/extraction_rate" not in columns and "demo/items" not in columns


def _base_evaluation(root, model="m", accuracy=0.05):
    """What `unisd sweep` writes for [eval] untrained = true: OUTPUT_ROOT/untrained/MODEL/eval/demo/."""
    path = root / "untrained" / model
    (path / "eval" / "demo").mkdir(parents=True)
    (path / "sweep_job.json").write_text(json.dumps({"method": "untrained", "model": model, "dataset": None,
                                                     "task": None, "hparams": {}, "eval_task": "demo"}))
    (path / "eval" / "demo" / "results.json").write_text(json.dumps(
        {"task": "demo", "metrics": {"accuracy": accuracy, "leakage": 0.0, "items": 384}}))


def test_a_sweeps_evaluation_of_the_base_joins_the_untrained_group(seeded):
    """The base model's `unisd eval` scores sit in the untrained group beside its before-training numbers;
    it is not a method of its own, and the trained groups keep their short labels."""
    from unisd.ops.report import group_runs

    _base_evaluation(seeded)
    runs, _ = collect([seeded])
    groups = group_runs(runs)
    assert groups[0].label == "untrained (before training)" and {g.label for g in groups[1:]} == {"plain", "ema"}
    base = groups[0]
    assert len(base.runs) == 3 and base.values("demo/accuracy") == [0.05] * 3
    assert base.values("after/student_accuracy") == [0.0] * 3  # its before.json numbers are kept
    assert all(math.isnan(r.scores.get("demo/accuracy", math.nan)) for g in groups[1:] for r in g.runs)


def test_a_base_evaluation_alone_is_the_untrained_group(tmp_path):
    from unisd.ops.report import group_runs

    make_run(tmp_path / "plain" / "m", losses=[0.5, 0.4], accuracy=0.25)
    _base_evaluation(tmp_path, accuracy=0.125)
    groups = group_runs(collect([tmp_path])[0])
    assert [(g.label, g.untrained) for g in groups] == [("untrained (before training)", True), ("plain/m", False)]
    assert groups[0].values("demo/accuracy") == [0.125]
