"""Examples, tasks and scores: the data side of a run.

An :class:`Example` is what the loop consumes: the student's prompt text, the privileged reference
that goes into the teacher prompt, and free-form metadata. A :class:`Task` loads examples for a split
and scores completions. Tasks are registered through the ``register_tasks`` hook.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

from ..errors import DataError
from .prompts import render_like, teacher_text


@dataclass
class Example:
    """One training or evaluation item."""

    id: str
    prompt: str  # the student's user-message text
    reference: str  # the privileged demonstration shown to the teacher only
    meta: dict[str, Any] = field(default_factory=dict)
    system: str | None = None  # a system prompt for student and teacher alike (None: the template's default)


@dataclass
class Score:
    """The verdict on one completion. ``value`` is 1.0 for a fully correct answer, 0.0 for a wrong one."""

    value: float
    extracted: str | None = None
    verdict: str = "scored"  # e.g. correct, wrong, unparsed, passed, failed, timeout
    error: str | None = None


class Task:
    """Base class of tasks. Subclasses set ``name`` and implement ``load`` and ``score``.

    ``train_split`` is None for evaluation-only tasks. ``max_new_tokens`` is the task's default
    generation budget.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    splits: ClassVar[tuple[str, ...]] = ("train", "test")
    train_split: ClassVar[str | None] = "train"
    eval_split: ClassVar[str] = "test"
    max_new_tokens: ClassVar[int] = 512

    def load(self, split: str, path: str | None = None, limit: int | None = None) -> list[Example]:
        raise NotImplementedError

    def teacher_text(self, example: Example) -> str:
        """The teacher's user-message text. Override for tasks with another template (tool use)."""
        return teacher_text(example.prompt, example.reference)

    def render_reference(self, example: Example, answer: str, reasoning: str = "") -> str:
        """``answer`` (and its ``reasoning``) as this task's reference demonstration for ``example``.

        The one way a task lays out a reference: tasks that build their gold reference from parts
        use it in ``load``, and contrastive negatives go through it, so the positive and negative
        teacher prompts differ only in content. The default copies the layout of the example's own
        reference (fenced code, ``Reasoning:/Answer:``, or bare).
        """
        return render_like(example.reference, answer, reasoning)

    def negative(self, example: Example) -> str | None:
        """A wrong answer, already rendered as a reference, for the contrastive component.

        Checked before any negatives cache; None (the default) when the task has none to offer.
        """
        return None

    def score(self, example: Example, completion: str) -> Score:
        raise NotImplementedError

    def score_batch(self, examples: list[Example], completions: list[str]) -> list[Score]:
        """Score many completions; override to parallelise (e.g. a sandbox pool)."""
        return [self.score(ex, c) for ex, c in zip(examples, completions, strict=True)]

    def aggregate(self, scores: list[Score]) -> dict[str, float]:
        """Summary metrics of a list of scores."""
        n = max(len(scores), 1)
        return {
            "accuracy": sum(s.value for s in scores) / n,
            "extraction_rate": sum(s.extracted is not None for s in scores) / n,
        }


def teacher_text_with(task: Task | None, example: Example, reference: str) -> str:
    """The teacher's user text for ``example`` with ``reference`` as its demonstration.

    The one place that picks the template: the task's own (tool use differs) or the method's generic
    one for ``--data`` files. Budgeting (a shortened reference) and contrastive negatives (another
    demonstration in the same template) both go through it.
    """
    swapped = replace(example, reference=reference)
    return task.teacher_text(swapped) if task is not None else teacher_text(example.prompt, reference)


def iter_jsonl(path: str | Path, expected: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``("FILE:LINE", object)`` for each non-blank line; ``expected`` describes a good line in errors."""
    path = Path(path)
    with path.open("rb") as fh:
        yield from iter_jsonl_lines(_utf8_lines(fh, str(path)), str(path), expected)


def _utf8_lines(raw_lines: Iterable[bytes], label: str) -> Iterator[str]:
    for lineno, raw in enumerate(raw_lines, start=1):
        yield utf8_line(raw, f"{label}:{lineno}")


def utf8_line(raw: bytes, where: str) -> str:
    """One line decoded as UTF-8; bytes that are not UTF-8 are a DataError naming the line and column."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{where}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at byte {exc.start + 1} "
                        "of the line); save the file as UTF-8") from None


def iter_jsonl_lines(lines: Iterable[str], label: str, expected: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Like :func:`iter_jsonl` over lines already read (e.g. from a gzip file); ``label`` names their source."""
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{label}:{lineno}"
        yield where, parse_json_line(line, where, expected)


def parse_json_line(line: str, where: str, expected: str) -> dict[str, Any]:
    """One line of a JSON-lines file as an object; anything else is a DataError naming ``where``."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: not valid JSON ({exc.msg}); each line must be one JSON object, {expected}") from None
    except RecursionError:
        raise DataError(f"{where}: JSON nested too deeply to read; each line must be one JSON object, {expected}") from None
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object ({expected}), got {type(record).__name__}")
    return record


def check_encodable(text: str, where: str) -> None:
    """JSON escapes can spell half of a UTF-16 pair (a lone surrogate), which no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise DataError(f"{where} holds a lone surrogate (\\u{ord(text[exc.start]):04x} at character {exc.start + 1}), "
                        "which is not text; fix or drop that escape") from None


def load_jsonl_examples(path: str | Path, limit: int | None = None) -> list[Example]:
    """Read ``{"id", "prompt", "reference", "meta"}`` records (or chat ``messages``) from a data file.

    ``prompt`` and ``reference`` are required strings; ``id`` defaults to the line number; ``meta``
    is an optional object. Errors name the file and line. Other formats and Hub datasets:
    :func:`unisd.data.datafiles.load_data`, which this calls.
    """
    from .datafiles import load_data  # datafiles builds on this module

    return load_data(path, limit=limit)
