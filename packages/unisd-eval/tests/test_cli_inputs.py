"""`unisd eval` on awkward inputs: missing predictions, odd completions, bad bytes, an output in use.

Most tests use the built-in ``demo`` task, whose scoring is plain string work (no sandbox, no network).
"""

from __future__ import annotations

import io
import json
import math
import shutil
import subprocess
from datetime import datetime

import pytest
from rich.console import Console
from typer.testing import CliRunner

from unisd.cli.app import make_app
from unisd.data.demo import DemoTask
from unisd.plugins import get_plugin_manager
from unisd.testing import write_jsonl
from unisd_eval.cli import git_commit, score_rows, standard_error
from unisd_eval.tasks import HumanEvalTask


@pytest.fixture(scope="module")
def app():
    return make_app(get_plugin_manager())


@pytest.fixture(scope="module")
def demo():
    return DemoTask().load("test")


def run(app, *args: str):
    return CliRunner().invoke(app, ["eval", *args])


def table_value(output: str, metric: str) -> str | None:
    """The value column of the printed metrics table's row for ``metric``."""
    for line in output.splitlines():
        cells = [c.strip() for c in line.split("│")]
        if len(cells) == 4 and cells[1] == metric:
            return cells[2]
    return None


def read_rows(out):
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]


# ----------------------------------------------------------------------------------------------
# 1. Missing predictions


def test_missing_predictions_are_an_error_by_default(app, demo, tmp_path):
    preds = write_jsonl(tmp_path / "p.jsonl", [{"id": ex.id, "completion": ex.reference} for ex in demo[:2]])
    out = tmp_path / "out"
    result = run(app, "demo", "--predictions", str(preds), "--output", str(out))
    assert result.exit_code == 2, result.output
    assert f"no prediction for {len(demo) - 2} of {len(demo)} items" in result.output
    assert demo[2].id in result.output and "--missing fail" in result.output
    assert "--limit 2" in result.output  # the predictions cover a prefix: the hint names its length
    assert not out.exists()


def test_missing_fail_counts_every_item_in_the_denominator(app, demo, tmp_path):
    preds = write_jsonl(tmp_path / "p.jsonl", [{"id": demo[0].id, "completion": demo[0].reference}])
    out = tmp_path / "out"
    result = run(app, "demo", "--predictions", str(preds), "--output", str(out), "--missing", "fail")
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    n = len(demo)
    assert results["metrics"]["accuracy"] == pytest.approx(1 / n)  # not 1.0
    assert results["metrics"]["items"] == n and isinstance(results["metrics"]["items"], int)
    assert results["metrics"]["completions"] == 1 and results["metrics"]["items_without_prediction"] == n - 1
    assert results["config"]["missing"] == "fail"
    assert results["missing"]["policy"] == "fail" and results["missing"]["items"] == n - 1
    assert f"accuracy = {1 / n:.4f} (1/{n} items)" in result.output
    assert table_value(result.output, "items") == str(n)
    rows = read_rows(out)
    assert len(rows) == n and rows[0]["verdict"] == "correct"
    assert {r["verdict"] for r in rows[1:]} == {"missing"}
    assert rows[1]["completion"] is None and rows[1]["error"] == "no prediction for this item"


def test_table_shows_counts_as_integers(app, demo, tmp_path):
    preds = write_jsonl(tmp_path / "p.jsonl", [{"id": ex.id, "completion": ex.reference} for ex in demo[:4]])
    result = run(app, "demo", "--predictions", str(preds), "--output", str(tmp_path / "o"), "--limit", "4")
    assert result.exit_code == 0, result.output
    assert table_value(result.output, "items") == "4" and table_value(result.output, "completions") == "4"
    assert table_value(result.output, "accuracy") == "1.0000"


def test_leakage_and_overrun_are_counted_as_in_training(app, demo, tmp_path):
    """The held-out evaluation's leakage and overrun (unisd.evaluation.leakage), per completion present."""
    template = "This is an example for a response"
    completions = [demo[0].reference, demo[1].reference + "\n\nThis is an example for a", template, "no idea"]
    preds = write_jsonl(tmp_path / "p.jsonl", [{"id": ex.id, "completion": c} for ex, c in zip(demo[:4], completions, strict=True)])
    out = tmp_path / "out"
    result = run(app, "demo", "--predictions", str(preds), "--output", str(out), "--limit", "6", "--missing", "fail")
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "results.json").read_text())["metrics"]
    assert metrics["leakage"] == pytest.approx(2 / 4)  # the two items without a prediction are not counted
    assert metrics["overrun"] == pytest.approx(1 / 4)  # the answer, then the template
    assert metrics["accuracy"] == pytest.approx(2 / 6)  # first-line scoring counts the leaking answer
    assert metrics["strict_accuracy"] == pytest.approx(1 / 6)
    assert table_value(result.output, "leakage") == "0.5000"


def test_bad_missing_policy_is_a_usage_error(app, tmp_path):
    preds = write_jsonl(tmp_path / "p.jsonl", [{"id": "demo-test-0", "completion": "x"}])
    result = run(app, "demo", "--predictions", str(preds), "--missing", "skip", "--output", str(tmp_path / "o"))
    assert result.exit_code == 2 and "--missing must be one of error, fail" in result.output


def test_missing_fail_keeps_pass_at_k_with_several_samples(app, tmp_path):
    humaneval = HumanEvalTask().load("test", limit=2)
    ref = humaneval[0].reference
    preds = write_jsonl(tmp_path / "p.jsonl", [{"id": humaneval[0].id, "completion": ref}] * 2)
    out = tmp_path / "out"
    result = run(app, "humaneval", "--predictions", str(preds), "--output", str(out), "--limit", "2",
                 "--missing", "fail")
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "results.json").read_text())["metrics"]
    assert metrics["pass@1"] == pytest.approx(0.5) and metrics["pass@2"] == pytest.approx(0.5)
    assert metrics["items"] == 2 and metrics["completions"] == 2 and metrics["verdict/missing"] == pytest.approx(0.5)


# ----------------------------------------------------------------------------------------------
# 2. A completion with a lone surrogate


def test_lone_surrogate_completion_is_scored_and_written(app, demo, tmp_path):
    preds = tmp_path / "p.jsonl"
    preds.write_text(f'{{"id": "{demo[0].id}", "completion": "\\ud800"}}\n'
                     f'{{"id": "{demo[1].id}", "completion": {json.dumps(demo[1].reference)}}}\n', encoding="utf-8")
    out = tmp_path / "out"
    result = run(app, "demo", "--predictions", str(preds), "--output", str(out), "--limit", "2")
    assert result.exit_code == 0, result.output
    rows = read_rows(out)
    assert rows[0]["completion"] == "\ud800" and rows[0]["value"] == 0.0  # read back to the same string
    assert rows[1]["verdict"] == "correct"
    assert json.loads((out / "results.json").read_text())["metrics"]["accuracy"] == pytest.approx(0.5)


def test_lone_surrogate_in_code_does_not_abort_humaneval(app, tmp_path):
    humaneval = HumanEvalTask().load("test", limit=2)
    preds = tmp_path / "p.jsonl"
    preds.write_text(json.dumps({"id": humaneval[0].id, "completion": humaneval[0].reference}) + "\n"
                     + f'{{"id": "{humaneval[1].id}", "completion": "def f():\\n    return \\"\\ud800\\"\\n"}}\n',
                     encoding="utf-8")
    out = tmp_path / "out"
    result = run(app, "humaneval", "--predictions", str(preds), "--output", str(out), "--limit", "2")
    assert result.exit_code == 0, result.output
    assert (out / "results.json").is_file() and (out / "predictions.jsonl").is_file()
    rows = read_rows(out)
    assert rows[0]["verdict"] == "passed"
    # Only "not passed" is asserted: which verdict the odd program gets (failed from the sandbox, or
    # scoring-error when the sandbox raises and the CLI isolates the item) depends on the sandbox.
    assert rows[1]["value"] == 0.0 and rows[1]["verdict"] != "passed"


class _FragileTask(DemoTask):
    """The demo task with a scorer that raises on one completion, as a scorer bug would."""

    def score(self, example, completion):
        if completion == "boom":
            raise RuntimeError("cannot score this")
        return super().score(example, completion)


def test_a_scorer_raising_on_one_item_costs_only_that_item(demo):
    log = io.StringIO()
    rows = [(demo[0], demo[0].reference), (demo[1], "boom"), (demo[2], demo[2].reference), (demo[3], None)]
    scores = score_rows(_FragileTask(), rows, Console(file=log))
    assert [s.verdict for s in scores] == ["correct", "scoring-error", "correct", "missing"]
    assert "RuntimeError: cannot score this" in scores[1].error
    assert f"first: {demo[1].id}" in log.getvalue()
    with pytest.raises(RuntimeError):  # every item failing is the scorer's bug, not one completion's
        score_rows(_FragileTask(), [(demo[0], "boom"), (demo[1], "boom")], Console(file=io.StringIO()))


# ----------------------------------------------------------------------------------------------
# 3. Non-UTF-8 bytes


def test_non_utf8_predictions_name_the_line(app, tmp_path):
    preds = tmp_path / "p.jsonl"
    preds.write_bytes(b'{"id": "demo-test-0", "completion": "a"}\n{"id": "demo-test-1", "completion": "\xff\xfe"}\n')
    result = run(app, "demo", "--predictions", str(preds), "--output", str(tmp_path / "o"), "--limit", "2")
    assert result.exit_code == 2, result.output
    assert f"{preds}:2: not valid UTF-8" in result.output and "0xff" in result.output
    assert "Traceback" not in result.output


def test_utf8_bom_is_accepted(app, demo, tmp_path):
    preds = tmp_path / "p.jsonl"
    preds.write_bytes(b"\xef\xbb\xbf" + json.dumps({"id": demo[0].id, "completion": demo[0].reference}).encode() + b"\n")
    result = run(app, "demo", "--predictions", str(preds), "--output", str(tmp_path / "o"), "--limit", "1")
    assert result.exit_code == 0, result.output


# ----------------------------------------------------------------------------------------------
# 4. An output directory in use


def test_output_with_earlier_results_needs_overwrite(app, demo, tmp_path):
    preds = write_jsonl(tmp_path / "p.jsonl", [{"id": demo[0].id, "completion": demo[0].reference}])
    out = tmp_path / "out"
    assert run(app, "demo", "--predictions", str(preds), "--output", str(out), "--limit", "1").exit_code == 0
    before = (out / "results.json").read_text()
    result = run(app, "demo", "--predictions", str(preds), "--output", str(out), "--limit", "1")
    assert result.exit_code == 2 and str(out) in result.output and "--overwrite" in result.output
    assert (out / "results.json").read_text() == before
    result = run(app, "demo", "--predictions", str(preds), "--output", str(out), "--limit", "1", "--overwrite")
    assert result.exit_code == 0, result.output


def test_output_is_checked_before_the_model_is_loaded(app, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "predictions.jsonl").write_text("{}\n")
    result = run(app, "demo", "--model", str(tmp_path / "no-such-model"), "--output", str(out))
    assert result.exit_code == 2 and "predictions.jsonl" in result.output and "--overwrite" in result.output


# ----------------------------------------------------------------------------------------------
# 5. Provenance, standard errors, references


def test_results_record_environment_stderr_and_references(app, demo, tmp_path):
    records = [{"id": ex.id, "completion": ex.reference if i == 0 else "no"} for i, ex in enumerate(demo[:4])]
    preds = write_jsonl(tmp_path / "p.jsonl", records)
    out = tmp_path / "out"
    result = run(app, "demo", "--predictions", str(preds), "--output", str(out), "--limit", "4")
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert results["metrics"]["accuracy"] == pytest.approx(0.25)
    assert results["metrics"]["accuracy_stderr"] == pytest.approx(math.sqrt(0.25 * 0.75 / 4))
    env = results["environment"]
    assert {"unisd", "unisd_eval", "torch"} <= set(env["versions"])
    assert datetime.fromisoformat(env["date"]).utcoffset().total_seconds() == 0
    assert "git_commit" in env
    assert [r["reference"] for r in read_rows(out)] == [ex.reference for ex in demo[:4]]


def test_standard_error_of_per_item_means():
    assert standard_error([1.0, 0.0, 0.0, 0.0]) == pytest.approx(math.sqrt(0.25 * 0.75 / 4))
    assert standard_error([1.0, 1.0]) == 0.0 and standard_error([]) == 0.0


def test_git_commit_is_best_effort(tmp_path):
    assert git_commit(tmp_path / "no-such-dir") is None
    if shutil.which("git") is None:
        return
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run([*git, "init", "-q"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "x"], cwd=repo, check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    assert git_commit(repo) == head and len(head) == 40
