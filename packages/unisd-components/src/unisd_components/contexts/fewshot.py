"""The text of an auxiliary context: the method's few-shot headers, reference blocks and separators.

Three families follow the method's wording (code, mcqa, tooluse); ``generic`` (any ``--data`` file)
uses the same layout with task-neutral wording. Deviations from the research code, on purpose:
tool-use donor responses are joined by newlines (not spaces), every variant ends with the *student*
text (never the teacher prompt, which holds the gold answer), and the induction context no longer
asks the model to "study the reference solution" it does not contain (unisd-method.md §7.8, §7.9).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from unisd.data.prompts import DemonstrationText, fence_code, strip_fence
from unisd.data.tasks import Example

_REF_HEADER = "## Reference Samples (DO NOT SOLVE THESE)\n"
_NO_MENTION = "Do NOT mention these examples in your final answer."
_TASK_HEAD = "\n-----\n## Task to Solve (ONLY ANSWER THIS TASK)\nNow solve ONLY the following task."

HEADERS = {
    "code": (
        _REF_HEADER
        + "The following are solved examples from OTHER tasks, provided only as reference.\n"
        + "They are NOT the task you should solve now.\n"
        + f"Do NOT copy their function names. {_NO_MENTION}\n\n"
    ),
    "mcqa": (
        _REF_HEADER
        + "The following are solved examples from OTHER questions, provided only as reference.\n"
        + f"Do NOT copy their answers. {_NO_MENTION}\n\n"
    ),
    "tooluse": (
        _REF_HEADER
        + "The following are solved examples from OTHER tasks, provided only as reference.\n"
        + f"Do NOT copy their tool names or actions. {_NO_MENTION}\n-----\n"
    ),
    "generic": (
        _REF_HEADER
        + "The following are solved examples from OTHER tasks, provided only as reference.\n"
        + f"Do NOT copy their answers. {_NO_MENTION}\n\n"
    ),
}
SEPARATORS = {
    "code": _TASK_HEAD + " Output ONLY the final code for THIS task.\n\n",
    "mcqa": _TASK_HEAD + " Output ONLY the answer for THIS task.\n\n",
    "tooluse": _TASK_HEAD + "\n\n",
    "generic": _TASK_HEAD + "\n\n",
}
FAMILIES = tuple(HEADERS)

INDUCTION_HEADER = "## General Instruction for Your Answer\n"
# The method's suffix asks to study a reference the induction context does not hold (§7.9).
INDUCTION_SUFFIX = "Follow the general instruction above, then solve the problem below with your own approach."


def family_of(example: Example, task: Any = None) -> str:
    """The few-shot family of an example: ``meta["family"]``, else the task's ``family``, else guessed."""
    fam = example.meta.get("family") or getattr(task, "family", None)
    if fam in FAMILIES:
        return fam
    meta = example.meta
    if "test_list" in meta or "entry_point" in meta:
        return "code"
    if "correct_letter" in meta:
        return "mcqa"
    if "golden_answer" in meta or "golden_response" in meta or "gold_calls" in meta:
        return "tooluse"
    return "generic"


def bare_code(example: Example) -> str:
    """A code example's solution without its fence: ``meta["code"]``, else the unwrapped reference."""
    return example.meta.get("code") or strip_fence(example.reference)


def mcqa_parts(example: Example) -> tuple[str, str, str, str] | None:
    """``(question, "A) …⏎B) …", letter, explanation)`` from an MCQA example's meta, or None when its
    meta lacks the question text or options (then the whole student prompt stands in)."""
    meta = example.meta
    question, options, letter = meta.get("question_text"), meta.get("options"), meta.get("correct_letter")
    if not question or not isinstance(options, list | tuple) or not options or not letter:
        return None
    lines = "\n".join(f"{chr(ord('A') + i)}) {opt}" for i, opt in enumerate(options))
    return str(question), lines, str(letter), str(meta.get("explanation") or "").strip()


def _mcqa_block(tag: str, donor: Example) -> str:
    """The method's block: question, ``A) …`` options, ``Answer: L.`` and the explanation when there is one."""
    parts = mcqa_parts(donor)
    if parts is None:
        question = donor.meta.get("question_text", donor.prompt)
        return f"{tag}Reference Question:\n{question}\n\nReference Answer:\n{donor.reference.strip()}\n"
    question, options, letter, explanation = parts
    answer = f"Answer: {letter}." + (f"\nExplanation: {explanation}" if explanation else "")
    return f"{tag}Reference Question:\n{question}\n\n{options}\n\nReference Answer:\n{answer}\n"


def _reference_block(i: int, donor: Example, family: str) -> str:
    """One donor's demonstration, numbered from 1."""
    tag = f"### [REFERENCE ONLY #{i}]\n"
    if family == "code":
        tests = donor.meta.get("test_list") or []
        tests_text = "\n".join(tests) if isinstance(tests, list) else str(tests)
        return (
            f"\n{tag}Reference Task\n{donor.prompt}\n\nReference Test Cases\n{tests_text}\n\n"
            f"Reference Solution:\n{fence_code(bare_code(donor))}\n"
        )
    if family == "tooluse":
        question = donor.meta.get("instruction", donor.prompt)
        response = donor.meta.get("golden_response")
        response = "\n".join(response) if isinstance(response, list) else donor.reference
        return f"{tag}#### Reference Question\n{question}\n\n#### Reference Response\n{response.strip()}\n"
    if family == "mcqa":
        return _mcqa_block(tag, donor)
    question = donor.meta.get("question_text", donor.prompt)
    return f"{tag}Reference Question:\n{question}\n\nReference Answer:\n{donor.reference.strip()}\n"


def fewshot_context(example: Example, donors: Sequence[Example], family: str) -> DemonstrationText:
    """Header, one block per donor, separator, then the example's *student* text (no reference of its own).

    The donor blocks are the demonstration: an over-long context is shortened there, never in the
    student text (method §7.17).
    """
    if any(d.id == example.id for d in donors):
        raise ValueError(f"example {example.id!r} cannot be its own few-shot donor")
    joiner = "\n" if family == "code" else ""
    blocks = joiner.join(_reference_block(i + 1, d, family) for i, d in enumerate(donors))
    head, tail = HEADERS[family], SEPARATORS[family] + example.prompt
    return DemonstrationText(lambda demo: head + demo + tail, blocks)


def induction_context(example: Example, instruction: str) -> DemonstrationText:
    """The induced-instruction context around the example's student text (the instruction is what
    budgeting may shorten)."""
    prompt = example.prompt
    return DemonstrationText(lambda text: f"{INDUCTION_HEADER}{text}\n\n{prompt}\n\n{INDUCTION_SUFFIX}",
                             instruction.strip())
