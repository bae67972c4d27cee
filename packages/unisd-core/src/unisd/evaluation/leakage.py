"""Leakage: text in a completion that exists only in the teacher's context.

The teacher sees the problem inside the method's template, with the reference. A student trained
toward it can learn to *copy* what only the teacher could see: the template's own phrases ("This is an
example for a response to the question:") or spans of the reference. That is not the skill the
distillation is for, and a first-line scorer can count ``"CLOUD TABLE\\n\\nThis is an example for a"``
as correct. A completion leaks when it contains:

(a) a **template phrase**, or a prefix of one of at least ``min_template_words`` words (completions are
    cut at ``max_new_tokens``, so "This is an example for a" must count). The phrases are not a copy of
    the template: :func:`template_fragments` renders the task's own teacher template around two
    sentinels and keeps the fixed text between them, so a task with another template (tool use) or a
    plugin task is covered. Default 4 words: every 3-word prefix of the generic template ("This is
    an", "Carefully study the") is everyday English and would flag clean answers, while the 4-word
    ones ("This is an example", "Carefully study the reference") are specific to the template and a
    leak cut off after its 4th word is still caught.
(b) an **n-gram** of ``ngram`` (default 6) consecutive words of the reference, of other
    demonstrations given to the teacher, or of the template itself (a leak may start mid-phrase).

Words are ``\\w+`` runs, lowercased: punctuation, whitespace and case do not split or join n-grams,
so a leak re-spaced, re-cased or with another final punctuation still matches, and code's punctuation
does not inflate an n-gram's length (6 words of code are a real copy, 6 punctuation tokens are not).
Either kind counts only when its word sequence does not occur in the student's prompt: text the
student could see is not leaked. A reference shorter than ``ngram`` words (a bare answer such as
"CLOUD TABLE" or "46") can never leak through (b): answering correctly is not leakage.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ..data.tasks import Example, Task, teacher_text_with
from ..errors import ConfigError

MIN_TEMPLATE_WORDS = 4
NGRAM = 6
# The characters of the reference's ending a completion must reproduce before it counts as finished:
# all of a short answer ("CLOUD TABLE", "46"), the last line or two of a longer one (a code block's end).
REFERENCE_TAIL_CHARS = 32
_WORD = re.compile(r"\w+")
# Plain letters: a task's template may format or strip its inputs, but leaves words like these alone.
_PROMPT_SENTINEL = "UNISDSENTINELPROMPTQ"
_REFERENCE_SENTINEL = "UNISDSENTINELREFERENCER"


@dataclass(frozen=True)
class Leak:
    """The verdict on one completion: ``leaked``, why (the first match), and every leaked character span."""

    leaked: bool
    reason: str = ""  # e.g. "template: 'This is an example for a'" or "reference: '...'"
    spans: tuple[tuple[int, int], ...] = ()  # [start, end) character offsets in the completion, merged


@dataclass(frozen=True)
class _Word:
    text: str
    start: int
    end: int


def _words(text: str) -> list[_Word]:
    return [_Word(m.group().lower(), m.start(), m.end()) for m in _WORD.finditer(text)]


def template_fragments(task: Task | None, example: Example) -> tuple[str, ...]:
    """The fixed phrases of the teacher template ``example`` is shown in (one per line of the template).

    The template is rendered with sentinel strings as the problem and the reference; what remains
    once they are removed is the template's own text. Lines of fewer than two words (blank lines, a
    lone colon) are dropped: they say nothing about where a completion's text came from.
    """
    probe = Example(example.id, _PROMPT_SENTINEL, _REFERENCE_SENTINEL, example.meta)
    text = teacher_text_with(task, probe, _REFERENCE_SENTINEL)
    fixed = text.replace(_PROMPT_SENTINEL, "\n").replace(_REFERENCE_SENTINEL, "\n")
    return tuple(line.strip() for line in fixed.splitlines() if len(_WORD.findall(line)) >= 2)


class _PromptText:
    """Membership of a word sequence in the student prompt (as whole words, in order)."""

    def __init__(self, prompt: str):
        self._joined = " " + " ".join(w.text for w in _words(prompt)) + " "

    def contains(self, words: Sequence[str]) -> bool:
        return (" " + " ".join(words) + " ") in self._joined


def detect_leak(
    completion: str,
    example: Example,
    task: Task | None = None,
    extra_teacher_texts: Iterable[str] = (),
    min_template_words: int = MIN_TEMPLATE_WORDS,
    ngram: int = NGRAM,
) -> Leak:
    """Whether ``completion`` (answering ``example``) holds teacher-only text, and where.

    ``task`` picks the teacher template (None: the method's generic one, as for ``--data`` files);
    ``extra_teacher_texts`` are further demonstrations the teacher saw (their n-grams count like the
    reference's).
    """
    if min_template_words < 1 or ngram < 1:
        raise ConfigError(f"leakage: min_template_words and ngram must be >= 1, got {min_template_words}, {ngram}")
    words = _words(completion)
    prompt = _PromptText(example.prompt)
    found: list[tuple[int, int, str]] = []  # (start, end, reason)
    fragments = template_fragments(task, example)
    for fragment in fragments:
        found.extend(_template_prefixes(completion, words, [w.text for w in _words(fragment)], prompt, min_template_words))
    sources = [("template", f) for f in fragments] + [("reference", example.reference)]
    sources += [("demonstration", t) for t in extra_teacher_texts]
    found.extend(_copied_ngrams(completion, words, sources, prompt, ngram))
    if not found:
        return Leak(False)
    found.sort(key=lambda f: (f[0], -f[1]))  # the reason names the earliest, then the longest, match
    return Leak(True, found[0][2], _merge((s, e) for s, e, _ in found))


def _template_prefixes(
    completion: str, words: list[_Word], fragment: list[str], prompt: _PromptText, min_words: int
) -> list[tuple[int, int, str]]:
    """Places where the completion starts the fragment and follows it for at least ``min_words`` words."""
    need = min(min_words, len(fragment))
    out = []
    for i in range(len(words)):
        k = 0
        while k < len(fragment) and i + k < len(words) and words[i + k].text == fragment[k]:
            k += 1
        if k >= need and not prompt.contains(fragment[:k]):
            start, end = words[i].start, words[i + k - 1].end
            out.append((start, end, f"template: {completion[start:end]!r}"))
    return out


def _copied_ngrams(
    completion: str, words: list[_Word], sources: list[tuple[str, str]], prompt: _PromptText, n: int
) -> list[tuple[int, int, str]]:
    """Windows of ``n`` completion words that occur in a teacher-only text but not in the student prompt."""
    grams: dict[tuple[str, ...], str] = {}
    for kind, text in sources:
        tw = [w.text for w in _words(text)]
        for j in range(len(tw) - n + 1):
            gram = tuple(tw[j : j + n])
            if gram not in grams and not prompt.contains(gram):
                grams[gram] = kind
    out = []
    for i in range(len(words) - n + 1):
        kind = grams.get(tuple(w.text for w in words[i : i + n]))
        if kind is not None:
            start, end = words[i].start, words[i + n - 1].end
            out.append((start, end, f"{kind}: {completion[start:end]!r}"))
    return out


def _merge(spans: Iterable[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    merged: list[list[int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return tuple((s, e) for s, e in merged)


def leakage_flags(
    examples: Sequence[Example], completions: Sequence[str], task: Task | None = None, **options: Any
) -> list[Leak]:
    """:func:`detect_leak` for each (example, completion) pair; ``options`` go to it."""
    return [detect_leak(c, ex, task, **options) for ex, c in zip(examples, completions, strict=True)]


def share(flags: Sequence[bool]) -> float:
    """The share of true flags (0.0 for none)."""
    return sum(flags) / len(flags) if flags else 0.0


def leakage_rate(leaks: Sequence[Leak]) -> float:
    """The share of completions that leak (0.0 for none)."""
    return share([leak.leaked for leak in leaks])


def count_leaks(tokenizer: Any, task: Task | None, examples: Sequence[Example], completion_ids: Sequence[Sequence[int]]) -> int:
    """How many of the sampled completions (token ids) leak: the per-step ``leakage`` numerator."""
    texts = [tokenizer.decode(list(ids), skip_special_tokens=True) for ids in completion_ids]
    return sum(leak.leaked for leak in leakage_flags(examples, texts, task))


def token_range(decode: Callable[[int], str], num_tokens: int, start: int, end: int) -> range:
    """The tokens of a completion whose text overlaps characters ``[start, end)``.

    ``decode(t)`` is the text of the first ``t`` tokens. Its length grows with ``t``, so the first token
    ending after ``start`` and the last one starting before ``end`` are found by bisection: a few
    decodes per span rather than one per token.
    """
    lengths: dict[int, int] = {}

    def length(t: int) -> int:
        if t not in lengths:
            lengths[t] = len(decode(t))
        return lengths[t]

    def first(predicate: Callable[[int], bool]) -> int:  # smallest t in [0, num_tokens] with predicate(t)
        lo, hi = 0, num_tokens
        while lo < hi:
            mid = (lo + hi) // 2
            if predicate(mid):
                hi = mid
            else:
                lo = mid + 1
        return lo

    first_token = first(lambda t: length(t + 1) > start) if num_tokens else 0
    stop = first(lambda t: length(t) >= end)  # tokens [0, stop) cover the span's end
    return range(min(first_token, num_tokens), max(min(stop, num_tokens), first_token))


def reference_end_offset(completion: str, reference: str) -> int | None:
    """Where ``completion`` first finishes reproducing the reference's ending (its last
    ``REFERENCE_TAIL_CHARS`` characters), as a character offset; None when it never does.

    The match must start at a word boundary: "76" does not end "176".
    """
    tail = reference.strip()[-REFERENCE_TAIL_CHARS:]
    if not tail:
        return None
    start = completion.find(tail)
    while start != -1:
        if start == 0 or not (completion[start - 1].isalnum() and tail[0].isalnum()):
            return start + len(tail)
        start = completion.find(tail, start + 1)
    return None


def overruns(completion: str, reference: str) -> bool:
    """Whether ``completion`` reproduces the reference's ending and then goes on writing.

    The teacher's prompt has template text after the reference, not the end of a turn, so a student
    distilled from it can learn to continue past a finished answer with the template's phrases or
    *paraphrases* of them ("CLOUD TABLE\n\nThis is a classic example of …"), which no list of
    teacher-only phrases catches. This counts them without knowing what they say.
    """
    end = reference_end_offset(completion, reference)
    return end is not None and bool(completion[end:].strip())


def overrun_flags(examples: Sequence[Example], completions: Sequence[str]) -> list[bool]:
    """:func:`overruns` for each (example, completion) pair."""
    return [overruns(c, ex.reference) for ex, c in zip(examples, completions, strict=True)]
