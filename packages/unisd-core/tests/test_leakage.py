"""The leakage metric: teacher-only text in completions (template phrases, copied reference spans)."""

import pytest

from unisd.data.demo import DemoTask
from unisd.data.prompts import DEMO_MARKER, SELF_DISTILLATION_INSTRUCTION, teacher_text
from unisd.data.tasks import Example, Task
from unisd.errors import ConfigError
from unisd.evaluation.leakage import (
    detect_leak,
    leakage_flags,
    leakage_rate,
    overrun_flags,
    overruns,
    reference_end_offset,
    share,
    template_fragments,
    token_range,
)
from unisd.testing import make_tokenizer

UPPER = Example("u1", "Rewrite 'cloud table' in capital letters. Reply with only the rewritten words.", "CLOUD TABLE")
REASONED = Example(
    "g1", "Tom has 3 apples and buys 4 more. How many apples does he have?",
    "Reasoning: he starts with three apples and then buys four more apples at the shop\nAnswer: 7\n",
)


def test_fragments_come_from_the_template_itself():
    assert template_fragments(None, UPPER) == (DEMO_MARKER, SELF_DISTILLATION_INSTRUCTION)

    class Suffixed(Task):
        def teacher_text(self, example):
            return teacher_text(example.prompt, example.reference, " Include your thought process.")

    assert template_fragments(Suffixed(), UPPER)[-1] == SELF_DISTILLATION_INSTRUCTION + " Include your thought process."


@pytest.mark.parametrize("completion, reason", [
    ("This is an example for a response to the question:\nCLOUD TABLE", "template: 'This is an example for a response to the question'"),
    ("CLOUD TABLE\n\nThis is an example for a", "template: 'This is an example for a'"),  # cut at max_new_tokens
    ("CLOUD TABLE\n\nthis is an example", "template: 'this is an example'"),  # the shortest prefix that counts
    ("Sure. Carefully study the reference solution", "template: 'Carefully study the reference solution'"),
    ("an example for a response to the question", "template: 'an example for a response to'"),  # mid-phrase: a 6-gram
])
def test_template_phrases_and_their_prefixes_leak(completion, reason):
    leak = detect_leak(completion, UPPER)
    assert leak.leaked and leak.reason == reason
    start, end = leak.spans[0]
    assert completion[start:end].lower().startswith(reason.split("'")[1].lower()[:10])


@pytest.mark.parametrize("completion", [
    "CLOUD TABLE", "'CLOUD TABLE.'", "CLOUD TABLE\n\nThis is an", "Here is an example of capital letters: CLOUD TABLE",
    "7", "",
])
def test_clean_answers_do_not_leak(completion):
    assert detect_leak(completion, UPPER) == detect_leak(completion, REASONED) == detect_leak("", UPPER)
    assert not detect_leak(completion, UPPER).leaked


def test_a_copied_reference_span_leaks_and_a_short_one_does_not():
    copied = "He starts with three apples and then buys four more, so 7."
    leak = detect_leak(copied, REASONED)
    assert leak.leaked and leak.reason == "reference: 'He starts with three apples and'"
    assert copied[slice(*leak.spans[0])] == "He starts with three apples and then buys four more"  # windows merged
    assert not detect_leak("He starts with three apples, buys four: 7", REASONED).leaked  # 5 words in a row
    assert detect_leak("buys four more apples at the shop", REASONED, ngram=6).leaked
    assert not detect_leak("buys four more apples at the shop", REASONED, ngram=8).leaked


def test_words_the_student_prompt_also_holds_are_not_leaked():
    # The reference restates the question: copying that part is copying the student's own prompt.
    ex = Example("r1", "Tom has 3 apples and buys 4 more. How many apples does he have?",
                 "Tom has 3 apples and buys 4 more, so he has 7 apples.")
    assert not detect_leak("Tom has 3 apples and buys 4 more. He has 7.", ex).leaked
    assert detect_leak("Tom has 3 apples and buys 4 more, so he has 7 apples.", ex).leaked  # past the prompt's words
    # A prompt that itself quotes the template's words: repeating them is not a leak either.
    quoting = Example("q1", "Complete: 'This is an example for a response to the question:'", "x")
    assert not detect_leak("This is an example for a response to the question:", quoting).leaked


def test_demonstrations_count_and_the_aggregate_is_a_share():
    demo = "the quick brown fox jumps over the lazy dog"
    assert detect_leak("a quick brown fox jumps over the lazy dog", UPPER, extra_teacher_texts=[demo]).reason.startswith(
        "demonstration:")
    leaks = leakage_flags([UPPER] * 4, ["CLOUD TABLE", "CLOUD TABLE\n\nThis is an example for a", "x", "y"], DemoTask())
    assert [leak.leaked for leak in leaks] == [False, True, False, False]
    assert leakage_rate(leaks) == 0.25 and leakage_rate([]) == 0.0
    with pytest.raises(ConfigError):
        detect_leak("x", UPPER, ngram=0)


def test_token_range_maps_characters_to_tokens():
    tok = make_tokenizer()
    text = "CLOUD TABLE\n\nThis is an example for a"
    ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]

    def decode(t):
        return tok.decode(ids[:t], skip_special_tokens=True)

    assert decode(len(ids)) == text
    span = detect_leak(text, UPPER).spans[0]
    tokens = token_range(decode, len(ids), *span)
    covered = tok.decode([ids[t] for t in tokens])
    assert "This is an example for a" in covered and "TABLE" not in covered
    assert tokens.stop == len(ids) - 1  # the EOS after the text is not part of the span
    assert list(token_range(decode, len(ids), 0, 1)) == [0]


@pytest.mark.parametrize(("completion", "reference", "expected"), [
    ("CLOUD TABLE\n\nThis is a classic example of a mathematical problem", "CLOUD TABLE", True),  # a paraphrase
    ("CLOUD TABLE", "CLOUD TABLE", False),
    ("CLOUD TABLE.\n", "CLOUD TABLE", True),  # anything but whitespace after the answer counts
    ("CLOUD TABLE \n\n", "CLOUD TABLE", False),
    ("CALLOON TABLE\n\nThis is a classic example", "CLOUD TABLE", False),  # never finished the reference
    ("20 + 56 = 176, so", "76", False),  # "76" inside a word is not the reference's ending
    ("20 + 56 = 76, so", "76", True),
    ("anything at all", "", False),
])
def test_overrun_is_text_after_a_reproduced_reference(completion, reference, expected):
    assert overruns(completion, reference) is expected


def test_reference_end_offset_and_the_overrun_share():
    code = "```python\ndef add(a, b):\n    return a + b\n```"
    assert reference_end_offset("Here it is:\n" + code + "\nDone.", code) == len("Here it is:\n" + code)
    assert reference_end_offset(code[:-3], code) is None  # the closing fence is part of the ending
    examples = [Example("a", "q", "CLOUD TABLE"), Example("b", "q", "46")]
    assert overrun_flags(examples, ["CLOUD TABLE\n\nThis is", "46"]) == [True, False]
    assert share(overrun_flags(examples, ["CLOUD TABLE\n\nThis is", "46"])) == 0.5
    assert share(overrun_flags([], [])) == 0.0
