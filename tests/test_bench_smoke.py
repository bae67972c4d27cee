"""The benchmarks run end to end at toy shapes (so `bench/gpu.sh` does not first fail on a GPU machine
for a reason a CPU could have caught). Their numbers are not checked here: see bench/RESULTS.md."""

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(args, tmp_path):
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result.stdout


def test_divergence_benchmark_prints_ratios_and_writes_json(tmp_path):
    out = _run(["bench/divergence.py", "--tokens", "64", "--hidden", "32", "48", "--vocab", "512", "--dtype",
                "bfloat16", "--repeats", "1", "--warmup", "0", "--oracle-tokens", "32", "--json",
                str(tmp_path / "d.json")], tmp_path)
    last = out.strip().splitlines()[-1]
    assert re.fullmatch(r"memory_ratio=[\d.]+ time_ratio=[\d.]+ max_rel_err=[\d.e+-]+", last), last
    data = json.loads((tmp_path / "d.json").read_text())
    assert {"machine", "torch", "results"} <= set(data) and len(data["results"]) == 2  # one per hidden size


def test_step_benchmark_splits_phases_and_measures_context_memory(tmp_path):
    out = _run(["bench/step.py", "--preset", "tiny", "--steps", "1", "--warmup", "0", "--batch-size", "2",
                "--max-new-tokens", "4", "--json", str(tmp_path / "s.json")], tmp_path)
    assert re.search(r"context_memory_increase_mib=[\d.-]+ two_contexts_hidden_mib=[\d.]+", out), out[-500:]
    data = json.loads((tmp_path / "s.json").read_text())
    assert {"speed", "memory", "args"} <= set(data)


def test_step_benchmark_flop_count_matches_a_measured_count(tmp_path, monkeypatch):
    """The MFU denominator: ``training_flops`` against torch's FLOP counter over one real distill_step
    (LoRA and full fine-tuning; tiny model, short sequences, so attention's score products stay small).
    The counter knows aten's products only, so the step runs them through the BLAS (``UNISD_ONEDNN=0``):
    oneDNN's op does the same products."""
    import argparse

    monkeypatch.setenv("UNISD_ONEDNN", "0")

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import step as bench_step
    finally:
        sys.path.pop(0)
    from unisd.model.rollout import HFBackend, SamplingParams
    from unisd.step import distill_step

    for full in (False, True):
        args = argparse.Namespace(model=None, preset="tiny", batch_size=2, max_new_tokens=8, full=full, device="cpu")
        run = bench_step.make_run(args, tmp_path / f"full{full}", {})
        examples = run.examples[:2]
        torch.manual_seed(0)
        completions = HFBackend(run.model, run.tokenizer).generate(
            [run.student_ids(e) for e in examples], SamplingParams(temperature=0.7, max_new_tokens=8))
        with FlopCounterMode(display=False) as counter:
            distill_step(run, examples, completions)
        measured = counter.get_total_flops()
        tokens = bench_step.token_counts(run, examples, completions)
        counted = bench_step.training_flops(run, full, tokens["student"], tokens["teacher"], tokens["completion"])
        assert abs(counted - measured) / measured < 0.05, (full, counted, measured)


def test_gpu_script_runs_every_check_at_toy_shapes(tmp_path):
    """bench/gpu.sh itself (the one command a GPU session gets to run), in its CPU smoke mode."""
    import os

    result = subprocess.run(["bash", "bench/gpu.sh"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "SMOKE": "1", "OUT": str(tmp_path), "PYTHON": sys.executable})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == ["checks.log", "divergence-lora-eager.json", "divergence-lora.json", "divergence.json", "step.json"]
    log = (tmp_path / "checks.log").read_text()
    assert log.count("memory_ratio=") == 3 and "context_memory_increase_mib=" in log and "!!" not in log


def test_scaling_benchmark_reports_startup_and_step_overhead_per_size(tmp_path):
    from unisd.testing import make_tiny_model_dir

    model = make_tiny_model_dir(tmp_path / "model")
    out = _run(["bench/scaling.py", "--sizes", "20,200", "--model", str(model), "--draws", "2", "--repeats", "1",
                "--work", str(tmp_path / "work"), "--g-repeats", "1", "--json", str(tmp_path / "sc.json")], tmp_path)
    last = out.strip().splitlines()[-1]
    assert re.fullmatch(r"startup_1m_over_1k=[\d.e+-]+ step_overhead_1m_s=[\d.e+-]+ g8_per_completion_speedup=[\d.e+-]+"
                        r" k3_time_ratio=[\d.e+-]+ dp2_efficiency=[\d.e+-]+", last), last
    data = json.loads((tmp_path / "sc.json").read_text())
    assert [row["prompts"] for row in data["rows"]] == [20, 200]
    assert all(row["examples"] == row["prompts"] for row in data["rows"])  # every short prompt kept
    assert sorted(data["contexts"]) == ["0", "1", "3", "5"] and all(c["step_s"] > 0 for c in data["contexts"].values())
    parallel = data["data_parallel"]
    assert sorted(parallel) == ["1 process", "2 processes", "2 processes, after backward"]
    assert len({row["tokens"] for row in parallel.values()}) == 1  # the same global batch in each


def test_prefix_benchmark_runs_both_modes_and_prints_ratios(tmp_path):
    out = _run(["bench/prefix.py", "--threads", "1", "--repeats", "1", "--batch", "2", "--eval-items", "4"], tmp_path)
    assert "same completions True" in out and "same greedy completions True" in out, out[-1500:]
    last = out.strip().splitlines()[-1]
    assert re.fullmatch(r"generate_ratio=[\d.]+ teacher_ratio=[\d.]+ step_ratio=[\d.]+ eval16_ratio=[\d.]+ "
                        r"eval32_over_eval16_whole=[\d.]+", last), last


def test_onednn_benchmark_runs_both_modes_and_prints_ratios(tmp_path):
    out = _run(["bench/onednn.py", "--threads", "1", "--repeats", "1", "--batch", "2", "--eval-items", "4"], tmp_path)
    assert out.count("same completions") == 2 and "same greedy completions" in out, out[-1500:]
    last = out.strip().splitlines()[-1]
    assert re.fullmatch(r"generate_ratio=[\d.]+ teacher_ratio=[\d.]+ step_ratio=[\d.]+ eval32_ratio=[\d.]+", last), last


def test_merged_adapter_benchmark_runs_both_modes_and_prints_ratios(tmp_path):
    out = _run(["bench/merged_adapter.py", "--threads", "1", "--repeats", "1", "--batch", "2", "--eval-items", "4"],
               tmp_path)
    assert out.count("same tokens") == 5, out[-1500:]  # two rollout repeats, three evaluation passes
    last = out.strip().splitlines()[-1]
    assert re.fullmatch(r"generate_ratio=[\d.]+ eval_ratio=[\d.]+ same_samples=\d+/5", last), last


def test_lean_decode_benchmark_runs_both_modes_and_prints_ratios(tmp_path):
    out = _run(["bench/lean_decode.py", "--threads", "1", "--repeats", "1", "--batch", "2", "--eval-items", "4"],
               tmp_path)
    assert out.count("same completions") == 2 and "same greedy completions True" in out, out[-1500:]
    last = out.strip().splitlines()[-1]
    assert re.fullmatch(r"generate_ratio=[\d.]+ step_ratio=[\d.]+ eval32_ratio=[\d.]+", last), last


def test_lean_forward_benchmark_runs_both_modes_and_prints_ratios(tmp_path):
    """With the demo's adapter dropout both modes draw the same masks: their gradients agree to float32
    rounding in every repeat."""
    out = _run(["bench/lean_forward.py", "--threads", "1", "--repeats", "1", "--batch", "2", "--lora-dropout", "0.05"],
               tmp_path)
    differences = [float(d) for d in re.findall(r"largest relative gradient difference (\S+)", out)]
    assert len(differences) == 2 and max(differences) < 1e-3, out[-1500:]
    last = out.strip().splitlines()[-1]
    assert re.fullmatch(r"generate_ratio=[\d.]+ teacher_ratio=[\d.]+ step_ratio=[\d.]+", last), last
