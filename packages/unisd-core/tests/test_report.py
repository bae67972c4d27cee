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
    assert "| run | task | method | components | steps |" in md
    assert "0.375 (+0.125)" in md and "0.2 (-0.1)" in md
    assert "Main metric: `demo/accuracy`" in md and "baseline run `base/m`" in md
    report = json.loads((out / "report.json").read_text())
    assert report["metric"] == "demo/accuracy" and len(report["runs"]) == 3
    for name in ("curves_loss.png", "curves_divergence.png", "components.png", "ablation.png"):
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
    assert main_metric(summaries) == "demo/accuracy"
    assert main_metric(summaries, "after/privileged_gap") == "after/privileged_gap"
    assert main_metric([load_run(clip)]) == "final_loss"
    with pytest.raises(Exception, match="--metric nope"):
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
