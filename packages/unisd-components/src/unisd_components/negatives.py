"""Negative demonstrations written by the model itself, for the contrastive component (§2.3).

For each training example the model is asked for ``num_negatives`` convincing *wrong* answers:

* MCQA: wrong letters assigned round-robin over the incorrect options, each argued convincingly;
* code: a subtly buggy solution, cycling through bug types;
* tool use: a corrupted tool-call trajectory, cycling through corruption types;
* anything else (``--data`` files): a plausible but wrong answer.

Each negative is stored with its parts (reasoning, answer, target) and ``reference``: the text
that replaces the gold reference in the *same* teacher template as the positive prompt, rendered
by the task exactly as it renders its own references, so the two teacher prompts differ only in
the demonstration's content (§7.9). Every sample is validated before it is cached (parsed, not the
reference, bounded length, no degenerate repetition) and rejected ones are regenerated a bounded
number of times. The cache is JSONL, one line per example, appended as it goes, so an interrupted
build resumes where it stopped.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unisd.data.prompts import render_like, strip_fence
from unisd.data.tasks import Example
from unisd.errors import DataError
from unisd.io.cachedir import cache_dir

from .contexts.fewshot import family_of

BUG_TYPES = ("off-by-one error", "wrong operator", "missing edge case", "wrong return value")
TOOL_CORRUPTIONS = {
    "wrong_action": "call a plausible but wrong tool for the request",
    "wrong_args": "call the right tool with subtly wrong argument values",
    "wrong_interpretation": "misread what the user asked and act on that misreading",
    "extra_tool_calls": "make unnecessary extra tool calls besides the needed one",
}
KINDS = ("auto", "mcqa", "code", "tooluse", "generic")
JSON_FORMAT = 'Return ONLY a JSON object: {"reasoning": "<your reasoning>", "answer": "<your answer>"}'


def _safe(tag: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in tag.strip("/").split("/")[-1]) or "x"


def default_cache_path(model: str, source: str) -> Path:
    """Where ``unisd cache negatives`` writes by default and the contrastive component looks by default."""
    return cache_dir() / "negatives" / _safe(Path(source).stem if source.endswith(".jsonl") else source) / _safe(model) / "negatives.jsonl"


def negative_kind(example: Example, task: Any = None, kind: str = "auto") -> str:
    if kind != "auto":
        return kind
    family = family_of(example, task)
    return "generic" if family not in ("mcqa", "code", "tooluse") else family


def _letters_and_options(meta: dict) -> tuple[list[str], dict[str, str]]:
    options = meta.get("options") or meta.get("choices") or []
    if isinstance(options, dict):
        return list(options), {str(k): str(v) for k, v in options.items()}
    count = len(options) or int(meta.get("num_choices", 0))  # unisd-eval's MCQA tasks store num_choices
    letters = meta.get("letters") or [chr(ord("A") + i) for i in range(count)]
    return list(letters), {lt: str(t) for lt, t in zip(letters, options, strict=False)}


def wrong_targets(example: Example, n: int) -> list[str]:
    """MCQA: the wrong letters, round-robin (4 options, 4 negatives: W1, W2, W3, W1)."""
    letters, _ = _letters_and_options(example.meta)
    correct = str(example.meta.get("correct_letter", "")).strip()
    wrong = [lt for lt in letters if lt != correct]
    if not wrong:
        raise DataError(
            f"example {example.id!r}: MCQA negatives need meta 'correct_letter' and 'num_choices' (or 'choices')"
        )
    return [wrong[i % len(wrong)] for i in range(n)]


def negative_prompts(example: Example, kind: str, n: int) -> list[tuple[str, str]]:
    """``n`` generation prompts with their target (wrong letter, bug type, corruption type)."""
    if kind == "mcqa":
        _, options = _letters_and_options(example.meta)
        out = []
        for letter in wrong_targets(example, n):
            out.append((
                "You are simulating a confident student who made a mistake on this question. "
                f"Argue convincingly that the answer is {letter}{f' ({options[letter]})' if letter in options else ''}.\n\n"
                f"{example.prompt}\n\nRules:\n- Your reasoning must conclude that the answer is {letter}.\n"
                "- Sound plausible and use the right domain terminology.\n- Do not hedge or admit doubt.\n"
                f"- 2-4 sentences.\n\n{JSON_FORMAT} with \"answer\": \"{letter}\".",
                letter,
            ))
        return out
    if kind == "code":
        func = example.meta.get("entry_point") or _function_name(example.reference) or "the required function"
        tests = example.meta.get("test_list") or []
        tests_text = "\n".join(tests) if isinstance(tests, list) else str(tests)
        return [(
            "You are simulating a programmer who makes a subtle mistake. Write a solution that LOOKS "
            f"correct but has a {bug}.\n\nTask:\n{example.prompt}\n\nFunction name: {func}\n"
            f"Test cases (your code should fail at least one):\n{tests_text}\n\nRules:\n"
            f"- Use the function name {func}.\n- The bug must be subtle.\n- Include the imports you need.\n"
            f'- The "answer" field holds only the code.\n\n{JSON_FORMAT}',
            bug,
        ) for bug in (BUG_TYPES[i % len(BUG_TYPES)] for i in range(n))]
    if kind == "tooluse":
        names = list(TOOL_CORRUPTIONS)
        return [(
            "You are simulating an assistant that makes a mistake while using tools: "
            f"{TOOL_CORRUPTIONS[c]} ({c}).\n\n{example.prompt}\n\nRules:\n"
            "- Write a genuine-looking ReAct response (Thought, Action, Action Input lines).\n"
            "- Action Input must be valid JSON.\n- Do not admit the mistake.\n\n"
            f'{JSON_FORMAT} where "answer" holds the ReAct text.',
            c,
        ) for c in (names[i % len(names)] for i in range(n))]
    return [(
        f"{example.prompt}\n\nWrite a response that looks convincing but is WRONG in a subtle way "
        f"(attempt {i + 1}). Do not admit the mistake. Keep the reasoning to one short sentence and give the "
        f"answer in the form the task asks for.\n\n{JSON_FORMAT}",
        f"wrong-{i + 1}",
    ) for i in range(n)]


def _function_name(code: str) -> str | None:
    m = re.search(r"def\s+(\w+)\s*\(", code)
    return m.group(1) if m else None


# -- parsing ---------------------------------------------------------------------------------------


def json_object_end(text: str) -> int | None:
    """The index just past the first complete top-level JSON object of ``text``, or None while it is open.

    Braces inside JSON strings (and escaped quotes) are skipped, so ``{"answer": "x}"}`` ends at its
    last brace. Used to stop a sample as soon as its object closes, and to parse it.
    """
    start = text.find("{")
    if start < 0:
        return None
    depth, in_string, escaped = 0, False, False
    for i in range(start, len(text)):
        ch = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


@dataclass
class ParsedOutput:
    """A sample's ``reasoning`` and ``answer``; ``json`` says whether they came from a JSON object
    (else ``answer`` is the raw text, the fallback for backends without guided decoding)."""

    reasoning: str
    answer: str
    json: bool


SCHEMA_KEYS = frozenset({"reasoning", "answer"})


def _json_objects(text: str) -> Iterator[tuple[int, dict]]:
    """``(end index, object)`` of every complete JSON object in ``text``, in order of their start."""
    start = text.find("{")
    while start >= 0:
        end = json_object_end(text[start:])
        if end is None:
            return
        try:
            data = json.loads(text[start:start + end])
        except json.JSONDecodeError:
            data = None
        if isinstance(data, dict):
            yield start + end, data
        start = text.find("{", start + 1)


def schema_object_end(text: str) -> int | None:
    """The index just past the first complete JSON object holding ``reasoning`` or ``answer``, or None.

    A brace pair in prose or code (``return {}``) is not the answer's object, so it does not count.
    """
    return next((end for end, data in _json_objects(text) if SCHEMA_KEYS & data.keys()), None)


def parse_sample(text: str) -> ParsedOutput:
    """The ``reasoning`` and ``answer`` of the first JSON object holding either, else the raw text as
    the answer (the fallback for output that is not JSON)."""
    for _, data in _json_objects(text):
        if SCHEMA_KEYS & data.keys():
            return ParsedOutput(_text(data.get("reasoning")), _text(data.get("answer")), True)
    return ParsedOutput("", text.strip(), False)


def _text(value: Any) -> str:
    return value.strip() if isinstance(value, str) else ("" if value is None else json.dumps(value))


def parse_output(text: str) -> tuple[str, str]:
    """``(reasoning, answer)`` from the model's JSON, or ``("", text)`` when it is not JSON."""
    parsed = parse_sample(text)
    return parsed.reasoning, parsed.answer


# -- rendering ---------------------------------------------------------------------------------------


def render_negative(example: Example, kind: str, target: str, reasoning: str, answer: str, task: Any = None) -> str:
    """A negative demonstration rendered exactly as the task renders the example's reference.

    The task's :meth:`~unisd.data.tasks.Task.render_reference` does it (fenced code for MBPP,
    ``Reasoning:/Answer:`` for MCQA); without a task (``--data`` files) the example's own reference
    gives the layout. So the positive and negative teacher prompts differ only in content (§7.9).
    """
    if kind == "mcqa":
        answer = target  # the wrong letter, whatever letter the model wrote
    elif kind == "code":
        answer = strip_fence(answer) or strip_fence(reasoning)
    elif not answer:
        answer = reasoning
    if task is not None and hasattr(task, "render_reference"):
        return task.render_reference(example, answer, reasoning)
    return render_like(example.reference, answer, reasoning)


# -- validation --------------------------------------------------------------------------------------

# A negative may be longer than its reference (a wrong argument instead of a bare letter, an extra
# helper), but not without bound: a rambling sample teaches the teacher prompt nothing about the task.
LENGTH_FACTOR = 3
LENGTH_SLACK = 400  # characters, so very short references (a letter, a number) still allow a sentence
REPEAT_RUN = 16  # the same short unit this many times in a row is degenerate ("ha ha ha ...", emoji runs)
REPEAT_LINE = 4  # the same non-blank line this many times in a row
_REPEATED_UNIT = re.compile(r"(\S.{0,19}?)\1{" + str(REPEAT_RUN - 1) + ",}", flags=re.DOTALL)


def _normalised(text: str) -> str:
    return " ".join(text.split())


def is_degenerate(text: str) -> bool:
    """Degenerate repetition: a short unit (with a visible character) repeated ``REPEAT_RUN`` times in
    a row, or one line ``REPEAT_LINE`` times in a row. Indentation (runs of spaces) does not count."""
    if _REPEATED_UNIT.search(text):
        return True
    run, previous = 0, None
    for line in (ln.strip() for ln in text.splitlines()):
        run = run + 1 if line and line == previous else 1
        previous = line
        if line and run >= REPEAT_LINE:
            return True
    return False


def rejection(example: Example, kind: str, parsed: ParsedOutput, rendered: str) -> str | None:
    """Why a sample is not a usable negative (a short reason, counted in the report), or None if it is.

    Checks, in order: it parsed (a JSON object; raw text only for code holding a fenced block),
    code compiles, it is not the reference, its length is bounded relative to the reference, and it
    is not degenerate repetition.
    """
    content = parsed.answer or parsed.reasoning
    if not content.strip():
        return "empty"
    if not parsed.json and not (kind == "code" and "```" in parsed.answer):
        return "not JSON"
    if kind == "code":
        try:
            compile(strip_fence(content), "<negative>", "exec")
        except (SyntaxError, ValueError):
            return "not valid Python"
    if _normalised(rendered) == _normalised(example.reference):
        return "same as the reference"
    limit = max(LENGTH_FACTOR * len(example.reference), len(example.reference) + LENGTH_SLACK)
    if len(rendered) > limit:
        return "too long"
    if is_degenerate(f"{parsed.reasoning}\n{parsed.answer}"):
        return "degenerate repetition"
    return None


# -- the cache ---------------------------------------------------------------------------------------


def read_cache(path: str | Path) -> dict[str, list[dict]]:
    """``{example id: [negative, ...]}`` from a JSONL cache (a missing file reads as empty)."""
    path = Path(path)
    out: dict[str, list[dict]] = {}
    if not path.is_file():
        return out
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by an interruption: that example is simply redone
            out[str(record["id"])] = list(record.get("negatives", []))
    return out


def cached_reference(example: Example, entry: dict, task: Any = None) -> str:
    """A cached negative's demonstration, re-rendered from its parts by the task when they are stored
    (caches written before the task's layout changed stay usable), else its stored reference."""
    if "answer" in entry and entry.get("kind"):
        return render_negative(example, entry["kind"], str(entry.get("target", "")), str(entry.get("reasoning", "")),
                               str(entry["answer"]), task)
    return str(entry.get("reference", ""))


def choose_negative(example: Example, cached: list[dict], task: Any = None, seed: int = 42) -> str | None:
    """The one negative demonstration of ``example`` for a run, or None.

    In order: ``meta["negative_reference"]``, the task's own :meth:`~unisd.data.tasks.Task.negative`
    (e.g. the demo's deterministic wrong answers: no model, no cache), then one cached negative
    chosen with a seed independent of the data order.
    """
    direct = example.meta.get("negative_reference")
    if isinstance(direct, str) and direct.strip():
        return direct
    own = task.negative(example) if task is not None and hasattr(task, "negative") else None
    if isinstance(own, str) and own.strip():
        return own
    choices = [ref for ref in (cached_reference(example, n, task) for n in cached) if ref.strip()]
    return random.Random(f"{seed}:{example.id}").choice(choices) if choices else None


# -- building ----------------------------------------------------------------------------------------

# The method samples negatives with 1024 new tokens for its datasets (§6.1); other tasks get their
# own completion budget plus room for the JSON wrapper and a short reasoning.
METHOD_MAX_NEW_TOKENS = 1024
JSON_ALLOWANCE = 48
DEFAULT_MAX_NEW_TOKENS = 256  # --data files: the run's default completion budget
JSON_SCHEMA = {
    "type": "object",
    "properties": {"reasoning": {"type": "string"}, "answer": {"type": "string"}},
    "required": ["reasoning", "answer"],
}


def negative_budget(task: Any, kind: str) -> int:
    """New tokens per negative: the method's 1024 for its kinds, else the task's budget plus the JSON's."""
    if kind in ("mcqa", "code", "tooluse"):
        return METHOD_MAX_NEW_TOKENS
    base = getattr(task, "max_new_tokens", None) if task is not None else None
    return int(base or DEFAULT_MAX_NEW_TOKENS) + JSON_ALLOWANCE


@dataclass
class BuildStats:
    """What a build did: examples written (and how many of them got no negative), skipped, rejections."""

    total: int = 0
    skipped: int = 0
    sampled: int = 0  # samples generated, retries included
    written: int = 0
    negatives: int = 0
    without: int = 0  # written examples with no valid negative
    rejected: Counter = field(default_factory=Counter)  # reason -> samples

    def as_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped, "written": self.written, "sampled": self.sampled, "negatives": self.negatives,
                "without": self.without, "rejected": dict(self.rejected)}


@dataclass
class _Slot:
    """One negative to write: its example, kind, generation prompt and target."""

    example: Example
    kind: str
    prompt: str
    target: str


def _scored_correct(task: Any, candidates: list[tuple[_Slot, str]]) -> list[bool]:
    """Whether the task scores each rendered negative as a correct answer (e.g. MBPP code that passes
    its tests): such a "negative" would push the student away from a right answer. All False for a
    task without a scorer (``--data`` files)."""
    if not candidates or task is None or not hasattr(task, "score_batch"):
        return [False] * len(candidates)
    scores = task.score_batch([slot.example for slot, _ in candidates], [text for _, text in candidates])
    return [score.value >= 1.0 for score in scores]


def _sample_slots(slots: list[_Slot], generate: Callable[[list[str]], list[str]], task: Any, max_retries: int,
                  stats: BuildStats, progress: Callable[[BuildStats], None] | None) -> dict[str, list[dict]]:
    """Generate every slot, validate each sample, and regenerate rejected ones up to ``max_retries`` times.

    A sample must pass :func:`rejection`'s checks and must not be scored correct by the task.
    ``progress`` hears after every generation call: on a CPU one call can take minutes.
    """
    accepted: dict[str, list[dict]] = {}
    pending = list(slots)
    for _ in range(max_retries + 1):
        if not pending:
            break
        texts = generate([s.prompt for s in pending])
        stats.sampled += len(texts)
        retry, candidates = [], []
        for slot, text in zip(pending, texts, strict=True):
            parsed = parse_sample(text)
            rendered = render_negative(slot.example, slot.kind, slot.target, parsed.reasoning, parsed.answer, task)
            reason = rejection(slot.example, slot.kind, parsed, rendered)
            if reason is None:
                candidates.append((slot, rendered, parsed))
            else:
                stats.rejected[reason] += 1
                retry.append(slot)
        correct = _scored_correct(task, [(slot, rendered) for slot, rendered, _ in candidates])
        for (slot, rendered, parsed), is_correct in zip(candidates, correct, strict=True):
            if is_correct:
                stats.rejected["scored correct by the task"] += 1
                retry.append(slot)
                continue
            accepted.setdefault(slot.example.id, []).append(
                {"kind": slot.kind, "target": slot.target, "reasoning": parsed.reasoning,
                 "answer": parsed.answer, "reference": rendered})
        pending = retry
        if progress is not None:
            progress(stats)
    return accepted


def _batches(items: Sequence[Example], size: int) -> Iterator[Sequence[Example]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def build_negatives(
    examples: Sequence[Example],
    generate: Callable[[list[str]], list[str]],
    output: str | Path,
    *,
    num_negatives: int = 4,
    kind: str = "auto",
    task: Any = None,
    max_retries: int = 2,
    batch_examples: int = 8,
    progress: Callable[[BuildStats], None] | None = None,
) -> dict[str, Any]:
    """Generate negatives for every example not yet in ``output``, appending one line per example.

    Examples are generated ``batch_examples`` at a time (all their samples in one call); each sample
    is validated (:func:`rejection`) and a rejected one is regenerated up to ``max_retries`` times.
    An example left without any valid negative is still written (empty), so a resumed build does not
    redo it; the returned ``without`` counts them. ``progress`` is called after every generation call
    and every batch.
    """
    output = Path(output)
    done = set(read_cache(output))
    todo = [e for e in examples if e.id not in done]
    stats = BuildStats(total=len(examples), skipped=len(examples) - len(todo))
    output.parent.mkdir(parents=True, exist_ok=True)
    # A line cut by an interruption has no newline: start on a fresh line so the next record is whole.
    cut = output.is_file() and output.stat().st_size > 0 and not output.read_bytes().endswith(b"\n")
    with output.open("a", encoding="utf-8") as fh:
        if cut:
            fh.write("\n")
        for batch in _batches(todo, max(1, batch_examples)):
            slots = []
            for ex in batch:
                k = negative_kind(ex, task, kind)
                slots += [_Slot(ex, k, p, t) for p, t in negative_prompts(ex, k, num_negatives)]
            accepted = _sample_slots(slots, generate, task, max_retries, stats, progress)
            for ex in batch:
                negatives = accepted.get(ex.id, [])
                fh.write(json.dumps({"id": ex.id, "negatives": negatives}) + "\n")
                stats.written += 1
                stats.negatives += len(negatives)
                stats.without += not negatives
            fh.flush()  # resumable: each finished batch is on disk
            if progress is not None:
                progress(stats)
    return stats.as_dict()
