"""A run killed mid-way and resumed ends exactly where an uninterrupted run ends."""

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from unisd.cli.app import make_app
from unisd.config import RunConfig
from unisd.errors import CheckpointError
from unisd.loop import train
from unisd.plugins import get_plugin_manager
from unisd.runlog import MetricsLog


class Crash(Exception):
    pass


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
    assert result.exit_code == 2 and "--shard and --deepspeed may change (got lr)" in result.output
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
    from unisd.loop import TrainingDiverged

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
    from unisd.checkpoint import rng_state, set_rng_state

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
