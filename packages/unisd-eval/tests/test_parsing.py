"""Answer extraction: code blocks, option letters (§7.26 fixes), GSM8K numbers, ReAct calls."""

from __future__ import annotations

import pytest

from unisd_eval.parsing.code import extract_code
from unisd_eval.parsing.letters import extract_letter, letter_list
from unisd_eval.parsing.numbers import extract_number, normalize_number, numbers_match, split_gold
from unisd_eval.parsing.react import parse_calls, score_calls


def test_code_extraction_order():
    assert extract_code('{"code": "x = 1"}') == ("x = 1", "json")
    text = "Here:\n```js\nvar a;\n```\n```python\ndef f():\n    return 1\n```\n"
    assert extract_code(text) == ("def f():\n    return 1", "python")
    assert extract_code("```\ndef g(): pass\n```") == ("def g(): pass", "fenced")
    assert extract_code("  def h(): pass  ") == ("def h(): pass", "raw")
    assert extract_code("```python\ndef cut():\n    return")[1] == "python"  # truncated generation


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Reasoning: x.\nAnswer: B", "B"),
        ("Answer: A\nWait, that is wrong.\nAnswer: C", "C"),  # the last answer line wins (§7.26)
        ("Reasoning: A photon is emitted.\nAnswer: D.", "D"),
        ("**Answer:** (b)", None),  # lowercase is not an option letter
        ("**Answer:** (B)", "B"),
        ("Answer: <C>", "C"),
        ("The correct answer is D because ...", "D"),
        ("A photon is emitted when an electron drops a level.", None),  # no stray-article answer
        ("Answer: A photon", None),
        ("Answer: A because the field is uniform.", "A"),
        ("Answer: B because it is", "B"),
        ("Answer: Apples", None),
        ("I think it is B.\nB", "B"),
        ("Answer: E", None),  # not among 4 options
        ("", None),
        ('{"answer": "C", "reasoning": "r"}', "C"),
    ],
)
def test_letter_extraction(text, expected):
    assert extract_letter(text, 4) == expected


def test_letter_list_phrasing():
    assert letter_list(2) == "A or B"
    assert letter_list(3) == "A, B, or C"
    assert letter_list(5) == "A, B, C, D, or E"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2 + 3 = 5\n#### 1,234", "1234"),
        ("#### 12 apples, not 13", "12"),
        ("So the answer is $5.50.", "5.5"),
        ("Final answer: -3", "-3"),
        ("We get 7 then 8.0", "8"),
        ("answer: 50%", "50"),
        ("no digits here", None),
    ],
)
def test_gsm8k_number_extraction(text, expected):
    raw = extract_number(text)
    assert (normalize_number(raw) if raw is not None else None) == expected


def test_gsm8k_matching_and_gold_split():
    assert numbers_match("3", "3") and numbers_match("0.33333", "0.333333") and not numbers_match("3", "4")
    assert not numbers_match(None, "3")
    assert split_gold("a\nb\n#### $1,000") == ("a\nb", "1000")


def test_react_parsing_and_scores():
    text = (
        "Thought: I need the weather.\nAction: getWeather\nAction Input: {\"city\": \"Paris\", \"unit\": \"C\"}\n"
        "Observation: sunny\nThought: now the forecast\nAction 2: getForecast\nAction 2 Input: {\"days\": 3}\n"
    )
    calls = parse_calls(text)
    assert [c["Action"] for c in calls] == ["getWeather", "getForecast"]
    gold = [{"Action": "getWeather", "Action_Input": '{"city": "Paris", "unit": "C"}'},
            {"Action": "getForecast", "Action_Input": {"days": "3"}}]
    assert score_calls(calls, gold) == {"action_correct": 1.0, "argument_accuracy": 1.0, "full_match": 1.0}
    half = parse_calls('Action: getWeather\nAction Input: {"city": "Rome", "unit": "C"}')
    assert score_calls(half, gold[:1])["argument_accuracy"] == 0.5
    assert score_calls(half, gold)["argument_accuracy"] == 0.0  # counts differ
    assert score_calls([], [])["full_match"] == 1.0
    assert parse_calls("I don't know.") == []
    empty_gold = [{"Action": "ping", "Action_Input": "{}"}]
    assert score_calls([{"Action": "ping", "Action_Input": ""}], empty_gold)["full_match"] == 1.0
    assert score_calls([{"Action": "ping", "Action_Input": '{"x": 1}'}], empty_gold)["argument_accuracy"] == 0.0
