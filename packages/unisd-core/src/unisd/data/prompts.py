"""The teacher prompt of the method, chat rendering, and token budgeting.

The teacher sees the student's problem plus a reference demonstration. When the rendered teacher
prompt is over its token budget, the *reference* is shortened, never the problem: a teacher that
lost the question scores the completion against nothing (a bug seen in peer trainers).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

SELF_DISTILLATION_INSTRUCTION = (
    "Carefully study the reference solution, then solve the problem below with your own approach."
)
DEMO_MARKER = "This is an example for a response to the question:"


def teacher_text(student_text: str, reference: str, instruction_suffix: str = "") -> str:
    """The method's generic teacher template around a problem and its reference demonstration."""
    return f"\n{student_text}\n\n{DEMO_MARKER}\n{reference}\n\n{SELF_DISTILLATION_INSTRUCTION}{instruction_suffix}\n"


def reference_with_reasoning(answer: str, reasoning: str | None) -> str:
    """``Reasoning: …⏎Answer: …⏎`` when a reasoning string exists, else the bare answer."""
    if reasoning and reasoning.strip():
        return f"Reasoning: {reasoning}\nAnswer: {answer}\n"
    return answer


def strip_fence(text: str) -> str:
    """The code inside the first fenced block of ``text``, or the stripped text when it holds none.

    An opening fence without its closing one (a generation cut short) is dropped too.
    """
    match = re.search(r"```[\w+-]*[ \t]*\n(.*?)```", text, flags=re.DOTALL)
    if match:
        return match.group(1).strip()
    stripped = text.strip()
    if stripped.startswith("```"):
        stripped = stripped.split("\n", 1)[1] if "\n" in stripped else ""
    return stripped.strip()


def fence_code(code: str) -> str:
    """``code`` in one ```python block; already-fenced code is unwrapped first, so it is never fenced twice."""
    return f"```python\n{strip_fence(code)}\n```"


def is_fenced(text: str) -> bool:
    """Whether ``text`` is one fenced block (the layout of a code task's reference)."""
    stripped = text.strip()
    return stripped.startswith("```") and stripped.endswith("```") and len(stripped) >= 6


def render_like(reference: str, answer: str, reasoning: str = "") -> str:
    """``answer`` laid out like ``reference``, so two demonstrations differ only in their content.

    A fenced reference gives fenced code, a ``Reasoning: …⏎Answer: …`` one that layout (with
    ``reasoning``), anything else the bare answer (e.g. a ``--data`` file's plain references).
    """
    if is_fenced(reference):
        return fence_code(answer)
    if reference.startswith("Reasoning:"):
        return reference_with_reasoning(answer.strip(), reasoning)
    return answer.strip()


def render_chat(tokenizer: Any, user_text: str, system: str | None = None) -> str:
    """Render one user turn (after a ``system`` turn, if given) with the tokenizer's chat template, ready
    for the assistant's reply. Without a template (``--allow-no-chat-template``): the plain texts."""
    if getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user_text}]
        # enable_thinking=False: Qwen3-style templates would otherwise open a reasoning block; templates
        # that do not know the variable ignore it. Training and evaluation render identically.
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                             enable_thinking=False)
    return f"{system}\n\n{user_text}" if system else user_text


def encode(tokenizer: Any, text: str) -> list[int]:
    # The chat template already holds the special tokens; adding BOS again would change the prompt.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


@dataclass
class BudgetedPrompt:
    ids: list[int]
    reference_truncated: bool
    over_budget: bool  # the prompt is over budget even with an empty reference


def budget_teacher_prompt(
    tokenizer: Any,
    build_text: Any,
    reference: str,
    max_tokens: int,
    system: str | None = None,
) -> BudgetedPrompt:
    """Tokenise ``build_text(reference)`` (rendered as a chat turn) within ``max_tokens``.

    ``build_text`` maps a reference string to the teacher's user text. If the whole prompt is too
    long, the reference's tail is cut (with a marker) until it fits; the problem text is kept whole.
    """
    def ids_with(ref: str) -> list[int]:
        return encode(tokenizer, render_chat(tokenizer, build_text(ref), system))

    ids = ids_with(reference)
    if len(ids) <= max_tokens:
        return BudgetedPrompt(ids, False, False)
    marker = " [...]"
    overhead = len(ids_with(marker))
    ref_ids = encode(tokenizer, reference)
    keep = max_tokens - overhead
    if keep <= 0:
        return BudgetedPrompt(ids_with(marker), True, True)
    # Re-tokenising at the cut can merge tokens differently, so shrink until it fits.
    while keep > 0:
        shortened = tokenizer.decode(ref_ids[:keep], skip_special_tokens=True) + marker
        ids = ids_with(shortened)
        if len(ids) <= max_tokens:
            return BudgetedPrompt(ids, True, False)
        keep -= max(1, len(ids) - max_tokens)
    return BudgetedPrompt(ids_with(marker), True, True)


class DemonstrationText(str):
    """A teacher context that holds a demonstration: the text ``build(demonstration)``.

    It is a plain string to everything that reads it, and tells the budgeting how to shorten it:
    cut the demonstration (a reference, few-shot donors, an induced instruction), never the problem
    (method §7.17). Components return it from ``teacher_contexts``.
    """

    build: Callable[[str], str]
    demonstration: str

    def __new__(cls, build: Callable[[str], str], demonstration: str) -> DemonstrationText:
        text = super().__new__(cls, build(demonstration))
        text.build, text.demonstration = build, demonstration
        return text


def fit_context(tokenizer: Any, text: str, max_tokens: int, system: str | None = None) -> list[int]:
    """A component's teacher context within ``max_tokens`` tokens (chat-rendered).

    A :class:`DemonstrationText` goes through :func:`budget_teacher_prompt`, like the main teacher
    prompt: its demonstration is shortened and the problem kept whole. Any other text has no known
    structure and loses its beginning (:func:`fit_from_front`).
    """
    if isinstance(text, DemonstrationText):
        return budget_teacher_prompt(tokenizer, text.build, text.demonstration, max_tokens, system).ids
    return fit_from_front(tokenizer, text, max_tokens, system)


def fit_from_front(tokenizer: Any, user_text: str, max_tokens: int, system: str | None = None) -> list[int]:
    """Drop the beginning of ``user_text`` until its chat rendering fits ``max_tokens`` (binary search)."""
    lo, hi = 0, len(user_text)  # characters to drop
    best = encode(tokenizer, render_chat(tokenizer, "", system))
    while lo <= hi:
        mid = (lo + hi) // 2
        ids = encode(tokenizer, render_chat(tokenizer, "[...] " + user_text[mid:], system))
        if len(ids) <= max_tokens:
            best, hi = ids, mid - 1
        else:
            lo = mid + 1
    return best
