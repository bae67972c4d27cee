"""The teacher prompt of the method, chat rendering, and token budgeting.

The teacher sees the student's problem plus a reference demonstration. When the rendered teacher
prompt is over its token budget, the *reference* is shortened, never the problem: a teacher that
lost the question scores the completion against nothing (a bug seen in peer trainers).
"""

from __future__ import annotations

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


def render_chat(tokenizer: Any, user_text: str) -> str:
    """Render one user turn with the tokenizer's chat template, ready for the assistant's reply."""
    if getattr(tokenizer, "chat_template", None):
        # enable_thinking=False: Qwen3-style templates would otherwise open a reasoning block; templates
        # that do not know the variable ignore it. Training and evaluation render identically.
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": user_text}], tokenize=False, add_generation_prompt=True,
            enable_thinking=False,
        )
    return user_text


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
) -> BudgetedPrompt:
    """Tokenise ``build_text(reference)`` (rendered as a chat turn) within ``max_tokens``.

    ``build_text`` maps a reference string to the teacher's user text. If the whole prompt is too
    long, the reference's tail is cut (with a marker) until it fits; the problem text is kept whole.
    """
    ids = encode(tokenizer, render_chat(tokenizer, build_text(reference)))
    if len(ids) <= max_tokens:
        return BudgetedPrompt(ids, False, False)
    marker = " [...]"
    overhead = len(encode(tokenizer, render_chat(tokenizer, build_text(marker))))
    ref_ids = encode(tokenizer, reference)
    keep = max_tokens - overhead
    if keep <= 0:
        return BudgetedPrompt(encode(tokenizer, render_chat(tokenizer, build_text(marker))), True, True)
    # Re-tokenising at the cut can merge tokens differently, so shrink until it fits.
    while keep > 0:
        shortened = tokenizer.decode(ref_ids[:keep], skip_special_tokens=True) + marker
        ids = encode(tokenizer, render_chat(tokenizer, build_text(shortened)))
        if len(ids) <= max_tokens:
            return BudgetedPrompt(ids, True, False)
        keep -= max(1, len(ids) - max_tokens)
    return BudgetedPrompt(encode(tokenizer, render_chat(tokenizer, build_text(marker))), True, True)


def fit_from_front(tokenizer: Any, user_text: str, max_tokens: int) -> list[int]:
    """Drop the beginning of ``user_text`` until its chat rendering fits ``max_tokens`` (binary search)."""
    lo, hi = 0, len(user_text)  # characters to drop
    best = encode(tokenizer, render_chat(tokenizer, ""))
    while lo <= hi:
        mid = (lo + hi) // 2
        ids = encode(tokenizer, render_chat(tokenizer, "[...] " + user_text[mid:]))
        if len(ids) <= max_tokens:
            best, hi = ids, mid - 1
        else:
            lo = mid + 1
    return best
