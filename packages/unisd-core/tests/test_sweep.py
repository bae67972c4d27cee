"""`unisd sweep`: the sweep file, job planning, dry-run, a real run on tiny models, skip, OOM retry, Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from unisd.cli import report_cmd, sweep_cmd
from unisd.components import Preset, option
from unisd.errors import ConfigError, OptionError, UnknownNameError, UsageError
from unisd.hookspecs import hookimpl
from unisd.ops.scheduler import STATE_FILE, JobStatus, SweepRunner, job_kind, parse_devices
from unisd.ops.sweep import load_sweep, plan
from unisd.plugins import get_plugin_manager
from unisd.testing import make_tiny_model_dir, toy_records, write_jsonl


class Scale:
    """A do-nothing component with one option, registered only in tests."""

    name = "scale"

    @dataclass
    class Options:
        factor: float = option(1.0, "multiplier")

    def __init__(self, options):
        self.options = options


class Contrastive(Scale):
    """Stands in for unisd-components' contrastive component (it reads a negatives cache)."""

    name = "contrastive"

    @dataclass
    class Options:
        weight: float = option(0.1, "weight")
        cache: str | None = option(None, "negatives file")


class TestPlugin:
    @hookimpl
    def register_components(self, register):
        register(Scale)
        register(Contrastive)

    @hookimpl
    def register_presets(self, register):
        for name, factor in (("p-one", 1.0), ("p-two", 2.0), ("p-three", 3.0)):
            register(Preset(name, {"scale": {"factor": factor}}, help=f"test preset {name}", run={"alpha": 0.5}))

    @hookimpl
    def register_tasks(self, register):
        from unisd.data.demo import DemoTask

        class OtherTask(DemoTask):
            name = "demo2"

        register(OtherTask)


def make_pm():
    pm = get_plugin_manager(load_entry_points=False)
    pm.register_plugin(TestPlugin(), "test-plugin", "tests")
    return pm


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def app_with(pm, eval_command: bool = False) -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def root() -> None:  # a group, so the command name is part of the invocation as with `unisd`
        pass

    sweep_cmd.register(app, pm)
    report_cmd.register(app, pm)
    if eval_command:
        @app.command("eval")
        def eval_command_(task: str) -> None:  # a stand-in: only its presence matters here
            pass
    return app


# ----------------------------------------------------------------------------------------------
# Planning


def test_dry_run_two_tasks_three_presets_lists_six_train_and_eval_jobs(tmp_path):
    sweep = write(tmp_path / "ablation.toml", """
        models = ["smollm2"]
        tasks = ["demo", "demo2"]
        presets = ["p-one", "p-two", "p-three"]
        [run]
        steps = 2
        alpha = 0.25
    """)
    result = CliRunner().invoke(app_with(make_pm(), eval_command=True), ["sweep", str(sweep), "--dry-run",
                                                                         "--devices", "cpu"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "6 train, 6 eval, 3 cache" in out
    assert out.count("unisd train --config") == 6
    assert out.count("unisd eval") == 6
    for preset in ("p-one", "p-two", "p-three"):
        for task in ("demo", "demo2"):
            run_dir = tmp_path / "runs" / "ablation" / preset / task / "smollm2"
            assert f"--output {run_dir}" in out
            assert f"unisd eval {task} --model {run_dir / 'final'} --output {run_dir / 'eval' / task} --overwrite" in out
    assert "scale(factor=3.0)" in out
    assert "alpha=0.25" in out  # [run] beats the preset's run settings
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing


def test_only_runs_the_named_methods_in_their_usual_directories(tmp_path):
    sweep = write(tmp_path / "ablation.toml", """
        models = ["smollm2"]
        tasks = ["demo"]
        presets = ["p-one", "p-two", "p-three"]
    """)
    app = app_with(make_pm(), eval_command=True)
    result = CliRunner().invoke(app, ["sweep", str(sweep), "--dry-run", "--devices", "cpu",
                                      "--only", "p-three", "--only", "p-one"])
    assert result.exit_code == 0, result.output
    assert "2 train" in result.output
    for preset, listed in (("p-one", True), ("p-two", False), ("p-three", True)):
        run_dir = tmp_path / "runs" / "ablation" / preset / "demo" / "smollm2"
        assert (f"--output {run_dir}" in result.output) is listed
    bad = CliRunner().invoke(app, ["sweep", str(sweep), "--dry-run", "--only", "p-thre"])
    assert bad.exit_code == 2
    assert "no such method" in bad.output and "did you mean 'p-three'" in bad.output


def test_dry_run_skips_eval_jobs_without_eval_command(tmp_path):
    sweep = write(tmp_path / "s.toml", 'models = ["smollm2"]\ntasks = ["demo"]\n')
    result = CliRunner().invoke(app_with(make_pm()), ["sweep", str(sweep), "--dry-run", "--devices", "cpu"])
    assert result.exit_code == 0, result.output
    assert "skip: `unisd eval` is not installed" in result.output
    assert "--num-processes" not in result.output
    wide = CliRunner().invoke(app_with(make_pm()), ["sweep", str(sweep), "--dry-run", "--devices", "0+1,2+3"])
    assert wide.exit_code == 0, wide.output
    assert "jobs run 2 at a time" in wide.output and "slot of 2 GPUs run with --num-processes" in wide.output


def test_grid_axes_and_layout(tmp_path):
    data = write_jsonl(tmp_path / "toy.jsonl", toy_records(4))
    sweep = write(tmp_path / "s.toml", """
        models = ["m1", "org/m2"]
        data = ["toy.jsonl"]
        [run]
        limit = 4
        [grid]
        alpha = [0.0, 1.0]
        [methods.scaled]
        with = ["scale"]
        options = { "scale.factor" = [0.5, 2] }
        run = { lr = 1e-4 }
    """)
    jobs = plan(load_sweep(sweep), make_pm())
    train = [j for j in jobs if j.phase == "train"]
    assert len(train) == 2 * 2 * 2  # models × alpha × factor
    assert not [j for j in jobs if j.phase == "eval"]  # data files have no eval task by default
    assert {j.id for j in jobs if j.phase == "cache"} == {"cache:model:m1", "cache:model:org-m2"}
    job = next(j for j in train if j.meta["hparams"] == {"alpha": 1.0, "scale.factor": 2} and j.meta["model"] == "org/m2")
    assert job.run_dir == tmp_path / "runs" / "s" / "scaled" / "toy-max4" / "alpha1.0_scale.factor2" / "m2"
    assert job.config.alpha == 1.0 and job.config.lr == 1e-4 and job.config.limit == 4
    assert job.config.components == {"scale": {"factor": 2}}
    assert job.config.data == str(data)
    assert job.depends == ["cache:model:org-m2"]


def test_seeds_axis_one_run_per_seed_in_seed_major_order(tmp_path):
    sweep = write(tmp_path / "s.toml", """
        models = ["smollm2"]
        tasks = ["demo"]
        presets = ["p-one", "p-two"]
        seeds = [7, 3]
        [run]
        steps = 2
    """)
    spec = load_sweep(sweep)
    assert spec.seeds == [7, 3]
    jobs = plan(spec, make_pm())
    train = [j for j in jobs if j.phase == "train"]
    # every method at the first seed before any at the second: a sweep cut short still compares methods
    assert [j.id for j in train] == ["train:p-one/demo/smollm2-s7", "train:p-two/demo/smollm2-s7",
                                     "train:p-one/demo/smollm2-s3", "train:p-two/demo/smollm2-s3"]
    assert [j.config.seed for j in train] == [7, 7, 3, 3]
    assert [j.meta["seed"] for j in train] == [7, 7, 3, 3]
    assert train[2].run_dir == tmp_path / "runs" / "s" / "p-one" / "demo" / "smollm2-s3"
    assert train[2].config_path == tmp_path / "runs" / "s" / "jobs" / "p-one" / "demo" / "smollm2-s3.toml"
    assert train[2].label == "p-one | demo | smollm2 | seed 3"
    evals = [j for j in jobs if j.phase == "eval"]
    assert [j.depends for j in evals] == [[j.id] for j in train]
    # without seeds: one run per combination, named as before, with the configured seed
    plain = plan(load_sweep(write(tmp_path / "p.toml", 'models = ["smollm2"]\ntasks = ["demo"]\n[run]\nseed = 5\n')),
                 make_pm())
    assert [(j.id, j.config.seed) for j in plain if j.phase == "train"] == [("train:plain/demo/smollm2", 5)]


def test_timed_kinds_start_longest_first_after_every_first_seed(tmp_path):
    sweep = write(tmp_path / "s.toml", """
        models = ["smollm2"]
        tasks = ["demo"]
        presets = ["p-one", "p-two"]
        seeds = [1, 2, 3]
        [run]
        steps = 2
        [eval]
        tasks = []
    """)
    spec = load_sweep(sweep)
    runner = SweepRunner(plan(spec, make_pm()), spec.output_root, ["cpu", "cpu"], echo=lambda _: None)
    runner.statuses = {j.id: JobStatus() for j in runner.jobs}
    for job in runner.jobs:
        if job.phase == "cache":
            runner.statuses[job.id].status = "done"

    def start(expected):
        job = runner._next_ready()
        assert job is not None and job.id == expected
        runner.statuses[job.id].status = "running"
        return job

    def finish(job, seconds):
        runner.timings.setdefault(job_kind(job), []).append(seconds)
        runner.statuses[job.id].status = "done"

    one = start("train:p-one/demo/smollm2-s1")
    two = start("train:p-two/demo/smollm2-s1")
    finish(one, 10.0)
    # seed 2 before seed 3; p-two's first seed is still running, so its kind has no time yet: it goes first
    two_s2 = start("train:p-two/demo/smollm2-s2")
    finish(two, 50.0)
    start("train:p-one/demo/smollm2-s2")  # the rest of seed 2 before any of seed 3
    finish(two_s2, 60.0)
    start("train:p-two/demo/smollm2-s3")  # 55 s against p-one's 10 s: the long one first
    assert runner._next_ready().id == "train:p-one/demo/smollm2-s3"

    # an earlier, interrupted run of the sweep left its times in sweep_state.json: they count on resume
    (spec.output_root / STATE_FILE).parent.mkdir(parents=True, exist_ok=True)
    (spec.output_root / STATE_FILE).write_text(json.dumps({"jobs": {
        "train:p-one/demo/smollm2-s1": {"status": "done", "seconds": 90.0},
        "train:p-two/demo/smollm2-s1": {"status": "skipped", "seconds": 20.0},
        "train:p-one/demo/smollm2-s2": {"status": "failed", "seconds": 900.0}}}))
    seconds = runner._earlier_seconds()
    assert seconds == {"train:p-one/demo/smollm2-s1": 90.0, "train:p-two/demo/smollm2-s1": 20.0}


def test_dry_run_shows_the_seeds(tmp_path):
    sweep = write(tmp_path / "s.toml", 'models = ["smollm2"]\ntasks = ["demo"]\nseeds = [1, 2]\n')
    result = CliRunner().invoke(app_with(make_pm(), eval_command=True), ["sweep", str(sweep), "--dry-run",
                                                                         "--devices", "cpu"])
    assert result.exit_code == 0, result.output
    assert "2 train (2 seeds each: 1, 2), 2 eval" in result.output
    assert "[run] plain | demo | smollm2 | seed 2" in result.output and "seed=2" in result.output
    assert f"--output {tmp_path / 'runs' / 's' / 'plain' / 'demo' / 'smollm2-s2'}" in result.output


def test_contrastive_methods_get_one_negatives_cache_job_per_model_and_dataset(tmp_path):
    sweep = write(tmp_path / "s.toml", """
        models = ["smollm2"]
        tasks = ["demo"]
        [methods.c]
        with = ["contrastive"]
        options = { "contrastive.weight" = [0.1, 0.2] }
        [methods.given]
        with = ["contrastive"]
        options = { "contrastive.cache" = "neg.jsonl" }
    """)
    jobs = {j.id: j for j in plan(load_sweep(sweep), make_pm())}
    negatives = [j for j in jobs.values() if j.id.startswith("cache:negatives:")]
    assert len(negatives) == 1  # shared by both grid points; the method with its own file needs none
    assert negatives[0].argv == ["-m", "unisd", "cache", "negatives", "--model", "smollm2", "--task", "demo"]
    assert negatives[0].depends == ["cache:model:smollm2", "cache:task:demo"]
    assert negatives[0].id in jobs["train:c/demo/contrastive.weight0.1/smollm2"].depends
    assert negatives[0].id not in jobs["train:given/demo/smollm2"].depends


@pytest.mark.parametrize("text, error, match", [
    ('models = ["m"]\n', ConfigError, "nothing to train on"),
    ('models = ["m"]\ntasks = ["demo"]\nstep = 3\n', ConfigError, "unknown key 'step'"),
    ('models = ["m"]\ntasks = ["demo"]\n[run]\nstpes = 3\n', ConfigError, "Did you mean: steps"),
    ('models = ["m"]\ntasks = ["demo"]\n[grid]\nalpha = ["x"]\n', ConfigError, "alpha"),
    ('models = ["m"]\ntasks = ["demo"]\n[run]\nmodel = "x"\n', ConfigError, "set by the sweep"),
    ('models = ["m"]\ntasks = ["nope"]\n', UnknownNameError, "Unknown task 'nope'"),
    ('models = ["m"]\ntasks = ["demo"]\npresets = ["p-too"]\n', UnknownNameError, "p-two"),
    ('models = ["m"]\ntasks = ["demo"]\n[methods.x]\nwith = ["scale"]\noptions = { "scale.fator" = 1 }\n',
     OptionError, "factor"),
    ('models = ["m"]\ntasks = ["demo"]\nseeds = [1, 1]\n', ConfigError, "seeds lists a seed twice"),
    ('models = ["m"]\ntasks = ["demo"]\nseeds = ["1"]\n', ConfigError, "list of integers"),
    ('models = ["m"]\ntasks = ["demo"]\nseeds = []\n', ConfigError, "non-empty"),
    ('models = ["m"]\ntasks = ["demo"]\nseeds = [1]\n[grid]\nseed = [1, 2]\n', ConfigError, "keep one"),
    ('models = ["m"]\ntasks = ["demo"]\nseeds = [1]\n[methods.x]\nrun = { seed = 3 }\n', ConfigError,
     r"\[methods.x\] run"),
])
def test_bad_sweep_files_fail_with_clear_errors(tmp_path, text, error, match):
    sweep = write(tmp_path / "s.toml", text)
    with pytest.raises(error, match=match):
        plan(load_sweep(sweep), make_pm())


def test_parse_devices():
    assert parse_devices("cpu") == ["cpu"]
    assert parse_devices("0, 1,3") == ["0", "1", "3"]
    assert parse_devices("0+1,2+3") == ["0+1", "2+3"]
    with pytest.raises(UsageError, match="GPU indices"):
        parse_devices("gpu0")
    with pytest.raises(UsageError, match="GPU indices"):
        parse_devices("0+x")


def test_multi_gpu_slot_trains_one_process_per_gpu(tmp_path):
    from unisd.ops.scheduler import shell_command, slot_env
    from unisd.ops.sweep import Job

    train = Job("train:x", "train", ["-m", "unisd", "train", "--config", "c.toml"], tmp_path / "final", "x", [])
    evaluate = Job("eval:x", "eval", ["-m", "unisd", "eval", "demo"], tmp_path / "r.json", "x", [])
    assert slot_env("2+3", 0)["CUDA_VISIBLE_DEVICES"] == "2,3"
    assert slot_env("cpu", 1)["CUDA_VISIBLE_DEVICES"] == ""
    line = shell_command(["python"], train, "2+3")
    assert line.startswith("CUDA_VISIBLE_DEVICES=2,3 ") and line.endswith("--num-processes 2")
    assert "--num-processes" not in shell_command(["python"], train, "1")
    assert "--num-processes" not in shell_command(["python"], evaluate, "2+3")  # evaluation: one process


# ----------------------------------------------------------------------------------------------
# Running (a fake interpreter for the scheduler's own behaviour: fast, no torch)

FAKE_PYTHON = """
import os, sys, time, tomllib, pathlib
args = sys.argv[1:]
mode = os.environ.get("FAKE_MODE", "ok")
if "unisd.ops.prepare" in args:
    sys.exit(0)
out = pathlib.Path(args[args.index("--output") + 1])
if "--config" in args:
    cfg = tomllib.loads(pathlib.Path(args[args.index("--config") + 1]).read_text())
    job_info_at_start = (out / "sweep_job.json").is_file()
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.toml").write_text("")
    if mode == "oom" and cfg["batch_size"] > 2:
        print("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB")
        sys.exit(1)
    if mode == "fail":
        print("boom")
        sys.exit(3)
    if mode == "sleep":
        (out.parent / "pid").write_text(str(os.getpid()))
        time.sleep(60)
    (out / "final").mkdir()
    (out / "checkpoints" / "step-1").mkdir(parents=True)
    (out / "final" / "batch").write_text(f"{cfg['batch_size']} {cfg['grad_accum']} {os.environ['CUDA_VISIBLE_DEVICES']!r}")
    (out / "final" / "job_info_at_start").write_text(str(job_info_at_start))
else:  # eval
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text('{"accuracy": 0.5}')
"""


def fake_runner(tmp_path, text, monkeypatch, mode="ok", **kwargs):
    monkeypatch.setenv("FAKE_MODE", mode)
    fake = write(tmp_path / "fake_python.py", FAKE_PYTHON)
    sweep = write(tmp_path / "s.toml", text)
    spec = load_sweep(sweep)
    lines: list[str] = []
    runner = SweepRunner(plan(spec, make_pm()), spec.output_root, ["cpu"], python=[sys.executable, str(fake)],
                         echo=lines.append, poll_s=0.02, **kwargs)
    return runner, spec.output_root, lines


GRID = """
models = ["{model}"]
data = ["toy.jsonl"]
[run]
batch_size = 4
grad_accum = 2
[grid]
alpha = [0.0, 1.0]
"""


def sweep_text(tmp_path) -> str:
    write_jsonl(tmp_path / "toy.jsonl", toy_records(4))
    (tmp_path / "model").mkdir()
    return GRID.format(model=tmp_path / "model")


def test_fake_sweep_runs_then_skips_everything(tmp_path, monkeypatch):
    runner, root, lines = fake_runner(tmp_path, sweep_text(tmp_path), monkeypatch)
    statuses = runner.run()
    assert [s.status for s in statuses.values()] == ["done", "done"]
    final = root / "plain" / "toy" / "alpha0.0" / "model" / "final"
    assert (final / "batch").read_text() == "4 2 ''"  # CPU slot: no GPU visible
    assert json.loads((final.parent / "sweep_job.json").read_text())["hparams"] == {"alpha": 0.0}
    assert (final / "job_info_at_start").read_text() == "True"  # a running job already says what it is
    assert (root / "jobs" / "plain" / "toy" / "alpha0.0" / "model.toml").is_file()
    state = json.loads((root / "sweep_state.json").read_text())
    assert state["status"] == "finished"

    runner2, _, lines2 = fake_runner(tmp_path, GRID.format(model=tmp_path / "model"), monkeypatch, mode="fail")
    statuses = runner2.run()
    assert [s.status for s in statuses.values()] == ["skipped", "skipped"]
    assert not any(line.startswith("[start]") for line in lines2)


def test_fake_sweep_with_seeds_resumes_where_it_stopped(tmp_path, monkeypatch):
    text = sweep_text(tmp_path).replace("[grid]\nalpha = [0.0, 1.0]\n", "") + "seeds = [1, 2]\n"
    text = "seeds = [1, 2]\n" + text.replace("seeds = [1, 2]\n", "")  # a top-level key, before any table
    runner, root, _ = fake_runner(tmp_path, text, monkeypatch)
    done = root / "plain" / "toy" / "model-s1"
    runner.jobs = [j for j in runner.jobs if j.run_dir == done]  # as if stopped after the first seed
    assert {s.status for s in runner.run().values()} == {"done"}
    assert json.loads((done / "sweep_job.json").read_text())["seed"] == 1
    runner, _, lines = fake_runner(tmp_path, text, monkeypatch)
    statuses = runner.run()
    assert statuses["train:plain/toy/model-s1"].status == "skipped"
    assert statuses["train:plain/toy/model-s2"].status == "done"
    assert (root / "plain" / "toy" / "model-s2" / "final").is_dir()


def test_oom_is_retried_once_with_half_batch_and_logged(tmp_path, monkeypatch):
    runner, root, lines = fake_runner(tmp_path, sweep_text(tmp_path), monkeypatch, mode="oom")
    statuses = runner.run()
    assert {s.status for s in statuses.values()} == {"done"}
    run = root / "plain" / "toy" / "alpha1.0" / "model"
    assert (run / "final" / "batch").read_text() == "2 4 ''"  # half the batch, same examples per step
    assert run.with_name("model.oom-1").is_dir()  # the failed attempt is kept, not deleted
    failed = (root / "failed_jobs.md").read_text()
    assert failed.count("out of memory: retrying once") == 2
    assert "unisd train --config" in failed
    assert any(line.startswith("[retry]") for line in lines)


def test_failed_job_is_logged_with_command_and_not_retried(tmp_path, monkeypatch):
    runner, root, _ = fake_runner(tmp_path, sweep_text(tmp_path), monkeypatch, mode="fail")
    statuses = runner.run()
    assert {s.status for s in statuses.values()} == {"failed"}
    assert {s.attempts for s in statuses.values()} == {1}
    failed = (root / "failed_jobs.md").read_text()
    assert "exit code 3" in failed and "boom" in failed and "--output" in failed
    assert json.loads((root / "sweep_state.json").read_text())["status"] == "failed"


def test_eval_jobs_follow_training_and_cleanup_keeps_final(tmp_path, monkeypatch):
    (tmp_path / "model").mkdir()
    text = f'models = ["{tmp_path / "model"}"]\ntasks = ["demo"]\n[eval]\nuntrained = true\nargs = ["--limit", "8"]\n'
    runner, root, lines = fake_runner(tmp_path, text, monkeypatch, cleanup=True)
    statuses = runner.run()
    assert {k: s.status for k, s in statuses.items()} == {
        "cache:task:demo": "done", "train:plain/demo/model": "done",
        "eval:plain/demo/model:demo": "done", "eval:untrained/model:demo": "done",
    }
    started = [line.split()[1] for line in lines if line.startswith("[start]")]
    assert started == ["cache", "train", "eval", "eval"]  # phase order, one slot
    run = root / "plain" / "demo" / "model"
    assert (run / "eval" / "demo" / "results.json").is_file() and (run / "final").is_dir()
    assert not (run / "checkpoints").exists()  # --cleanup, after the evaluations
    untrained = root / "untrained" / "model"
    assert (untrained / "eval" / "demo" / "results.json").is_file()
    assert json.loads((untrained / "sweep_job.json").read_text())["method"] == "untrained"
    assert (root / ".cache" / "task-demo.done").is_file()


def test_checkpoints_are_kept_without_cleanup_and_failed_training_blocks_eval(tmp_path, monkeypatch):
    (tmp_path / "model").mkdir()
    text = f'models = ["{tmp_path / "model"}"]\ntasks = ["demo"]\n'
    runner, root, _ = fake_runner(tmp_path, text, monkeypatch)
    runner.run()
    assert (root / "plain" / "demo" / "model" / "checkpoints" / "step-1").is_dir()

    (tmp_path / "other").mkdir()
    runner, root, _ = fake_runner(tmp_path / "other", text, monkeypatch, mode="fail")
    statuses = runner.run()
    assert statuses["train:plain/demo/model"].status == "failed"
    assert statuses["eval:plain/demo/model:demo"].status == "blocked"

    runner, _, _ = fake_runner(tmp_path / "other", text, monkeypatch, mode="ok", eval_available=False)
    statuses = runner.run()
    assert statuses["eval:plain/demo/model:demo"].status == "no-eval"


DRIVER = """
import sys
from unisd.ops.scheduler import SweepRunner
from unisd.ops.sweep import load_sweep, plan
from unisd.plugins import get_plugin_manager
spec = load_sweep(sys.argv[1])
runner = SweepRunner(plan(spec, get_plugin_manager(load_entry_points=False)), spec.output_root, ["cpu"],
                     python=[sys.executable, sys.argv[2]], poll_s=0.05)
try:
    runner.run()
except KeyboardInterrupt:
    sys.exit(130)
"""


def test_interrupt_stops_children_writes_state_and_rerun_resumes(tmp_path, monkeypatch):
    text = sweep_text(tmp_path)
    sweep = write(tmp_path / "s.toml", text)
    fake = write(tmp_path / "fake_python.py", FAKE_PYTHON)
    driver = write(tmp_path / "driver.py", DRIVER)
    env = {**os.environ, "FAKE_MODE": "sleep"}
    proc = subprocess.Popen([sys.executable, str(driver), str(sweep), str(fake)], env=env)
    pid_file = tmp_path / "runs" / "s" / "plain" / "toy" / "alpha0.0" / "pid"
    deadline = time.monotonic() + 30
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pid_file.exists(), "the first job never started"
    time.sleep(0.1)
    child = int(pid_file.read_text())
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 130
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)  # the job was terminated with the orchestrator
    state = json.loads((tmp_path / "runs" / "s" / "sweep_state.json").read_text())
    assert state["status"] == "interrupted"
    assert sorted(j["status"] for j in state["jobs"].values()) == ["interrupted", "pending"]

    monkeypatch.chdir(tmp_path)
    runner, root, lines = fake_runner(tmp_path, text, monkeypatch, mode="ok")
    statuses = runner.run()
    assert {s.status for s in statuses.values()} == {"done"}
    assert any("moved it to" in line for line in lines)  # the interrupted run had no checkpoint: kept aside


# ----------------------------------------------------------------------------------------------
# The real thing on a tiny model: train jobs run `python -m unisd train`, a rerun skips them all,
# and `unisd report` turns the runs into tables and plots: 2 methods × 2 seeds × 2 steps.


def test_tiny_sweep_with_seeds_completes_skips_on_rerun_and_reports_groups(tmp_path):
    make_tiny_model_dir(tmp_path / "tiny")
    write_jsonl(tmp_path / "toy.jsonl", toy_records(4))
    sweep = write(tmp_path / "tiny.toml", """
        models = ["tiny"]
        data = ["toy.jsonl"]
        seeds = [1, 2]
        [run]
        steps = 2
        batch_size = 2
        grad_accum = 1
        max_new_tokens = 6
        lora_r = 4
        [methods.forward]
        run = { alpha = 0.0 }
        [methods.reverse]
        run = { alpha = 1.0 }
    """)
    pm = get_plugin_manager(load_entry_points=False)
    app = app_with(pm)
    result = CliRunner().invoke(app, ["sweep", str(sweep), "--devices", "cpu,cpu"])  # two jobs at once
    assert result.exit_code == 0, result.output
    assert result.output.count("[done] train") == 4
    root = tmp_path / "runs" / "tiny"
    runs = sorted(p.parent for p in root.glob("*/toy/tiny-s*/final"))
    assert [r.relative_to(root).as_posix() for r in runs] == [
        "forward/toy/tiny-s1", "forward/toy/tiny-s2", "reverse/toy/tiny-s1", "reverse/toy/tiny-s2"]
    for run in runs:
        assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
        seed = int(run.name[-1])
        assert f"seed = {seed}\n" in (run / "config.toml").read_text()

    again = CliRunner().invoke(app, ["sweep", str(sweep), "--devices", "cpu"])
    assert again.exit_code == 0, again.output
    assert "Skipping 4 job(s)" in again.output and "[start]" not in again.output

    out = tmp_path / "report"
    rep = CliRunner().invoke(app, ["report", str(root), "--baseline", str(runs[0]), "--output", str(out)])
    assert rep.exit_code == 0, rep.output
    assert "Main metric: final_loss" in rep.output  # no held-out evaluation in this sweep: the loss
    assert "\nforward  (n=2; seeds 1, 2)" in rep.output and "\nreverse  (n=2; seeds 1, 2)" in rep.output
    md = (out / "results.md").read_text()
    assert "| forward | forward | 1, 2 | 2 |" in md and "| reverse | reverse | 1, 2 | 2 |" in md
    csv_lines = (out / "results.csv").read_text().splitlines()
    assert len(csv_lines) == 5
    for png in ("curves_loss.png", "ablation.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_base_evaluations_are_generated_once_by_cache_jobs_before_training(tmp_path, monkeypatch):
    monkeypatch.setenv("UNISD_CACHE_DIR", str(tmp_path / "cache"))
    make_tiny_model_dir(tmp_path / "tiny")
    sweep = write(tmp_path / "tiny.toml", """
        models = ["tiny"]
        tasks = ["demo"]
        seeds = [1, 2]
        [run]
        steps = 1
        batch_size = 2
        grad_accum = 1
        max_new_tokens = 4
        lora_r = 4
        eval_before_after = true
        eval_limit = 3
        [eval]
        tasks = []
        [methods.forward]
        run = { alpha = 0.0 }
        [methods.longer]
        run = { alpha = 0.0, max_new_tokens = 5 }
    """)
    pm = get_plugin_manager(load_entry_points=False)
    jobs = plan(load_sweep(sweep), pm)
    base_jobs = [j for j in jobs if j.id.startswith("cache:base-eval:")]
    # one student and one teacher job per budget; every run waits for its own two
    assert [j.id.rsplit(":", 1)[1] for j in base_jobs] == ["student", "teacher"] * 2
    for job in (j for j in jobs if j.phase == "train"):
        own = [d for d in job.depends if d.startswith("cache:base-eval:")]
        assert len(own) == 2 and {j.config.max_new_tokens for j in base_jobs if j.id in own} == {job.config.max_new_tokens}

    result = CliRunner().invoke(app_with(pm), ["sweep", str(sweep), "--devices", "cpu,cpu"])
    assert result.exit_code == 0, result.output
    assert result.output.count("[done] train") == 4 and result.output.count("[done] cache base model's") == 4
    kept = sorted((tmp_path / "cache" / "base-eval").glob("*.json"))
    assert len(kept) == 4  # two sides at two budgets
    # No run generated its base evaluation again: each would have written its completions there, later than
    # the first run's start (a run whose key differed from the cache job's would add a file instead).
    root = tmp_path / "runs" / "tiny"
    first_start = min((d / "config.toml").stat().st_mtime_ns for d in root.glob("*/demo/tiny-s*"))
    assert all(path.stat().st_mtime_ns < first_start for path in kept)
    before = [json.loads(p.read_text()) for p in sorted(root.glob("forward/demo/tiny-s*/eval/before.json"))]
    assert len(before) == 2 and before[0] == before[1] and before[0]["n"] == 3


@pytest.mark.parametrize(("name", "settings", "eval_jobs"),
                         [("ablation-demo", (20, 384, True, 4), 0), ("ablation-demo-60", (60, 48, True, 4), 31)])
def test_shipped_ablation_examples_plan_ten_methods_at_three_seeds(name, settings, eval_jobs):
    pytest.importorskip("unisd_components")
    example = Path(__file__).resolve().parents[3] / "examples" / f"{name}.toml"
    spec = load_sweep(example)
    jobs = plan(spec, get_plugin_manager())
    train = [j for j in jobs if j.phase == "train"]
    methods = ["plain", "ema", "contrastive", "agreement", "matching", "clip", "unisd-star", "shuffled-reference",
               "leak-guard", "unisd-star-leak-guard"]
    assert [j.meta["method"] for j in train[:10]] == methods and len(train) == 30
    assert {j.config.seed for j in train} == {1, 2, 3}
    assert {(j.config.steps, j.config.eval_limit, j.config.eval_before_after, j.config.batch_size)
            for j in train} == {settings}
    by_method = {j.meta["method"]: j.config for j in train if j.config.seed == 1}
    assert by_method["plain"].components == {} and by_method["plain"].reference_control == "none"
    assert by_method["shuffled-reference"].components == {}
    assert by_method["shuffled-reference"].reference_control == "shuffled"
    assert by_method["leak-guard"].components == {"leak-guard": {"lookahead": 8, "stop_weight": 1.0}}
    assert set(by_method["unisd-star"].components) == {"agreement", "ema", "contrastive", "matching"}
    assert set(by_method["unisd-star-leak-guard"].components) == {"agreement", "ema", "contrastive", "matching",
                                                                  "leak-guard"}
    # the 60-step file scores every student, and the base once, on all 384 held-out items at the training
    # budget; the 90-minute file has only each run's own evaluation
    evals = [j for j in jobs if j.phase == "eval"]
    assert len(evals) == eval_jobs and all(j.argv[-2:] == ["--max-new-tokens", "12"] for j in evals)
    assert not evals or ("--limit" not in evals[0].argv and evals[-1].meta["method"] == "untrained")
    assert any(j.id.startswith("cache:negatives:") for j in jobs)  # contrastive's negatives come first
    # every method shares the base model's held-out completions: generated once, by two cache jobs
    base = [j.id for j in jobs if j.id.startswith("cache:base-eval:")]
    assert len(base) == 2 and base[0].startswith("cache:base-eval:smollm2-demo-") and base[0].endswith(":student")
    assert base[1] == base[0].replace(":student", ":teacher")
    assert all(set(base) <= set(j.depends) for j in train)
    assert spec.output_root == example.parents[1] / "runs" / name


def test_data_files_resolve_next_to_the_sweep_file_and_hub_ids_stay_as_written(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"prompt": "p", "reference": "r"}\n')
    sweep = write(tmp_path / "s.toml", 'models = ["m"]\ndata = ["train.jsonl", "owner/name", "missing.jsonl"]\n')
    assert load_sweep(sweep).data == [tmp_path / "train.jsonl", Path("owner/name"), tmp_path / "missing.jsonl"]


def test_oom_at_an_odd_batch_size_is_not_retried_with_another_update(tmp_path, monkeypatch):
    text = sweep_text(tmp_path).replace("batch_size = 4\ngrad_accum = 2", "batch_size = 3\ngrad_accum = 2")
    runner, root, lines = fake_runner(tmp_path, text, monkeypatch, mode="oom")
    statuses = runner.run()
    assert {s.status for s in statuses.values()} == {"failed"}  # 3 → 1 × 4 would train on 4 examples a step, not 6
    failed = (root / "failed_jobs.md").read_text()
    assert "cannot be halved without changing the update" in failed
    assert not any(line.startswith("[retry]") for line in lines)
