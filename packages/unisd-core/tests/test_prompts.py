"""Reference layout helpers and the budgeting of component contexts (unisd.data.prompts)."""

from __future__ import annotations

from unisd.data.prompts import (
    DemonstrationText,
    fence_code,
    fit_context,
    is_fenced,
    render_like,
    strip_fence,
    teacher_text,
)
from unisd.testing import make_tokenizer


def test_code_is_fenced_exactly_once():
    code = "def f():\n    return 1"
    for text in (code, f"```python\n{code}\n```", f"```py\n{code}\n```  trailing words", f"```python\n{code}"):
        assert strip_fence(text) == code
        assert fence_code(text) == f"```python\n{code}\n```"
    assert is_fenced(fence_code(code)) and not is_fenced(code) and not is_fenced("```")


def test_render_like_copies_the_layout_of_the_reference():
    assert render_like("```python\ndef f(): pass\n```", "def g(): pass", "why") == "```python\ndef g(): pass\n```"
    assert render_like("Reasoning: r\nAnswer: B\n", "C", "because") == "Reasoning: because\nAnswer: C\n"
    assert render_like("Reasoning: r\nAnswer: B\n", "C") == "C"
    assert render_like("46", " 47 ", "carry") == "47"


def test_fit_context_shortens_the_demonstration_never_the_problem():
    tok = make_tokenizer()
    problem = "Problem: what is 12 + 34? Reply with only the number."
    text = DemonstrationText(lambda demo: teacher_text(problem, demo), "a long wrong demonstration " * 100)
    assert text == teacher_text(problem, text.demonstration) and isinstance(text, str)
    budget = len(tok(teacher_text(problem, "x"), add_special_tokens=False)["input_ids"]) + 40
    kept = tok.decode(fit_context(tok, text, budget))
    assert problem in kept and "a long wrong demonstration" in kept and "[...]" in kept
    plain = tok.decode(fit_context(tok, str(text), budget))  # no structure known: the beginning goes
    assert problem not in plain
