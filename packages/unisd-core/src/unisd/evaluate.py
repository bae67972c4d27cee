"""Greedy evaluation of the student, and of the teacher with the reference in its prompt.

The difference between the two accuracies is the *privileged gap*: the headroom self-distillation can
close. Used before/after training, by ``--eval-task``, and by ``unisd eval``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .prompts import encode, render_chat
from .rollout import HFBackend, SamplingParams
from .tasks import Example, Score, Task


@dataclass
class EvalResult:
    metrics: dict[str, float]
    completions: list[str] = field(default_factory=list)
    scores: list[Score] = field(default_factory=list)


def generate_texts(model: Any, tokenizer: Any, user_texts: list[str], max_new_tokens: int, batch_size: int = 16) -> list[str]:
    prompts = [encode(tokenizer, render_chat(tokenizer, t)) for t in user_texts]
    backend = HFBackend(model, tokenizer, batch_size=batch_size)
    completions = backend.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens))
    return [tokenizer.decode(c.ids, skip_special_tokens=True) for c in completions]


def evaluate(
    model: Any,
    tokenizer: Any,
    task: Task,
    examples: list[Example],
    max_new_tokens: int,
    with_reference: bool = False,
) -> EvalResult:
    """Greedy-decode every example (as the student, or as the teacher given the reference) and score it."""
    texts = [task.teacher_text(ex) if with_reference else ex.prompt for ex in examples]
    completions = generate_texts(model, tokenizer, texts, max_new_tokens)
    scores = task.score_batch(examples, completions)
    return EvalResult(task.aggregate(scores), completions, scores)
