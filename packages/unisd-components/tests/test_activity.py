"""Mechanism activity (issue 14, point 3): each component says how much it acted, and an inert one is named."""

from __future__ import annotations

import json
from types import SimpleNamespace

import torch
from typer.testing import CliRunner

from unisd.activity import ActivityWatch, inert_warnings
from unisd.cli.app import make_app
from unisd.plugins import get_plugin_manager
from unisd_components.agreement import Agreement
from unisd_components.clip import Clip
from unisd_components.ema import Ema

runner = CliRunner()
COMMON = ["--batch-size", "2", "--grad-accum", "1", "--max-new-tokens", "6", "--lr", "1e-3"]


def train(model_dir, data_file, out, *args):
    return runner.invoke(make_app(get_plugin_manager()),
                         ["train", "--model", str(model_dir), "--data", str(data_file), "--output", str(out),
                          *COMMON, *args], catch_exceptions=False)


def metrics_of(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def fake_run(steps):
    return SimpleNamespace(config=SimpleNamespace(steps=steps))


# ----------------------------------------------------------------------------------------------
# The watch, on hand-made records


class Fake:
    def __init__(self, name, window=None, hint=""):
        self.name, self.inactive_hint = name, hint
        if window is not None:
            self.activity_window = window


def test_watch_warns_once_for_a_component_that_stayed_at_zero():
    watch = ActivityWatch([Fake("idle", hint="turn it up"), Fake("busy")], total_steps=100)
    out = []
    for step in range(1, 30):
        out += watch.observe(step, {"idle/activity": 0.0, "busy/activity": 0.0 if step < 10 else 0.2})
    # busy acted at step 10, the last watched step: no warning for it
    assert out == ["idle did not act in steps 1-10 (idle/activity = 0 each time): turn it up"]


def test_watch_is_quiet_when_a_component_acted_once_or_reports_nothing():
    watch = ActivityWatch([Fake("a"), Fake("silent")], total_steps=100)
    out = []
    for step in range(1, 30):
        out += watch.observe(step, {"a/activity": 0.3 if step == 7 else 0.0})
    assert out == []


def test_watch_window_follows_the_component_and_the_run_length_and_resume():
    # an EMA syncing every 20 steps is judged at step 20, not 10
    watch = ActivityWatch([Fake("ema", window=20)], total_steps=100)
    assert [m for s in range(1, 20) for m in watch.observe(s, {"ema/activity": 0.0})] == []
    assert watch.observe(20, {"ema/activity": 0.0})
    # a 3-step run is judged at its last step; a resumed run from step 51 over steps 51-60
    short = ActivityWatch([Fake("c")], total_steps=3)
    assert [m for s in (1, 2, 3) for m in short.observe(s, {"c/activity": 0})] == [
        "c did not act in steps 1-3 (c/activity = 0 each time)"]
    resumed = ActivityWatch([Fake("c")], total_steps=100, first_step=51)
    msgs = [m for s in range(51, 70) for m in resumed.observe(s, {"c/activity": 0})]
    assert msgs == ["c did not act in steps 51-60 (c/activity = 0 each time)"]
    # window 0 (the leak guard): never judged; skip: already warned before the first step
    assert ActivityWatch([Fake("g", window=0)], 100).windows == {}
    assert ActivityWatch([Fake("e")], 100, skip=("e",)).windows == {}


# ----------------------------------------------------------------------------------------------
# Each component's own reasons


def test_inert_reasons_of_the_components():
    assert "never updated" in inert_warnings([Ema(Ema.Options(sync_steps=10))], fake_run(5))["ema"]
    assert inert_warnings([Ema(Ema.Options(sync_steps=10))], fake_run(50)) == {}
    assert "beta=1" in inert_warnings([Ema(Ema.Options(sync_steps=1, beta=1.0))], fake_run(50))["ema"]
    star = inert_warnings([Agreement(Agreement.Options(gamma=0.001))], fake_run(50))["agreement"]
    assert "at most 0.99%" in star  # 1 - 1/(1 + 0.001 * 10)
    assert inert_warnings([Agreement(Agreement.Options(gamma=1.0))], fake_run(50)) == {}
    assert inert_warnings([Clip()], fake_run(50)) == {}  # only the run can tell
    assert Ema(Ema.Options(sync_steps=5)).inert_reason(fake_run(6)) is None  # one update, at step 5


def test_clip_and_agreement_activity_are_the_changed_share_and_the_mean_weight_cut():
    clip = Clip(Clip.Options(max_value=1.0))
    batch = SimpleNamespace(step=1, step_masks=[torch.tensor([[1.0, 1.0, 1.0, 0.0]])], micro_index=0)
    clip.transform_divergence(torch.tensor([[0.5, 2.0, 3.0, 9.0]]), batch)
    m = clip.metrics()
    assert m["activity"] == m["fraction"] == 2 / 3  # the masked 9.0 is not a loss token
    agree = Agreement(Agreement.Options(gamma=1.0))
    w = torch.tensor([1.0, 0.5, 0.995, 0.8], dtype=torch.float64)
    agree._record(1, w, torch.zeros(4), torch.zeros(4), 1.0)
    m = agree.metrics()
    assert abs(m["activity"] - float((1 - w).mean())) < 1e-6  # _record keeps float32 statistics
    assert m["downweighted_fraction"] == 0.5  # 0.995 is within 1 %


# ----------------------------------------------------------------------------------------------
# Through the CLI on a tiny model


def test_ema_that_cannot_sync_is_warned_about_before_training(tiny_model_dir, data_file, tmp_path):
    result = train(tiny_model_dir, data_file, tmp_path / "run", "--steps", "5", "--with", "ema")
    assert result.exit_code == 0, result.output
    assert "Warning: ema will not act in this run: ema.sync_steps=10 ≥ --steps 5" in result.output
    assert result.output.count("ema will not act") == 1
    assert all(r["ema/activity"] == 0.0 for r in metrics_of(tmp_path / "run"))


def test_clip_whose_cap_is_never_reached_is_warned_about_after_its_first_steps(tiny_model_dir, data_file, tmp_path):
    result = train(tiny_model_dir, data_file, tmp_path / "run", "--steps", "3", "--with", "clip",
                   "-o", "clip.max_value=1e6", "--with", "ema", "-o", "ema.sync_steps=1")
    assert result.exit_code == 0, result.output
    assert "clip did not act in steps 1-3 (clip/activity = 0 each time): no token's divergence reached the cap" \
        in result.output
    assert "ema did not act" not in result.output and "ema will not act" not in result.output
    records = metrics_of(tmp_path / "run")
    assert [r["ema/activity"] for r in records] == [1.0, 1.0, 1.0]
    assert [r["clip/activity"] for r in records] == [0.0, 0.0, 0.0]
