"""Greedy evaluation of the student, and of the teacher with the reference in its prompt.

The difference between the two accuracies is the *privileged gap*: the headroom self-distillation can
close. Used before/after training, by ``--eval-task``, and by ``unisd eval``. Besides the task's own
metrics, every result has ``leakage``: the share of completions holding teacher-only text
(:mod:`unisd.evaluation.leakage`), which a student trained toward a teacher that saw the reference can learn to copy,
and ``overrun``: the share that reproduce the reference's ending and then go on writing (a copied template
or a paraphrase of it after a finished answer).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import EVAL_BATCH_SIZE
from ..data.datafiles import with_system_prompt
from ..data.prompts import encode, render_chat
from ..data.tasks import Example, Score, Task
from ..io import atomic
from ..model.rollout import HFBackend, SamplingParams
from ..parallel import distributed
from .base_cache import base_weights_key, cached_completions, student_is_base, teacher_is_base
from .leakage import Leak, leakage_flags, leakage_rate, overrun_flags, share

if TYPE_CHECKING:
    from ..run import Run


@dataclass
class EvalResult:
    metrics: dict[str, float]
    completions: list[str] = field(default_factory=list)
    scores: list[Score] = field(default_factory=list)
    leaks: list[Leak] = field(default_factory=list)  # per completion: the leakage verdict
    overruns: list[bool] = field(default_factory=list)  # per completion: goes on after a finished answer


def generate_texts(model: Any, tokenizer: Any, user_texts: list[str], max_new_tokens: int,
                   batch_size: int = EVAL_BATCH_SIZE, systems: list[str | None] | None = None, temperature: float = 0.0,
                   progress: Callable[[int], None] | None = None, merge_adapter: str = "auto") -> list[str]:
    """One completion per user text (chat-rendered, after its system text if any), decoded: greedy, or
    sampled at ``temperature``. ``progress(n)`` is called after each batch of ``n`` texts.
    ``merge_adapter``: a run's ``merge_adapter_for_generation`` (``HFBackend``).

    The one "prompts in, texts out" path of evaluation, ``unisd eval`` and the contexts components build.
    """
    systems = systems or [None] * len(user_texts)
    backend = HFBackend(model, tokenizer, batch_size=batch_size, merge_adapter=merge_adapter)
    params = SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens)
    out: list[str] = []
    for start in range(0, len(user_texts), batch_size):
        chunk = zip(user_texts[start:start + batch_size], systems[start:start + batch_size], strict=True)
        prompts = [encode(tokenizer, render_chat(tokenizer, text, system)) for text, system in chunk]
        out += [tokenizer.decode(c.ids, skip_special_tokens=True) for c in backend.generate(prompts, params)]
        if progress is not None:
            progress(len(prompts))
    return out


def evaluate(
    model: Any,
    tokenizer: Any,
    task: Task,
    examples: list[Example],
    max_new_tokens: int,
    with_reference: bool = False,
    split_over_processes: bool = False,
    weights: str | None = None,
    merge_adapter: str = "auto",
) -> EvalResult:
    """Greedy-decode every example (as the student, or as the teacher given the reference) and score it.

    ``split_over_processes`` (collective: every training process calls it): each process decodes and
    scores a contiguous share and every process gets the whole result, in the examples' order. Shares
    are padded to equal length (the padding's results are dropped) because a sharded model's processes
    must make the same number of ``generate`` calls.

    ``weights``: where the model holds the base weights, their key (:mod:`unisd.evaluation.base_cache`):
    the completions are then read from, or kept in, the cache of the base model's completions.
    ``merge_adapter``: a run's ``merge_adapter_for_generation`` (``HFBackend``).
    """
    env = distributed.current()
    if split_over_processes and env.active and examples:
        share = -(-len(examples) // env.world_size)
        mine = examples[env.rank * share : (env.rank + 1) * share]
        padded = mine + [examples[-1]] * (share - len(mine))
        part = evaluate(model, tokenizer, task, padded, max_new_tokens, with_reference, merge_adapter=merge_adapter)
        parts = distributed.gather_objects((part.completions[: len(mine)], part.scores[: len(mine)]))
        completions = [c for texts, _ in parts for c in texts]
        scores = [s for _, verdicts in parts for s in verdicts]
        return _result(task, examples, completions, scores)
    texts = [task.teacher_text(ex) if with_reference else ex.prompt for ex in examples]
    systems = [ex.system for ex in examples]
    completions = cached_completions(weights, texts, systems, max_new_tokens, EVAL_BATCH_SIZE,
                                     lambda: generate_texts(model, tokenizer, texts, max_new_tokens, EVAL_BATCH_SIZE,
                                                            systems=systems, merge_adapter=merge_adapter))
    scores = task.score_batch(examples, completions)
    return _result(task, examples, completions, scores)


def _result(task: Task, examples: list[Example], completions: list[str], scores: list[Score]) -> EvalResult:
    leaks, overruns = leakage_flags(examples, completions, task), overrun_flags(examples, completions)
    metrics = dict(task.aggregate(scores))
    metrics["leakage"] = leakage_rate(leaks)
    metrics["overrun"] = share(overruns)
    return EvalResult(metrics, completions, scores, leaks, overruns)


def privileged_gap(run: Run, task: Task, limit: int | None, predictions: Path | None = None) -> dict[str, float]:
    """Student accuracy, teacher-with-reference accuracy, and their difference, on the eval split.

    ``predictions``: also write every item's student and teacher completion with its verdicts there
    (JSON lines), so what a number counts can be read (a leak, an overrun) without evaluating again.
    """
    examples = held_out_examples(run, task, limit)
    # (No key where nothing is kept: a hub id, several processes; then the sides are not even checked.)
    base = base_weights_key(run)  # (stats the model's files)
    student_result = held_out_side(run, task, examples, "student", base)
    teacher_result = held_out_side(run, task, examples, "teacher", base)
    if predictions is not None:
        write_predictions(predictions, examples, student_result, teacher_result)
    student, teacher = student_result.metrics, teacher_result.metrics
    gap = {
        "student_accuracy": student["accuracy"],
        "teacher_accuracy": teacher["accuracy"],
        "privileged_gap": teacher["accuracy"] - student["accuracy"],
        "leakage": student["leakage"],  # the student's completions holding teacher-only text
        "teacher_leakage": teacher["leakage"],
        "overrun": student["overrun"],  # the student's completions that go on after a finished answer
    }
    if "strict_accuracy" in student:  # tasks that also score the whole completion (the demo)
        gap.update(student_strict_accuracy=student["strict_accuracy"], teacher_strict_accuracy=teacher["strict_accuracy"])
    gap["n"] = float(len(examples))
    return gap


def held_out_examples(run: Run, task: Task, limit: int | None) -> list[Example]:
    """The items a run's held-out evaluation decodes, with the run's system prompt."""
    return with_system_prompt(task.load(task.eval_split, limit=limit), run.config.system_prompt)


def held_out_side(run: Run, task: Task, examples: list[Example], side: str, base: str | None) -> EvalResult:
    """One side of :func:`privileged_gap`: the student from the plain prompts, or the teacher given the
    reference. Every process evaluates its share of the items (a sharded model needs all of them to
    generate). Where the side still has the base weights (the student before training; the adapter-off
    teacher at any step; an unmoved frozen copy or EMA teacher: ``base_cache.teacher_is_base``) and
    ``base`` is their key, its completions are the base model's, the same in every run: generated once,
    then read from the cache."""
    weights = base if base is not None and _side_is_base(run, side) else None
    max_new, merge = run.config.completion_budget(task), run.config.merge_adapter_for_generation
    if side == "student":
        return evaluate(run.model, run.tokenizer, task, examples, max_new, split_over_processes=True,
                        weights=weights, merge_adapter=merge)
    with run.teacher.as_model() as teacher_model:
        return evaluate(teacher_model, run.tokenizer, task, examples, max_new, with_reference=True,
                        split_over_processes=True, weights=weights, merge_adapter=merge)


def keep_base_completions(run: Run, task: Task, limit: int | None, side: str) -> bool:
    """Generate the base model's completions of one side (``student`` or ``teacher``) of
    :func:`privileged_gap` into the base-completion cache, through the same :func:`held_out_side` a run of
    this configuration evaluates with before training, so that runs started later read them. False where
    nothing is kept (a hub id, several processes; a side that does not hold the base weights)."""
    base = base_weights_key(run)
    if base is None or not _side_is_base(run, side):
        return False
    held_out_side(run, task, held_out_examples(run, task, limit), side, base)
    return True


def _side_is_base(run: Run, side: str) -> bool:
    return student_is_base(run) if side == "student" else teacher_is_base(run)


def write_predictions(path: Path, examples: list[Example], student: EvalResult, teacher: EvalResult) -> None:
    """One JSON line per item: its prompt and reference, then the student's and the teacher's completion,
    score, leak verdict and overrun (the verdicts the metrics were computed from)."""
    rows = []
    for i, ex in enumerate(examples):
        row: dict[str, Any] = {"id": ex.id, "prompt": ex.prompt, "reference": ex.reference}
        for who, result in (("student", student), ("teacher", teacher)):
            row[who] = {"completion": result.completions[i], "value": result.scores[i].value,
                        "verdict": result.scores[i].verdict, "leak": result.leaks[i].reason or None,
                        "overrun": result.overruns[i]}
        rows.append(json.dumps(row, ensure_ascii=False))
    atomic.write_text(path, "\n".join(rows) + "\n")
