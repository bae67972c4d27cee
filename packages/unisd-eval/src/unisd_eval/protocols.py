"""Evaluation protocols: ``default`` (ours, with the §7.26 fixes) and ``research`` (the research code's, §5).

The research protocol exists so that numbers can be compared with the paper's. It differs from the
default in two places; everything else (code and GSM8K extraction order, scoring rules) is the same:

* **MCQA extraction**: the research code's rule order — the *first* ``Answer: X`` line, "the answer
  is X", ``ANSWER: X``, a line starting with a letter, then the *last* standalone capital letter
  anywhere (so "B. Mitochondria…", "I think C…" and "Answer: A photon…" all give a letter; the last
  is the article-"A" inflation §7.26 describes, kept on purpose).
* **Tool-use retries**: items whose completion has no parsable tool call are generated again, up to
  2 rounds, sampled at temperature max(T, 0.7) (only with ``--model``: scored predictions cannot be
  regenerated).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from unisd.data.tasks import Example, Task
from unisd.errors import UsageError

DEFAULT = "default"
RESEARCH = "research"
PROTOCOLS = (DEFAULT, RESEARCH)
RESEARCH_RETRIES = 2  # eval_tooluse --max_retries
RETRY_TEMPERATURE = 0.7  # max(T, 0.7) with greedy T = 0
DESCRIPTIONS = {
    DEFAULT: "unisd's: MCQA takes the last answer line, no stray-letter fallback; no tool-use retries",
    RESEARCH: "the research code's (unisd-method.md §5): MCQA first 'Answer:' line, then 'the answer is', "
              "'ANSWER:', a line starting with a letter, the last standalone letter; tool use retried "
              f"up to {RESEARCH_RETRIES} rounds at temperature {RETRY_TEMPERATURE} when no call parses",
}

Regenerate = Callable[[list[Example], float], list[str]]  # examples, temperature -> one completion each


def check_protocol(name: str) -> None:
    """A UsageError naming the choices for an unknown protocol."""
    if name not in PROTOCOLS:
        raise UsageError(f"--protocol must be one of {', '.join(PROTOCOLS)}, got {name!r}")


def use_protocol(task: Task, name: str) -> Task:
    """Tell ``task`` which protocol to score by (tasks without a research variant ignore it)."""
    check_protocol(name)
    task.protocol = name  # type: ignore[attr-defined]
    return task


def retry_rounds(task: Task, protocol: str, generating: bool) -> int:
    """How many retry rounds this evaluation gets: research protocol, generated, and a task that retries."""
    wants = callable(getattr(task, "retry_wanted", None))
    return RESEARCH_RETRIES if protocol == RESEARCH and generating and wants else 0


@dataclass
class RetryStats:
    """What the retries did: items retried at least once, and how many of those then parsed."""

    rounds: int = 0
    retried: int = 0
    recovered: int = 0

    def metrics(self) -> dict[str, float]:
        return {"retries/items": float(self.retried), "retries/recovered": float(self.recovered)}


def retry_unparsed(task: Task, rows: list[tuple[Example, str]], regenerate: Regenerate,
                   rounds: int) -> tuple[list[tuple[Example, str]], RetryStats]:
    """Generate again, up to ``rounds`` times, each completion the task cannot parse (``retry_wanted``).

    A retry replaces the completion only when it parses, so an item that never does keeps its greedy
    answer (the one predictions.jsonl then shows).
    """
    rows = list(rows)
    stats = RetryStats(rounds=rounds)
    first_failures = {i for i, (ex, c) in enumerate(rows) if task.retry_wanted(ex, c)}  # type: ignore[attr-defined]
    stats.retried = len(first_failures)
    pending = sorted(first_failures)
    for _ in range(rounds):
        if not pending:
            break
        completions = regenerate([rows[i][0] for i in pending], RETRY_TEMPERATURE)
        still = []
        for i, completion in zip(pending, completions, strict=True):
            if task.retry_wanted(rows[i][0], completion):  # type: ignore[attr-defined]
                still.append(i)
            else:
                rows[i] = (rows[i][0], completion)
        pending = still
    stats.recovered = stats.retried - len(pending)
    return rows, stats


def describe(name: str, rounds: int) -> dict[str, Any]:
    """The protocol as results.json records it."""
    return {"name": name, "description": DESCRIPTIONS[name], "retry_rounds": rounds,
            "retry_temperature": RETRY_TEMPERATURE if rounds else None}
