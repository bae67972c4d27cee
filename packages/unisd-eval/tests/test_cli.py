"""`unisd eval`: predictions files (offline HumanEval from PyPI), generation with a tiny model, errors."""

from __future__ import annotations

import json
import os

import pytest
from typer.testing import CliRunner

from unisd.cli.app import make_app
from unisd.plugins import get_plugin_manager
from unisd.testing import make_tiny_model_dir, write_jsonl
from unisd_eval.tasks import HumanEvalTask


@pytest.fixture(scope="module")
def app():
    return make_app(get_plugin_manager())


@pytest.fixture(scope="module")
def humaneval():
    return {ex.id: ex for ex in HumanEvalTask().load("test", limit=4)}


def test_eval_humaneval_predictions_offline(app, humaneval, tmp_path):
    records = [{"id": i, "completion": humaneval[i].reference} for i in ("HumanEval/0", "HumanEval/1", "HumanEval/2")]
    records.append({"id": "HumanEval/3", "completion": "```python\ndef below_zero(operations):\n    return False\n```"})
    preds = write_jsonl(tmp_path / "preds.jsonl", records)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["eval", "humaneval", "--predictions", str(preds), "--output", str(out),
                                      "--limit", "4"])
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert results["metrics"]["pass@1"] == pytest.approx(0.75)
    assert results["metrics"]["items"] == 4 and results["metrics"]["items_without_prediction"] == 0
    assert isinstance(results["metrics"]["items"], int) and "pass@1 = 0.7500 (3/4 items)" in result.output
    assert results["split"] == "test" and "total_s" in results["timings"]
    # What held on this machine is recorded, e.g. whether the network was isolated (as root).
    assert {"network", "ipc", "filesystem", "processes", "user"} <= set(results["sandbox"])
    if os.geteuid() == 0:
        assert results["sandbox"]["user"] == "a dedicated unprivileged uid"
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["verdict"] for r in rows] == ["passed", "passed", "passed", "failed"]
    assert set(rows[0]) >= {"id", "prompt", "completion", "reference", "extracted", "verdict", "error"}
    assert rows[0]["reference"] == humaneval["HumanEval/0"].reference
    assert "pass@1" in result.output


def test_eval_several_samples_per_id_give_pass_at_k(app, humaneval, tmp_path):
    wrong = "```python\ndef has_close_elements(numbers, threshold):\n    return None\n```"
    ref = humaneval["HumanEval/0"].reference
    records = [{"id": "HumanEval/0", "completion": c} for c in (ref, wrong, wrong, ref, wrong)]
    preds = write_jsonl(tmp_path / "preds.jsonl", records)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["eval", "humaneval", "--predictions", str(preds), "--output", str(out),
                                      "--limit", "1"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "results.json").read_text())["metrics"]
    assert metrics["pass@1"] == pytest.approx(0.4) and metrics["pass@2"] == pytest.approx(0.7)
    assert metrics["pass@5"] == pytest.approx(1.0)


def test_eval_unknown_id_and_bad_flags_exit_2(app, tmp_path):
    preds = write_jsonl(tmp_path / "preds.jsonl", [{"id": "HumanEval/999", "completion": "x"}])
    result = CliRunner().invoke(app, ["eval", "humaneval", "--predictions", str(preds), "--output", str(tmp_path / "o")])
    assert result.exit_code == 2 and "HumanEval/999" in result.output
    result = CliRunner().invoke(app, ["eval", "humaneval"])
    assert result.exit_code == 2 and "exactly one of --model" in result.output
    result = CliRunner().invoke(app, ["eval", "nosuchtask", "--predictions", str(preds)])
    assert result.exit_code == 2 and "Unknown task" in result.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "HumanEval/0"}\n')
    result = CliRunner().invoke(app, ["eval", "humaneval", "--predictions", str(bad)])
    assert result.exit_code == 2 and "completion" in result.output


def test_eval_with_a_tiny_model(app, data_files, tmp_path):
    model_dir = make_tiny_model_dir(tmp_path / "tiny")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, [
        "eval", "gsm8k", "--model", str(model_dir), "--data-file", str(data_files["gsm8k"]),
        "--max-new-tokens", "4", "--output", str(out),
    ])
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert results["metrics"]["completions"] == 2 and 0.0 <= results["metrics"]["accuracy"] <= 1.0
    assert results["config"]["temperature"] == 0.0
    out2 = tmp_path / "out2"
    result = CliRunner().invoke(app, [
        "eval", "mbpp", "--model", str(model_dir), "--data-file", str(data_files["mbpp"]), "--limit", "1",
        "--samples", "2", "--max-new-tokens", "4", "--output", str(out2),
    ])
    assert result.exit_code == 0, result.output
    results = json.loads((out2 / "results.json").read_text())
    assert results["metrics"]["completions"] == 2 and "pass@2" in results["metrics"]
    assert results["config"]["temperature"] == 0.7
    rows = [json.loads(line) for line in (out2 / "predictions.jsonl").read_text().splitlines()]
    assert [r["sample"] for r in rows] == [0, 1]


def test_eval_tasks_are_registered():
    names = set(get_plugin_manager().registries.tasks.names())
    assert {"mbpp", "humaneval", "scienceqa", "cos_e", "medmcqa", "gpqa", "tooluse", "gsm8k"} <= names


def test_eval_several_tasks_in_one_call_loads_the_model_once(app, tmp_path, monkeypatch):
    import unisd.model.models as models

    loads = []
    real = models.load_model
    monkeypatch.setattr(models, "load_model", lambda *a, **k: (loads.append(k.get("dtype")), real(*a, **k))[1])
    model_dir = make_tiny_model_dir(tmp_path / "model")
    out = tmp_path / "evals"
    result = CliRunner().invoke(app, ["eval", "--tasks", "demo,humaneval", "--model", str(model_dir), "--limit", "2",
                                      "--max-new-tokens", "4", "--dtype", "float32", "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert loads == ["float32"]  # one load, with the dtype asked for
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["tasks"]) == ["demo", "humaneval"]
    for name, metric in (("demo", "accuracy"), ("humaneval", "pass@1")):
        results = json.loads((out / name / "results.json").read_text())
        assert results["task"] == name and results["metrics"]["items"] == 2
        row = summary["tasks"][name]
        assert (row["metric"], row["value"], row["items"]) == (metric, results["metrics"][metric], 2)
        assert row["stderr"] == results["metrics"][f"{metric}_stderr"]
        assert len((out / name / "predictions.jsonl").read_text().splitlines()) == 2
    assert "unisd eval: summary" in result.output
    # the comma form of the argument is the same thing; a second call refuses to overwrite
    again = CliRunner().invoke(app, ["eval", "demo,humaneval", "--model", str(model_dir), "--output", str(out)])
    assert again.exit_code == 2 and "already holds results.json" in again.output


@pytest.mark.parametrize("args, message", [
    (["--tasks", "demo,humaneval", "--predictions", "p.jsonl"], "--predictions belongs to one task"),
    (["--tasks", "demo,humaneval", "--model", "m", "--split", "test"], "--split belongs to one task"),
    (["--tasks", "demo,nosuchtask", "--model", "m"], "nosuchtask"),
    (["--tasks", "demo,demo", "--model", "m"], "named twice"),
    (["demo", "--tasks", "humaneval", "--model", "m"], "one of the two"),
    ([], "name the task(s)"),
    (["demo", "--model", "m", "--dtype", "float8"], "--dtype must be one of"),
    (["demo", "--model", "m", "--samples", "0"], "--samples must be >= 1"),
    (["demo", "--predictions", "p.jsonl", "--samples", "2"], "--samples applies to --model"),
])
def test_several_task_flags_that_cannot_be_shared_exit_2(app, tmp_path, args, message):
    result = CliRunner().invoke(app, ["eval", *args, "--output", str(tmp_path / "o")])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "o").exists()
