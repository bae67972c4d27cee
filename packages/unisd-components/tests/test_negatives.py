"""Negative demonstrations: prompts per kind, parsing, the resumable cache and `unisd cache negatives`."""

from __future__ import annotations

import json

import pytest
from components_testlib import examples
from typer.testing import CliRunner

from unisd.cli.app import make_app
from unisd.plugins import get_plugin_manager
from unisd.prompts import reference_with_reasoning
from unisd.tasks import Example
from unisd.testing import toy_records, write_jsonl
from unisd_components.contrastive import Contrastive
from unisd_components.negatives import (
    BUG_TYPES,
    build_negatives,
    negative_prompts,
    negative_reference,
    parse_output,
    read_cache,
    wrong_targets,
)

MCQA = Example("m1", "Q? A. cat B. dog C. cow D. owl", "Reasoning: r\nAnswer: B\n",
               {"choices": ["cat", "dog", "cow", "owl"], "correct_letter": "B"})


def test_mcqa_wrong_letters_round_robin():
    assert wrong_targets(MCQA, 4) == ["A", "C", "D", "A"]
    prompts = negative_prompts(MCQA, "mcqa", 2)
    assert [t for _, t in prompts] == ["A", "C"]
    assert "answer is A (cat)" in prompts[0][0] and "answer is C (cow)" in prompts[1][0]


def test_mcqa_letters_from_num_choices_as_unisd_eval_stores_them():
    ex = Example("m2", "Q? A. x B. y C. z", "Answer: C", {"correct_letter": "C", "num_choices": 3})
    assert wrong_targets(ex, 3) == ["A", "B", "A"]
    assert "the answer is B.\n" in negative_prompts(ex, "mcqa", 2)[1][0]


def test_code_and_tool_prompts_cycle_their_types():
    code = Example("c1", "Write add.", "def add(a, b):\n    return a + b", {"test_list": ["assert add(1, 2) == 3"]})
    prompts = negative_prompts(code, "code", 5)
    assert [t for _, t in prompts] == [*BUG_TYPES, BUG_TYPES[0]]
    assert "Function name: add" in prompts[0][0] and "assert add(1, 2) == 3" in prompts[0][0]
    tool = negative_prompts(Example("t", "Use the API.", "Action: x", {}), "tooluse", 4)
    assert [t for _, t in tool] == ["wrong_action", "wrong_args", "wrong_interpretation", "extra_tool_calls"]


def test_parse_and_layout_match_the_positive_reference():
    assert parse_output('noise {"reasoning": "Dogs bark.", "answer": "Z"} tail') == ("Dogs bark.", "Z")
    assert parse_output("not json at all") == ("", "not json at all")
    # MCQA: the wrong letter in the positive layout, whatever letter the model wrote.
    assert negative_reference("mcqa", "A", "Cats purr.", "B") == reference_with_reasoning("A", "Cats purr.")
    assert negative_reference("code", "wrong operator", "", "```python\ndef f():\n    return 2\n```") == "def f():\n    return 2"


def test_build_is_resumable(tmp_path):
    exs = examples(3)
    calls = []

    def generate(prompts):
        calls.append(len(prompts))
        return [json.dumps({"reasoning": "", "answer": f"wrong {i}"}) for i in range(len(prompts))]

    out = tmp_path / "neg.jsonl"
    assert build_negatives(exs[:2], generate, out, num_negatives=2) == {"skipped": 0, "written": 2}
    with out.open("a") as fh:
        fh.write('{"id": "ex-2", "negat')  # an interrupted write: redone, never fatal
    assert build_negatives(exs, generate, out, num_negatives=2) == {"skipped": 2, "written": 1}
    assert calls == [2, 2, 2]
    cache = read_cache(out)
    assert set(cache) == {"ex-0", "ex-1", "ex-2"}
    assert [n["reference"] for n in cache["ex-0"]] == ["wrong 0", "wrong 1"]


def test_contrastive_without_any_negative_says_how_to_fix(tmp_path):
    from types import SimpleNamespace

    from unisd.errors import UsageError
    from unisd.reporting import Reporter

    run = SimpleNamespace(task=None, examples=examples(2), reporter=Reporter(),
                          config=SimpleNamespace(model="m", data="d.jsonl", task=None))
    with pytest.raises(UsageError, match="unisd cache negatives --model m --data d.jsonl"):
        Contrastive().setup(run)


def test_cache_negatives_command_then_train_with_it(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "plain.jsonl", toy_records(4))  # no negative_reference in meta
    out = tmp_path / "neg.jsonl"
    app = make_app(get_plugin_manager())
    runner = CliRunner()
    args = ["cache", "negatives", "--model", str(tiny_model_dir), "--data", str(data), "--limit", "3",
            "--num-negatives", "2", "--max-new-tokens", "4", "--output", str(out)]
    first = runner.invoke(app, args, catch_exceptions=False)
    assert first.exit_code == 0, first.output
    assert "3 example(s) written, 0 already done" in first.output
    again = runner.invoke(app, args, catch_exceptions=False)
    assert "0 example(s) written, 3 already done" in again.output
    assert len(read_cache(out)) == 3

    run_dir = tmp_path / "run"
    result = runner.invoke(app, [
        "train", "--model", str(tiny_model_dir), "--data", str(data), "--output", str(run_dir), "--steps", "1",
        "--batch-size", "4", "--grad-accum", "1", "--max-new-tokens", "4", "--with", "contrastive",
        "-o", f"contrastive.cache={out}",
    ], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "1 of 4 example(s) have no negative" in result.output  # toy-3 was beyond --limit
    record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert record["contrastive/missing_fraction"] == pytest.approx(0.25)


def test_cache_negatives_needs_a_source():
    result = CliRunner().invoke(make_app(get_plugin_manager()), ["cache", "negatives", "--model", "x"])
    assert result.exit_code == 2 and "exactly one of --task NAME or --data" in result.output
