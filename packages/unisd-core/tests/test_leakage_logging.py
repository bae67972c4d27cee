"""Leakage is logged per optimiser step (metrics.jsonl) and at every evaluation (before/after, --eval-task)."""

import json

import pytest
from typer.testing import CliRunner

from unisd.cli.app import make_app
from unisd.data.demo import DemoTask
from unisd.evaluation import evaluate as evaluate_module
from unisd.evaluation.evaluate import evaluate
from unisd.model.rollout import Completion, HFBackend
from unisd.plugins import get_plugin_manager

LEAKED = "CLOUD TABLE\n\nThis is an example for a"


def test_evaluate_reports_the_share_of_leaking_completions(monkeypatch):
    task = DemoTask()
    examples = task.load("test", limit=4)
    outputs = [examples[0].reference, examples[1].reference + "\n\nThis is an example for a", "no idea",
               "Carefully study the reference solution"]
    monkeypatch.setattr(evaluate_module, "generate_texts", lambda *a, **k: outputs)
    result = evaluate(None, None, task, examples, 12)
    assert result.metrics["leakage"] == 0.5
    assert result.metrics["accuracy"] == 0.5 and result.metrics["strict_accuracy"] == 0.25
    assert result.metrics["overrun"] == 0.25  # the second goes on after its finished answer


def test_training_logs_leakage_per_step_and_per_evaluation(monkeypatch, tiny_llama, tmp_path):
    def generate(self, prompts, params):  # every other sampled completion copies the template
        texts = [LEAKED if i % 2 == 0 else "42" for i in range(len(prompts))]
        eos = self.tokenizer.eos_token_id
        return [Completion(self.tokenizer(t, add_special_tokens=False)["input_ids"] + [eos], False) for t in texts]

    monkeypatch.setattr(HFBackend, "generate", generate)
    monkeypatch.setattr(evaluate_module, "generate_texts", lambda model, tok, texts, *a, **k: [LEAKED] * len(texts))
    config = tmp_path / "run.toml"
    config.write_text("eval_before_after = true\n")
    out = tmp_path / "run"
    result = CliRunner().invoke(make_app(get_plugin_manager()), [
        "train", "--model", str(tiny_llama), "--task", "demo", "--steps", "1", "--batch-size", "2", "--grad-accum", "2",
        "--max-new-tokens", "4", "--eval-task", "demo", "--eval-every", "1", "--eval-limit", "3",
        "--config", str(config), "--output", str(out),
    ])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert record["leakage"] == 0.5
    assert record["eval/demo/leakage"] == 1.0 and record["eval/demo/teacher_leakage"] == 1.0
    before = json.loads((out / "eval" / "before.json").read_text())
    # demo-test-0 is 'cloud table': its first line is right, the whole completion is not
    assert before["student_accuracy"] == pytest.approx(1 / 3) and before["student_strict_accuracy"] == 0.0
    assert before["leakage"] == 1.0 and before["n"] == 3
    assert before["overrun"] == pytest.approx(1 / 3)  # only 'CLOUD TABLE' is finished before the template follows
    printed = " ".join(result.output.split())  # the console wraps long lines
    assert "before training: student accuracy 0.333 (strict 0.000), leakage 1.000, overrun 0.333 | teacher-with-reference" in printed
    assert json.loads((out / "eval" / "after.json").read_text())["leakage"] == 1.0
    rows = [json.loads(line) for line in (out / "eval" / "after_predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["demo-test-0", "demo-test-1", "demo-test-2"]
    assert rows[0]["reference"] == "CLOUD TABLE" and rows[0]["student"]["completion"] == LEAKED
    assert rows[0]["student"]["leak"].startswith("template") and rows[0]["student"]["overrun"] is True
    assert rows[0]["student"]["value"] == 1.0 and rows[1]["student"]["value"] == 0.0  # first-line scoring
    assert rows[1]["student"]["overrun"] is False and rows[0]["teacher"]["completion"] == LEAKED
    assert (out / "eval" / "before_predictions.jsonl").exists()
