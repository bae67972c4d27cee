"""Negative demonstrations written by the model itself, for the contrastive component (§2.3).

For each training example the model is asked for ``num_negatives`` convincing *wrong* answers:

* MCQA: wrong letters assigned round-robin over the incorrect options, each argued convincingly;
* code: a subtly buggy solution, cycling through bug types;
* tool use: a corrupted tool-call trajectory, cycling through corruption types;
* anything else (``--data`` files): a plausible but wrong answer.

Each negative is stored with ``reference``: the text that replaces the gold reference in the
*same* teacher template as the positive prompt, so the two teacher prompts differ only in the
demonstration (§7.9). The cache is JSONL, one line per example, appended as it goes, so an
interrupted build resumes where it stopped.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from unisd.models import cache_dir
from unisd.prompts import reference_with_reasoning
from unisd.tasks import Example

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
        raise ValueError(
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
        f"(attempt {i + 1}). Do not admit the mistake.\n\n{JSON_FORMAT}",
        f"wrong-{i + 1}",
    ) for i in range(n)]


def _function_name(code: str) -> str | None:
    m = re.search(r"def\s+(\w+)\s*\(", code)
    return m.group(1) if m else None


def parse_output(text: str) -> tuple[str, str]:
    """``(reasoning, answer)`` from the model's JSON, or ``("", text)`` when it is not JSON."""
    for candidate in re.findall(r"\{.*\}", text, flags=re.DOTALL)[:1]:
        try:
            data = json.loads(candidate)
        except json.JSONDecodeError:
            continue
        if isinstance(data, dict):
            return str(data.get("reasoning", "")).strip(), str(data.get("answer", "")).strip()
    return "", text.strip()


def _strip_fence(code: str) -> str:
    m = re.search(r"```(?:python)?\n(.*?)```", code, flags=re.DOTALL)
    return (m.group(1) if m else code).strip()


def negative_reference(kind: str, target: str, reasoning: str, answer: str) -> str:
    """The negative demonstration laid out exactly like the positive reference of that kind."""
    if kind == "mcqa":  # the wrong letter, whatever the model wrote in "answer"
        return reference_with_reasoning(target, reasoning)
    if kind == "code":
        return _strip_fence(answer) or reasoning
    if kind == "tooluse":
        return answer or reasoning
    return answer or reasoning


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


def build_negatives(
    examples: Sequence[Example],
    generate: Callable[[list[str]], list[str]],
    output: str | Path,
    *,
    num_negatives: int = 4,
    kind: str = "auto",
    task: Any = None,
    progress: Callable[[Iterable], Iterable] | None = None,
) -> dict[str, int]:
    """Generate negatives for every example not yet in ``output``, appending one line per example."""
    output = Path(output)
    done = set(read_cache(output))
    todo = [e for e in examples if e.id not in done]
    output.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    # A line cut by an interruption has no newline: start on a fresh line so the next record is whole.
    cut = output.is_file() and output.stat().st_size > 0 and not output.read_bytes().endswith(b"\n")
    with output.open("a", encoding="utf-8") as fh:
        if cut:
            fh.write("\n")
        for ex in (progress(todo) if progress else todo):
            k = negative_kind(ex, task, kind)
            prompts = negative_prompts(ex, k, num_negatives)
            texts = generate([p for p, _ in prompts])
            negatives = []
            for (_, target), text in zip(prompts, texts, strict=True):
                reasoning, answer = parse_output(text)
                ref = negative_reference(k, target, reasoning, answer)
                if ref.strip():
                    negatives.append({"kind": k, "target": target, "reasoning": reasoning, "answer": answer,
                                      "reference": ref})
            fh.write(json.dumps({"id": ex.id, "negatives": negatives}) + "\n")
            fh.flush()  # resumable: each finished example is on disk
            written += 1
    return {"skipped": len(examples) - len(todo), "written": written}
