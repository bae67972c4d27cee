"""A run killed mid-way and resumed ends exactly where an uninterrupted run ends."""

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from unisd.cli.app import make_app
from unisd.config import RunConfig
from unisd.errors import CheckpointError
from unisd.io.checkpoint import checkpoint_problem, load_pickled, write_manifest
from unisd.io.runlog import MetricsLog
from unisd.loop import train
from unisd.plugins import get_plugin_manager


class Crash(Exception):
    pass


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch):
    """No line breaks in rich's output (it wraps at the terminal width, 80 columns under the test runner)."""
    monkeypatch.setenv("COLUMNS", "10000")


def config(model, data, out):
    # Sampling at 0.7 and LoRA dropout on: resuming must restore the RNG streams, not just weights.
    return RunConfig(model=str(model), data=str(data), output=str(out), steps=4, batch_size=2, grad_accum=2,
                     max_new_tokens=6, save_every=2, lr=1e-3, seed=7)


def test_resume_after_crash_matches_uninterrupted_run(tiny_llama, toy_data, tmp_path, monkeypatch):
    pm = get_plugin_manager(load_entry_points=False)
    straight = train(config(tiny_llama, toy_data, tmp_path / "straight"), pm)

    original_write = MetricsLog.write

    def write_then_crash(self, record):
        original_write(self, record)
        if record["step"] == 3:  # step 3 is logged but not checkpointed: it must be redone once
            raise Crash()

    monkeypatch.setattr(MetricsLog, "write", write_then_crash)
    with pytest.raises(Crash):
        train(config(tiny_llama, toy_data, tmp_path / "crashed"), pm)
    monkeypatch.setattr(MetricsLog, "write", original_write)
    crashed = tmp_path / "crashed"
    assert not (crashed / "final").exists()
    assert sorted(p.name for p in (crashed / "checkpoints").iterdir()) == ["step-2"]

    result = CliRunner().invoke(make_app(pm), ["train", "--resume", str(crashed)])
    assert result.exit_code == 0, result.output

    a = load_file(str(straight / "final" / "adapter_model.safetensors"))
    b = load_file(str(crashed / "final" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=0, atol=1e-6), key
    steps = [json.loads(line)["step"] for line in (crashed / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    straight_loss = [json.loads(line)["loss"] for line in (straight / "metrics.jsonl").read_text().splitlines()]
    resumed_loss = [json.loads(line)["loss"] for line in (crashed / "metrics.jsonl").read_text().splitlines()]
    assert resumed_loss == pytest.approx(straight_loss, rel=1e-6)


def test_resume_can_extend_a_finished_run(tiny_llama, toy_data, tmp_path):
    pm = get_plugin_manager(load_entry_points=False)
    out = train(config(tiny_llama, toy_data, tmp_path / "run"), pm)
    result = CliRunner().invoke(make_app(pm), ["train", "--resume", str(out), "--steps", "5"])
    assert result.exit_code == 0, result.output
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]
    assert (out / "checkpoints" / "step-5").is_dir()


def test_resume_refuses_changed_settings_and_missing_checkpoints(tiny_llama, toy_data, tmp_path):
    pm = get_plugin_manager(load_entry_points=False)
    app = make_app(pm)
    result = CliRunner().invoke(app, ["train", "--resume", str(tmp_path)])
    assert result.exit_code == 2 and "nothing to resume" in result.output
    out = train(config(tiny_llama, toy_data, tmp_path / "run"), pm)
    result = CliRunner().invoke(app, ["train", "--resume", str(out), "--lr", "0.1"])
    assert result.exit_code == 2 and "--shard and --deepspeed may change (got lr (saved 0.001, given 0.1))" in result.output
    with pytest.raises(CheckpointError):
        cfg = config(tiny_llama, toy_data, out)
        cfg.lora = False
        train(cfg, pm, resume=out)


def test_sigterm_saves_a_checkpoint_and_resume_continues(tiny_llama, toy_data, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "unisd", "train", "--model", str(tiny_llama), "--data", str(toy_data),
           "--steps", "100000", "--batch-size", "2", "--grad-accum", "1", "--max-new-tokens", "4", "--output", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            metrics = out / "metrics.jsonl"
            if metrics.is_file() and len(metrics.read_text().splitlines()) >= 2:
                break
            time.sleep(0.2)
        else:
            pytest.fail("training did not start")
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, output
    assert "checkpoint saved" in output
    ckpts = sorted((out / "checkpoints").iterdir())
    assert len(ckpts) == 1
    done = json.loads((ckpts[0] / "trainer_state.json").read_text())["step"]
    result = CliRunner().invoke(make_app(get_plugin_manager(load_entry_points=False)),
                                ["train", "--resume", str(out), "--steps", str(done + 1)])
    assert result.exit_code == 0, result.output
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, done + 2))


def test_nonfinite_steps_are_skipped_then_stop_with_a_checkpoint(tiny_llama, toy_data, tmp_path, monkeypatch):
    import unisd.loop as loop
    from unisd.errors import TrainingDiverged

    real_step = loop.distill_step
    calls = {"n": 0}

    def poisoned(run, examples, completions):
        calls["n"] += 1
        stats = real_step(run, examples, completions)
        if calls["n"] >= 2:  # from step 2 on, every gradient is NaN
            for p in run.model.parameters():
                if p.grad is not None:
                    p.grad.fill_(float("nan"))
        return stats

    monkeypatch.setattr(loop, "distill_step", poisoned)
    cfg = config(tiny_llama, toy_data, tmp_path / "nan")
    cfg.steps, cfg.save_every, cfg.max_nonfinite_steps = 10, 0, 3
    with pytest.raises(TrainingDiverged, match="3 steps in a row"):
        train(cfg, get_plugin_manager(load_entry_points=False))
    records = [json.loads(line) for line in (tmp_path / "nan" / "metrics.jsonl").read_text().splitlines()]
    assert [r["nonfinite_skipped"] for r in records] == [0, 1, 2, 3]
    ckpt = tmp_path / "nan" / "checkpoints" / "step-4"
    weights = load_file(str(ckpt / "adapter_model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())  # the skipped updates never landed


def test_cuda_rng_state_is_this_gpus_and_resumes_on_fewer_gpus(monkeypatch):
    """Emulated CUDA: a checkpoint holds the process's own GPU generator; an older one that holds every
    visible GPU's state still resumes where fewer GPUs are visible (set_rng_state_all would index past them)."""
    from unisd.io.checkpoint import rng_state, set_rng_state

    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: torch.tensor([7], dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: pytest.fail("reads every GPU"))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state: restored.append(int(state[0])))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: pytest.fail("writes every GPU"))

    state = rng_state()
    set_rng_state(state)
    older = dict(state, cuda=[torch.tensor([3], dtype=torch.uint8), torch.tensor([4], dtype=torch.uint8)])
    del older["cuda_device"]
    set_rng_state(older)  # saved with two GPUs visible, resumed with one
    assert restored == [7, 3]


def flat(output):
    """The CLI's output without the line breaks rich adds at the terminal width."""
    return output.replace("\n", "")


def _damage(path, keep=0.5):
    """Cut a file short, as a failing disk or an interrupted copy would."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(tiny_llama, toy_data, tmp_path):
    pm = get_plugin_manager(load_entry_points=False)
    out = train(config(tiny_llama, toy_data, tmp_path / "run"), pm)  # checkpoints at steps 2 and 4
    straight = load_file(str(out / "final" / "adapter_model.safetensors"))
    _damage(out / "checkpoints" / "step-4" / "optimizer.pt")
    stale = out / "checkpoints" / ".step-6.tmp-abc123"  # what a kill during a save leaves
    stale.mkdir()
    (stale / "optimizer.pt").write_bytes(b"half")

    result = CliRunner().invoke(make_app(pm), ["train", "--resume", str(out)])
    assert result.exit_code == 0, result.output
    assert "step-4 is damaged (optimizer.pt has" in flat(result.output)
    assert "resuming from step-2 instead" in flat(result.output)
    assert not stale.exists()
    resumed = load_file(str(out / "final" / "adapter_model.safetensors"))
    assert resumed.keys() == straight.keys()
    for key in straight:
        assert torch.allclose(resumed[key], straight[key], rtol=0, atol=1e-6), key
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert checkpoint_problem(out / "checkpoints" / "step-4") is None  # saved again, whole

    # no intact checkpoint left: one clear error, nothing loaded
    for name in ("step-2", "step-4"):
        _damage(out / "checkpoints" / name / "adapter_model.safetensors")
    result = CliRunner().invoke(make_app(pm), ["train", "--resume", str(out)])
    assert result.exit_code == 2, result.output
    assert "no intact checkpoint (step-4: adapter_model.safetensors has" in flat(result.output)


def test_checkpoint_without_manifest_with_damaged_files_is_a_clear_error(tiny_llama, toy_data, tmp_path):
    """Checkpoints of older versions have no manifest: a damaged file there is still one message, exit 2."""
    pm = get_plugin_manager(load_entry_points=False)
    cfg = config(tiny_llama, toy_data, tmp_path / "run")
    cfg.steps, cfg.save_every = 1, 0
    out = train(cfg, pm)
    ckpt = out / "checkpoints" / "step-1"
    (ckpt / "manifest.json").unlink()
    _damage(ckpt / "adapter_model.safetensors")
    result = CliRunner().invoke(make_app(pm), ["train", "--resume", str(out), "--steps", "2"])
    assert result.exit_code == 2, result.output
    assert "adapter_model.safetensors: cannot be read" in flat(result.output) and "Traceback" not in result.output
    (ckpt / "trainer_state.json").write_text('{"step": 1, "cur')
    result = CliRunner().invoke(make_app(pm), ["train", "--resume", str(out), "--steps", "2"])
    assert result.exit_code == 2 and "no intact checkpoint (step-1: trainer_state.json is unreadable" in flat(result.output)


class Planted:
    """A pickle that runs code when loaded with a full torch.load."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def test_planted_pickle_is_refused_without_running(tiny_llama, toy_data, tmp_path):
    pm = get_plugin_manager(load_entry_points=False)
    cfg = config(tiny_llama, toy_data, tmp_path / "run")
    cfg.steps, cfg.save_every = 1, 0
    out = train(cfg, pm)
    ckpt = out / "checkpoints" / "step-1"
    marker = tmp_path / "ran"
    torch.save({"last_epoch": Planted(marker)}, ckpt / "scheduler.pt")
    write_manifest(ckpt)  # whoever planted it can rewrite the manifest too

    result = CliRunner().invoke(make_app(pm), ["train", "--resume", str(out), "--steps", "2"])
    assert result.exit_code == 2, result.output
    assert "scheduler.pt: refused, it holds Python objects other than tensors" in flat(result.output)
    assert "(exec)" in flat(result.output)  # what it would have called
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="refused"):
        load_pickled(ckpt / "scheduler.pt")
    assert not marker.exists()


def test_saved_states_load_weights_only_and_older_rng_states_still_load(tmp_path):
    import random

    import numpy as np

    from unisd.io.checkpoint import rng_state, set_rng_state

    torch.save([rng_state()], tmp_path / "rng.pt")
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True)[0])
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected
    # before the tensor form: numpy's own state tuple (an ndarray inside)
    torch.save([{"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}],
               tmp_path / "old.pt")
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    set_rng_state(load_pickled(tmp_path / "old.pt")[0])
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected


def test_choose_checkpoint_names_what_is_wrong(tmp_path):
    from unisd.io.checkpoint import choose_checkpoint

    def checkpoint(step):
        path = tmp_path / "checkpoints" / f"step-{step}"
        path.mkdir(parents=True)
        (path / "trainer_state.json").write_text(json.dumps({"step": step, "cursor": 2 * step, "lora": True}))
        (path / "optimizer.pt").write_bytes(b"x" * 100)
        write_manifest(path)
        return path

    two, four, six = checkpoint(2), checkpoint(4), checkpoint(6)
    (six / "optimizer.pt").unlink()
    (four / "optimizer.pt").write_bytes(b"y" * 100)  # same size, other bytes
    warnings = []
    assert choose_checkpoint(tmp_path, None, warnings.append) == two
    assert [w.split(" is damaged ")[1] for w in warnings] == [
        "(optimizer.pt is missing); resuming from step-2 instead",
        "(optimizer.pt does not match its checksum); resuming from step-2 instead",
    ]
    with pytest.raises(CheckpointError, match=r"the checkpoint is damaged \(optimizer.pt does not match"):
        choose_checkpoint(tmp_path, four, warnings.append)  # named explicitly: no fallback
    (two / "manifest.json").write_text("{")
    with pytest.raises(CheckpointError, match="no intact checkpoint .*step-2: manifest.json is unreadable"):
        choose_checkpoint(tmp_path, None, warnings.append)
