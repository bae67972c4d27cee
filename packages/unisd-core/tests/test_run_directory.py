"""One run per directory: the lock, restarting a run that stopped before its first checkpoint, resume flags."""

import json
import os
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from unisd.cli.app import make_app
from unisd.config import RunConfig
from unisd.io.rundir import LOCK_FILE, RunLockedError, acquire_lock
from unisd.io.runlog import MetricsLog
from unisd.loop import train
from unisd.plugins import get_plugin_manager

TIMINGS = {"tokens_per_s", "generation_s", "step_s", "elapsed_s"}


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch):
    """No line breaks in rich's output (it wraps at the terminal width, 80 columns under the test runner)."""
    monkeypatch.setenv("COLUMNS", "10000")


def flat(output):
    """The CLI's output without the line breaks rich adds at the terminal width."""
    return output.replace("\n", "")


def train_args(model, data, out, steps=3):
    return ["train", "--model", str(model), "--data", str(data), "--steps", str(steps), "--batch-size", "2",
            "--grad-accum", "1", "--max-new-tokens", "4", "--save-every", "1", "--output", str(out)]


def test_lock_is_exclusive_names_its_holder_and_is_removed_on_release(tmp_path):
    notes = []
    lock = acquire_lock(tmp_path / "run", notes.append)
    holder = json.loads((tmp_path / "run" / LOCK_FILE).read_text())
    assert holder["pid"] == os.getpid() and holder["host"]
    with pytest.raises(RunLockedError, match=f"in use by another unisd train \\(pid {os.getpid()} on "):
        acquire_lock(tmp_path / "run", notes.append)  # another open file description: flock refuses it
    lock.release()
    assert not (tmp_path / "run" / LOCK_FILE).exists()
    acquire_lock(tmp_path / "run", notes.append).release()
    assert notes == []


def test_lock_left_by_a_dead_process_is_taken_over_with_a_note(tmp_path):
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": 999999, "host": "elsewhere", "started": "yesterday"}))
    notes = []
    lock = acquire_lock(tmp_path, notes.append)
    assert len(notes) == 1 and "pid 999999 on elsewhere, since yesterday) is no longer running" in notes[0]
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()


def test_output_that_is_a_file_is_refused(tiny_llama, toy_data, tmp_path):
    out = tmp_path / "taken"
    out.write_text("not a directory")
    result = CliRunner().invoke(make_app(get_plugin_manager()), train_args(tiny_llama, toy_data, out))
    assert result.exit_code == 2, result.output
    assert "is a file, not a directory" in flat(result.output)
    assert out.read_text() == "not a directory"


def test_second_train_on_one_directory_fails_at_once_and_the_first_is_untouched(
    tiny_llama, toy_data, tmp_path, monkeypatch
):
    # The lone run and the first of the pair start together, each in its own folder with --output run:
    # their config.toml (which records the output) can then be compared byte for byte. One hash seed for
    # both: peft writes its target modules in set order.
    lone_cwd, pair_cwd = tmp_path / "lone", tmp_path / "pair"
    lone_cwd.mkdir()
    pair_cwd.mkdir()
    args = train_args(tiny_llama, toy_data, "run", steps=6)
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    started = [subprocess.Popen([sys.executable, "-m", "unisd", *args], cwd=cwd, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for cwd in (lone_cwd, pair_cwd)]
    lone, first = started
    out = pair_cwd / "run"
    try:
        deadline = time.time() + 120
        while not (out / LOCK_FILE).is_file() or not (out / LOCK_FILE).read_text().strip():
            assert time.time() < deadline and first.poll() is None, "the first run never took the lock"
            time.sleep(0.05)
        monkeypatch.chdir(pair_cwd)
        second = CliRunner().invoke(make_app(get_plugin_manager()), args)
        outputs = [proc.communicate(timeout=300)[0] for proc in started]
    finally:
        for proc in started:
            if proc.poll() is None:
                proc.kill()
    assert second.exit_code == 2, second.output
    assert f"is in use by another unisd train (pid {first.pid} on" in flat(second.output)
    assert lone.returncode == 0 and first.returncode == 0, outputs

    lone_out = lone_cwd / "run"
    files = sorted(p.relative_to(lone_out) for p in lone_out.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert LOCK_FILE not in {str(f) for f in files}
    for name in files:
        if name.name == "metrics.jsonl":  # timings differ from run to run; everything else must not
            strip = [{k: v for k, v in json.loads(line).items() if k not in TIMINGS}
                     for line in (lone_out / name).read_text().splitlines()]
            assert strip == [{k: v for k, v in json.loads(line).items() if k not in TIMINGS}
                             for line in (out / name).read_text().splitlines()]
        else:
            assert (lone_out / name).read_bytes() == (out / name).read_bytes(), name


class Killed(Exception):
    pass


def kill_at_step_1(monkeypatch):
    """A run that dies after logging step 1, before any checkpoint, leaving its lock file behind."""
    original = MetricsLog.write

    def write_then_die(self, record):
        original(self, record)
        lock = self.path.parent / LOCK_FILE
        stale = lock.read_text()
        monkeypatch.setattr(MetricsLog, "write", original)
        raise Killed(stale)

    monkeypatch.setattr(MetricsLog, "write", write_then_die)


def test_run_killed_before_its_first_checkpoint_starts_again_with_the_same_command(
    tiny_llama, toy_data, tmp_path, monkeypatch
):
    out = tmp_path / "run"
    app = make_app(get_plugin_manager(load_entry_points=False))
    kill_at_step_1(monkeypatch)
    with pytest.raises(Killed) as killed:
        train(RunConfig(model=str(tiny_llama), data=str(toy_data), output=str(out), steps=2, batch_size=2,
                        grad_accum=1, max_new_tokens=4), get_plugin_manager(load_entry_points=False))
    (out / LOCK_FILE).write_text(str(killed.value))  # a kill leaves the lock file (unlocked: its holder is gone)
    assert sorted(p.name for p in out.iterdir()) == ["config.toml", "metrics.jsonl", LOCK_FILE]

    result = CliRunner().invoke(app, train_args(tiny_llama, toy_data, out, steps=2))
    assert result.exit_code == 0, result.output
    assert "stopped before its first checkpoint: starting it over" in flat(result.output)
    assert "is no longer running" in flat(result.output)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    assert not (out / LOCK_FILE).exists()

    # a directory with checkpoints is a run to resume, not to overwrite
    result = CliRunner().invoke(app, train_args(tiny_llama, toy_data, out, steps=2))
    assert result.exit_code == 2 and f"continue it with --resume {out}" in flat(result.output)
    # and anything else in it is not ours to clear
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    result = CliRunner().invoke(app, train_args(tiny_llama, toy_data, other))
    assert result.exit_code == 2 and "exists and is not empty (notes.txt)" in flat(result.output)
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]


def test_a_sweeps_job_file_alone_is_not_called_a_stopped_run(tiny_llama, toy_data, tmp_path):
    """`unisd sweep` writes sweep_job.json into the run directory before it starts the run."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "sweep_job.json").write_text("{}")
    app = make_app(get_plugin_manager(load_entry_points=False))
    result = CliRunner().invoke(app, train_args(tiny_llama, toy_data, out, steps=1))
    assert result.exit_code == 0, result.output
    assert "stopped before its first checkpoint" not in flat(result.output)
    assert (out / "sweep_job.json").is_file() and (out / "final").is_dir()


def test_run_killed_before_its_first_checkpoint_resumes_from_step_0(tiny_llama, toy_data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    kill_at_step_1(monkeypatch)
    with pytest.raises(Killed):
        train(RunConfig(model=str(tiny_llama), data=str(toy_data), output=str(out), steps=2, batch_size=2,
                        grad_accum=1, max_new_tokens=4), get_plugin_manager(load_entry_points=False))
    result = CliRunner().invoke(make_app(get_plugin_manager(load_entry_points=False)), ["train", "--resume", str(out)])
    assert result.exit_code == 0, result.output
    assert "from step 0: it stopped before its first checkpoint" in flat(result.output)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


def test_resume_accepts_the_flags_the_run_was_started_with(tiny_llama, toy_data, tmp_path, monkeypatch):
    app = make_app(get_plugin_manager(load_entry_points=False))
    out = tmp_path / "run"
    args = train_args(tiny_llama, toy_data, out, steps=1) + ["--seed", "3", "--lr", "0.001"]
    assert CliRunner().invoke(app, args).exit_code == 0
    # the same command with --resume (the output given relative to here: the same directory)
    monkeypatch.chdir(tmp_path)
    again = [a if a != str(out) else "run" for a in args]
    result = CliRunner().invoke(app, [*again, "--resume", "run", "--steps", "2"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(app, [*again, "--resume", "run", "--steps", "3", "--seed", "4"])
    assert result.exit_code == 2
    assert "may change (got seed (saved 3, given 4))" in flat(result.output)


def test_leftovers_of_interrupted_saves_are_removed_or_put_back(tmp_path):
    from unisd.io.rundir import remove_leftovers

    ckpts = tmp_path / "checkpoints"
    for name in (".step-2.tmp-abc", ".step-4.old-99", "step-2", ".step-2.old-98"):
        (ckpts / name).mkdir(parents=True)
        (ckpts / name / "file").write_text(name)
    (tmp_path / ".config.toml.tmp-x1y2").write_text("half")
    (tmp_path / "config.toml").write_text("whole")
    notes = []
    remove_leftovers(tmp_path, notes.append)
    # step-4 was moved aside for its replacement, which a kill stopped: the old version comes back
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-2", "step-4"]
    assert (ckpts / "step-4" / "file").read_text() == ".step-4.old-99"
    assert (ckpts / "step-2" / "file").read_text() == "step-2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "config.toml"]
    assert len(notes) == 4


def test_a_directory_holding_only_the_sweeps_job_file_trains(tiny_llama, toy_data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "sweep_job.json").write_text('{"method": "plain", "seed": 1}')  # `unisd sweep` writes it first
    app = make_app(get_plugin_manager(load_entry_points=False))
    result = CliRunner().invoke(app, train_args(tiny_llama, toy_data, out, steps=1))
    assert result.exit_code == 0, result.output
    assert (out / "final").is_dir() and json.loads((out / "sweep_job.json").read_text())["method"] == "plain"
