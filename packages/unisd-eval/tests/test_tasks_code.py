"""MBPP and HumanEval: loading in the hub layout, prompts, references, sandboxed scoring."""

from __future__ import annotations

import pytest
from eval_fixtures import HUMANEVAL

from unisd.errors import DataError, UsageError
from unisd_eval.tasks import HumanEvalTask, MBPPFullTask, MBPPTask
from unisd_eval.tasks.mbpp import asserted_name, fix_function_name, signature

MBPP_PROMPT_0 = (
    "Write a function to find the shared elements from the given two lists.\n"
    "The required function signature is: shared_elements(test_tup1, test_tup2)\n\n"
    "## Note\n"
    "- Write only the function implementation. Do not include any extra texts, explanations, test code, or examples.\n"
    "- Only return the code within a ```python ... ``` block.\n"
    "- Make sure the function name is correct as per the assertions.\n"
    "- Include necessary imports.\n\n"
    "## Answer Format\n```python\ndef shared_elements(test_tup1, test_tup2):\n    ...\n```\n\n"
    "## Test Cases\n"
    "assert set(shared_elements((3, 4, 5, 6),(5, 7, 4, 10))) == set((4, 5))\n"
    "assert set(shared_elements((1, 2, 3, 4),(5, 4, 3, 7))) == set((3, 4))\n"
)


def test_mbpp_name_helpers():
    assert asserted_name(["assert set(f1(x)) == 1"]) == "f1"
    assert asserted_name(["assert math.isclose(area(2), 12.56)"]) == "area"
    assert signature("def g(a, b=1, *c, d, **e):\n  pass") == "g(a, b, *c, d, **e)"
    code, name = fix_function_name("def helper(x):\n  return x\ndef main(x):\n  return helper(x)", ["assert main(1) == 1"])
    assert name == "main" and code.startswith("def helper")  # a helper before the tested function is kept


def test_mbpp_load_prompt_reference_and_meta(data_files):
    examples = MBPPTask().load("test", path=str(data_files["mbpp"]))
    assert [ex.id for ex in examples] == ["2", "3"]
    assert examples[0].prompt == MBPP_PROMPT_0
    assert examples[0].reference.startswith("```python\ndef shared_elements(test_tup1, test_tup2):")
    assert examples[1].meta["test_setup"] == "import math"
    assert MBPPTask().load("test", path=str(data_files["mbpp"]), limit=1)[0].id == "2"


def test_mbpp_renders_every_reference_one_way(data_files):
    task = MBPPTask()
    ex = task.load("test", path=str(data_files["mbpp"]))[0]
    code = ex.meta["code"]
    assert not code.startswith("```") and ex.reference == f"```python\n{code}\n```"
    # A model's answer, fenced or not, comes out exactly like the gold reference: fenced once.
    for answer in ("def f():\n    return 2", "```python\ndef f():\n    return 2\n```", "```\ndef f():\n    return 2```"):
        assert task.render_reference(ex, answer, "some reasoning") == "```python\ndef f():\n    return 2\n```"


def test_mbpp_references_pass_and_wrong_answers_fail(data_files, quick_sandbox):
    task = MBPPTask(quick_sandbox)
    examples = task.load("test", path=str(data_files["mbpp"]))
    scores = task.score_batch(examples, [ex.reference for ex in examples])
    assert [s.verdict for s in scores] == ["passed", "passed"]
    assert task.aggregate(scores)["pass@1"] == 1.0 and task.aggregate(scores)["extraction_rate"] == 1.0
    wrong = ["```python\ndef shared_elements(a, b):\n    return ()\n```", "```python\ndef is_not_prime(n):\n    return False\n```"]
    scores = task.score_batch(examples, wrong)
    assert [s.value for s in scores] == [0.0, 0.0] and all(s.verdict == "failed" for s in scores)
    garbage = task.score(examples[0], "I am sorry, I cannot help with that.")
    assert garbage.value == 0.0 and garbage.extracted is None and garbage.verdict == "failed"
    assert "SyntaxError" in garbage.error


def test_mbpp_full_layout_uses_text_and_setup(data_files, quick_sandbox):
    task = MBPPFullTask(quick_sandbox)
    [ex] = task.load("train", path=str(data_files["mbpp-full"]))
    assert ex.id == "11" and ex.prompt.startswith("Write a python function to remove first and last occurrence")
    assert "\r" not in ex.reference
    assert task.score(ex, ex.reference).verdict == "passed"


def test_mbpp_bad_split_and_missing_fields(tmp_path):
    with pytest.raises(UsageError, match="splits"):
        MBPPTask().load("dev", path="x.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"task_id": 1, "prompt": "p"}\n')
    with pytest.raises(DataError, match="code, test_list"):
        MBPPTask().load("test", path=str(bad))


def test_humaneval_fixture_and_scoring(data_files, quick_sandbox):
    task = HumanEvalTask(quick_sandbox)
    examples = task.load("test", path=str(data_files["humaneval"]))
    assert [ex.id for ex in examples] == ["HumanEval/0", "HumanEval/1"]
    assert examples[0].prompt.startswith(HUMANEVAL[0]["prompt"] + "\n\n## Note\n1. Return the COMPLETE function")
    assert examples[0].prompt.endswith("5. Ensure the function name and parameters match the provided signature exactly.\n")
    assert task.train_split is None
    scores = task.score_batch(examples, [ex.reference for ex in examples])
    assert [s.verdict for s in scores] == ["passed", "passed"]
    # The completion must hold the whole function: the body alone is not prepended with the prompt.
    assert task.score(examples[0], HUMANEVAL[0]["canonical_solution"]).value == 0.0
    cheat = "```python\ndef add(a, b):\n    import sys\n    sys.exit(0)\nadd(1, 2)\n```"
    assert task.score(examples[0], cheat).verdict == "failed"


def test_humaneval_offline_from_pypi_copy():
    examples = HumanEvalTask().load("test")
    assert len(examples) == 164
    assert examples[0].id == "HumanEval/0" and examples[-1].id == "HumanEval/163"


def test_code_pass_at_k_over_samples(data_files, quick_sandbox):
    task = MBPPTask(quick_sandbox)
    ex = task.load("test", path=str(data_files["mbpp"]), limit=1)[0]
    wrong = "```python\ndef shared_elements(a, b):\n    return ()\n```"
    completions = [ex.reference, wrong, wrong, ex.reference, wrong]  # n = 5, c = 2
    scores = task.score_batch([ex] * 5, completions)
    metrics = task.summarize([ex] * 5, scores)
    assert metrics["pass@1"] == pytest.approx(0.4)
    assert metrics["pass@2"] == pytest.approx(0.7)
    assert metrics["pass@5"] == pytest.approx(1.0)


