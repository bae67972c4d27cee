"""`unisd eval --protocol research`: the research code's MCQA extraction order and tool-use retries (§5)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from unisd.cli.app import make_app
from unisd.plugins import get_plugin_manager
from unisd.testing import make_tiny_model_dir, write_jsonl
from unisd_eval.parsing.letters import extract_letter, extract_letter_research
from unisd_eval.protocols import RESEARCH_RETRIES, retry_unparsed, use_protocol
from unisd_eval.tasks import CosETask, ToolUseTask

THREE = [("B. Mitochondria make the cell's energy.", "B"), ("I think C is right.", "C"),
         ("Answer: A photon is emitted.", "A")]


@pytest.fixture(scope="module")
def app():
    return make_app(get_plugin_manager())


@pytest.mark.parametrize(("text", "letter"), THREE)
def test_research_extraction_reads_the_three_answers_the_default_does_not(text, letter):
    assert extract_letter_research(text, 4) == letter
    assert extract_letter(text, 4) is None  # the default protocol is unchanged


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Answer: A\nWait.\nAnswer: C", "A"),  # the research code takes the *first* answer line
        ("So the answer is (D).", "D"),
        ("FINAL ANSWER: B", "B"),
        ("No letter here at all.", None),
        ("Answer: E", None),  # not among 4 options
    ],
)
def test_research_extraction_order(text, expected):
    assert extract_letter_research(text, 4) == expected


def test_mcqa_task_scores_by_its_protocol(data_files):
    example = CosETask().load("validation", path=str(data_files["cos_e"]), limit=1)[0]
    letter = example.meta["correct_letter"]
    completion = f"{letter}. that one"
    assert CosETask().score(example, completion).verdict == "unparsed"
    assert use_protocol(CosETask(), "research").score(example, completion).verdict == "correct"


def test_retry_unparsed_replaces_only_completions_that_then_parse():
    task = ToolUseTask()
    examples = [task_example(i) for i in range(3)]
    rows = [(examples[0], "Action: f\nAction Input: {}"), (examples[1], "no call"), (examples[2], "nothing")]
    rounds: list[list[str]] = []

    def regenerate(exs, temperature):
        rounds.append([e.id for e in exs])
        assert temperature == 0.7
        return ["Action: g\nAction Input: {}" if e.id == "t1" and len(rounds) == 2 else "still nothing" for e in exs]

    out, stats = retry_unparsed(task, rows, regenerate, RESEARCH_RETRIES)
    assert rounds == [["t1", "t2"], ["t1", "t2"]]
    assert out[0] == rows[0] and out[1][1].startswith("Action: g") and out[2] == rows[2]
    assert (stats.retried, stats.recovered) == (2, 1)


def task_example(i):
    from unisd.data.tasks import Example

    return Example(f"t{i}", "p", "r", {"gold_calls": []})


def test_eval_records_the_protocol_and_research_scores_more(app, data_files, tmp_path):
    examples = CosETask().load("validation", path=str(data_files["cos_e"]))
    preds = write_jsonl(tmp_path / "p.jsonl", [
        {"id": ex.id, "completion": f"I think {ex.meta['correct_letter']} fits best."} for ex in examples])
    results = {}
    for protocol in ("default", "research"):
        out = tmp_path / protocol
        result = CliRunner().invoke(app, ["eval", "cos_e", "--predictions", str(preds), "--data-file",
                                          str(data_files["cos_e"]), "--output", str(out), "--protocol", protocol])
        assert result.exit_code == 0, result.output
        results[protocol] = json.loads((out / "results.json").read_text())
    assert results["default"]["protocol"]["name"] == "default"
    assert results["research"]["protocol"]["name"] == "research"
    assert results["research"]["protocol"]["retry_rounds"] == 0  # MCQA has no retries
    assert results["default"]["metrics"]["accuracy"] == 0.0
    assert results["research"]["metrics"]["accuracy"] == 1.0


def test_research_protocol_retries_tool_use_generation(app, data_files, tmp_path):
    model_dir = make_tiny_model_dir(tmp_path / "tiny")
    runs = {}
    for protocol in ("default", "research"):
        out = tmp_path / protocol
        result = CliRunner().invoke(app, ["eval", "tooluse", "--model", str(model_dir), "--data-file",
                                          str(data_files["tooluse"]), "--max-new-tokens", "4", "--output", str(out),
                                          "--protocol", protocol])
        assert result.exit_code == 0, result.output
        runs[protocol] = json.loads((out / "results.json").read_text())
    research = runs["research"]
    assert research["protocol"]["retry_rounds"] == RESEARCH_RETRIES
    assert research["protocol"]["retry_temperature"] == 0.7
    # A random tiny model writes no "Action:" line: every item is retried, none recovers.
    assert research["metrics"]["retries/items"] == research["metrics"]["items"]
    assert research["metrics"]["retries/recovered"] == 0
    assert "retries/items" not in runs["default"]["metrics"] and runs["default"]["protocol"]["retry_rounds"] == 0


def test_unknown_protocol_exits_2(app, tmp_path):
    result = CliRunner().invoke(app, ["eval", "cos_e", "--predictions", str(tmp_path / "x.jsonl"),
                                      "--protocol", "paper", "--output", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "--protocol must be one of default, research, got 'paper'" in result.output
