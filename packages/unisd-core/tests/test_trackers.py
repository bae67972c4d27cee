"""--report-to: TensorBoard event files read back, the other trackers through stand-in modules, a
plugin tracker through the hook, and a failing tracker that must not stop the run."""

from __future__ import annotations

import sys
import types

import pytest
from typer.testing import CliRunner

from unisd.cli.app import make_app
from unisd.hookspecs import hookimpl
from unisd.io.trackers import Tracker
from unisd.plugins import get_plugin_manager


def _train(app, toy_data, model_dir, out, *extra):
    return CliRunner().invoke(app, [
        "train", "--model", str(model_dir), "--data", str(toy_data), "--steps", "2", "--output", str(out),
        "--batch-size", "2", "--grad-accum", "1", "--max-new-tokens", "4", *extra,
    ])


def test_tensorboard_event_files_hold_every_step(tiny_llama, toy_data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    result = _train(make_app(get_plugin_manager()), toy_data, tiny_llama, out, "--report-to", "tensorboard")
    assert result.exit_code == 0, result.output
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    loss = events.Scalars("loss")
    assert [e.step for e in loss] == [1, 2]
    import json

    logged = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e.value for e in loss] == pytest.approx(logged, rel=1e-6)
    assert "leakage" in events.Tags()["scalars"] and "config" in str(events.Tags()["tensors"])


class FakeRun:
    def __init__(self):
        self.logged, self.summary, self.finished = [], {}, False

    def log(self, metrics, step=None):
        self.logged.append((step, dict(metrics)))

    def finish(self):
        self.finished = True


@pytest.fixture
def fake_wandb(monkeypatch):
    module = types.ModuleType("wandb")
    module.runs = []

    def init(project, name, config, dir):  # noqa: A002 - wandb's own keyword
        run = FakeRun()
        run.project, run.name, run.config = project, name, config
        module.runs.append(run)
        return run

    module.init = init
    monkeypatch.setitem(sys.modules, "wandb", module)
    return module


def test_wandb_gets_config_steps_and_held_out_summary(fake_wandb, tiny_llama, tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(make_app(get_plugin_manager()), [
        "train", "--model", str(tiny_llama), "--task", "demo", "--steps", "2", "--output", str(out),
        "--batch-size", "2", "--grad-accum", "1", "--max-new-tokens", "4", "--report-to", "wandb",
        "--config", str(_eval_config(tmp_path)),
    ])
    assert result.exit_code == 0, result.output
    (run,) = fake_wandb.runs
    assert run.name == "run" and run.config["steps"] == 2 and run.finished
    assert [step for step, _ in run.logged] == [1, 2] and "loss" in run.logged[0][1]
    assert {"before/student_accuracy", "after/student_accuracy"} <= set(run.summary)


def _eval_config(tmp_path):
    path = tmp_path / "eval.toml"
    path.write_text("eval_before_after = true\neval_limit = 2\n")
    return path


def test_mlflow_and_trackio_through_stand_ins(monkeypatch, tiny_llama, toy_data, tmp_path):
    calls = []
    mlflow = types.ModuleType("mlflow")
    mlflow.start_run = lambda run_name: calls.append(("mlflow.start", run_name))
    mlflow.log_params = lambda params: calls.append(("mlflow.params", params["steps"]))
    mlflow.log_metrics = lambda metrics, step=None: calls.append(("mlflow.metrics", step))
    mlflow.end_run = lambda: calls.append(("mlflow.end",))
    trackio = types.ModuleType("trackio")
    trackio.init = lambda project, name, config: calls.append(("trackio.init", name))
    trackio.log = lambda metrics, step=None: calls.append(("trackio.log", step))
    trackio.finish = lambda: calls.append(("trackio.finish",))
    monkeypatch.setitem(sys.modules, "mlflow", mlflow)
    monkeypatch.setitem(sys.modules, "trackio", trackio)
    result = _train(make_app(get_plugin_manager()), toy_data, tiny_llama, tmp_path / "run",
                    "--report-to", "mlflow", "--report-to", "trackio")
    assert result.exit_code == 0, result.output
    assert calls == [("mlflow.start", "run"), ("mlflow.params", "2"), ("trackio.init", "run"),
                     ("mlflow.metrics", 1), ("trackio.log", 1), ("mlflow.metrics", 2), ("trackio.log", 2),
                     ("mlflow.end",), ("trackio.finish",)]


def test_a_missing_tracker_package_stops_before_training(monkeypatch, tiny_llama, toy_data, tmp_path):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    result = _train(make_app(get_plugin_manager()), toy_data, tiny_llama, tmp_path / "run", "--report-to", "wandb")
    assert result.exit_code == 2 and "pip install 'unisd-core[wandb]'" in result.output
    assert not (tmp_path / "run").exists()


def test_an_unknown_tracker_is_named_with_suggestions(tiny_llama, toy_data, tmp_path):
    result = _train(make_app(get_plugin_manager()), toy_data, tiny_llama, tmp_path / "run", "--report-to", "tensorbord")
    assert result.exit_code == 2 and "tensorboard" in result.output


class Recording(Tracker):
    name = "recording"
    seen: list = []

    def log_metrics(self, metrics, step):
        Recording.seen.append(step)
        if step == 1:
            raise RuntimeError("dashboard down")


class RecordingPlugin:
    @hookimpl
    def register_trackers(self, register):
        register(Recording)


def test_a_plugin_tracker_that_fails_is_switched_off_and_the_run_goes_on(tiny_llama, toy_data, tmp_path):
    pm = get_plugin_manager()
    pm.register_plugin(RecordingPlugin(), "recording-plugin", "tests")
    Recording.seen = []
    result = _train(make_app(pm), toy_data, tiny_llama, tmp_path / "run", "--report-to", "recording")
    assert result.exit_code == 0, result.output
    assert Recording.seen == [1]  # called once, failed, never called again
    assert "tracker recording failed and is switched off" in result.output
    assert (tmp_path / "run" / "final").is_dir()


def test_list_settings_survive_the_config_round_trip(tmp_path):
    from unisd.config import RunConfig, dump_config, load_config

    for report_to, targets in (([], None), (["tensorboard", "wandb"], ["q_proj", "v_proj"])):
        path = tmp_path / "config.toml"
        path.write_text(dump_config(RunConfig(report_to=report_to, lora_target_modules=targets)))
        loaded = load_config(path)
        assert loaded.report_to == report_to and loaded.lora_target_modules == targets
    path.write_text('report_to = "tensorboard"\n')
    assert load_config(path).report_to == ["tensorboard"]
    path.write_text("report_to = 3\n")
    with pytest.raises(Exception, match="expected a list"):
        load_config(path)


def test_resume_reads_back_a_config_with_trackers(tiny_llama, toy_data, tmp_path):
    out = tmp_path / "run"
    app = make_app(get_plugin_manager())
    assert _train(app, toy_data, tiny_llama, out, "--report-to", "tensorboard").exit_code == 0
    result = CliRunner().invoke(app, ["train", "--resume", str(out), "--steps", "3"])
    assert result.exit_code == 0, result.output
