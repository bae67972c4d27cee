"""The built-in demo task: its splits, and first-line against strict scoring."""

import pytest

from unisd.data.demo import FIRST_TEST, DemoTask

TASK = DemoTask()
EX = TASK.load("test")[0]  # Rewrite 'cloud table' in capital letters -> CLOUD TABLE


def test_held_out_split_is_large_disjoint_and_keeps_its_first_items():
    train, test = TASK.load("train"), TASK.load("test")
    assert len(train) == 384 and len(test) == 384 and len({e.prompt for e in test}) == 384
    assert not {e.prompt for e in train} & {e.prompt for e in test}
    # The original 48 held-out items (what earlier demo numbers were measured on) are still first.
    assert FIRST_TEST == 48 and TASK.load("test", limit=48) == test[:48]
    assert EX.prompt == "Rewrite 'cloud table' in capital letters. Reply with only the rewritten words."
    assert test[47].prompt == "What is 53 + 11? Reply with only the number."
    assert train[0].prompt == "Rewrite 'garden basket' in capital letters. Reply with only the rewritten words."


@pytest.mark.parametrize("completion, first_line, strict", [
    ("CLOUD TABLE", True, True),
    ("  'CLOUD TABLE.'\n", True, True),
    ("**CLOUD TABLE**!", True, True),
    ("CLOUD TABLE\n\nThis is an example for a", True, False),  # the leak seen after training
    ("CLOUD TABLE\nBecause you asked.", True, False),
    ("This is an example for a response to the question:\nCLOUD TABLE", False, False),
    ("cloud table", False, False),
    ("   \n", False, False),
])
def test_strict_accuracy_counts_only_the_bare_answer(completion, first_line, strict):
    score = TASK.score(EX, completion)
    assert score.value == float(first_line) and score.strict is strict


def test_aggregate_reports_both_accuracies():
    completions = ["CLOUD TABLE", "CLOUD TABLE\n\nThis is an example for a", "nope", "CLOUD TABLE."]
    metrics = TASK.aggregate([TASK.score(EX, c) for c in completions])
    assert metrics["accuracy"] == 0.75 and metrics["strict_accuracy"] == 0.5
    assert TASK.aggregate([]) == {"accuracy": 0.0, "extraction_rate": 0.0, "strict_accuracy": 0.0}
