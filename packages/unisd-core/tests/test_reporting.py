"""What a run prints when its output goes to a log: a summary, step lines, evaluation lines."""

from __future__ import annotations

import io
import re

from rich.console import Console
from typer.testing import CliRunner

from unisd.cli.app import make_app
from unisd.io.reporting import RichReporter, eval_line, step_line
from unisd.plugins import get_plugin_manager


def _record(step: int, **extra) -> dict:
    return {"step": step, "loss": 0.5 / step, "divergence": 0.25, "leakage": 0.0, "tokens_per_s": 100.0,
            "step_s": 2.0, "elapsed_s": 2.0 * step, **extra}


def test_plain_lines_every_n_steps_and_always_the_first_and_last():
    out = io.StringIO()
    reporter = RichReporter(Console(file=out, force_terminal=False, width=300), every=4)
    reporter.start(total=10, completed=2)  # resumed at step 2: the first line is step 3
    for step in range(3, 11):
        reporter.step(_record(step, **({"eval/demo/student_accuracy": 0.25} if step == 6 else {})))
    reporter.stop()
    shown = [int(m) for m in re.findall(r"^step (\d+)/10", out.getvalue(), flags=re.MULTILINE)]
    assert shown == [3, 4, 8, 10]
    assert "step 6 evaluation: demo/student_accuracy 0.250" in out.getvalue()
    assert "eta 4 s" in out.getvalue()  # step 8 of 10 at 2 s a step: 2 steps left


def test_auto_cadence_gives_about_twenty_lines():
    out = io.StringIO()
    reporter = RichReporter(Console(file=out, force_terminal=False, width=300))
    reporter.start(total=100, completed=0)
    for step in range(1, 101):
        reporter.step(_record(step))
    assert len(re.findall(r"^step \d+/100", out.getvalue(), flags=re.MULTILINE)) == 21  # 1, 5, 10, ..., 100


def test_line_formats():
    line = step_line(_record(3), total=4)
    assert line.startswith("step 3/4 | loss 0.1667 | divergence 0.25 | leakage 0.000")
    assert eval_line(_record(1)) is None


def test_train_piped_to_a_log_prints_summary_steps_and_evaluations(tiny_llama, toy_data, tmp_path):
    result = CliRunner().invoke(make_app(get_plugin_manager()), [
        "train", "--model", str(tiny_llama), "--data", str(toy_data), "--steps", "3", "--output", str(tmp_path / "run"),
        "--batch-size", "2", "--grad-accum", "1", "--max-new-tokens", "4", "--eval-task", "demo", "--eval-every", "2",
        "--eval-limit", "2",
    ])
    assert result.exit_code == 0, result.output
    text = result.output
    assert re.search(r"Training .+: [\d,]+ trainable parameters of [\d,]+", text)
    assert "8 examples | 3 steps x effective batch 2" in text and f"Output: {tmp_path / 'run'}" in text
    assert re.findall(r"^step (\d)/3 \| loss", text, flags=re.MULTILINE) == ["1", "2", "3"]
    assert re.search(r"^step 2 evaluation: demo/student_accuracy \d", text, flags=re.MULTILINE)
