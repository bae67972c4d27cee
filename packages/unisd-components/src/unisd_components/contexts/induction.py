"""Induced instructions: the model writes general instructions from a few solved demonstrations.

They are generated once (greedy, with :func:`unisd.evaluation.evaluate.generate_texts`) and cached as JSON under
``unisd.io.cachedir.cache_dir()/induction``. Every instruction remembers which examples it was induced
from, and an example never gets an instruction induced from itself, so its own reference cannot
reach its context even if the model copied a demonstration.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Callable, Sequence
from pathlib import Path

from unisd.data.prompts import fence_code
from unisd.data.tasks import Example
from unisd.io.cachedir import cache_dir

from .fewshot import bare_code, family_of, mcqa_parts

# Used when every induced instruction was built from the example itself (tiny data sets).
FALLBACK_INSTRUCTION = (
    "Read the problem carefully, follow its required output format exactly, and check your answer before you finish."
)
MAX_PROMPTS = 100

Generate = Callable[[list[str]], list[str]]  # meta-prompts -> instructions


def _demo_block(i: int, ex: Example, family: str) -> str:
    """One solved example of the meta-prompt, in the method's per-family layout."""
    if family == "code":
        return f"### Example {i}\nTask:\n{ex.prompt}\n\nSolution:\n{fence_code(bare_code(ex))}\n"
    if family == "mcqa":
        parts = mcqa_parts(ex)
        if parts is None:
            return f"### Example {i}\n{ex.prompt}\n\nCorrect Answer and Explanation:\n{ex.reference.strip()}\n"
        question, options, letter, explanation = parts
        why = f"\nExplanation: {explanation}" if explanation else ""
        return f"### Example {i}\nQuestion: {question}\n{options}\nCorrect Answer: {letter}{why}\n"
    if family == "tooluse":
        question = ex.meta.get("instruction", ex.prompt)
        return f"### Example {i}\nInstruction:\n{question}\n\nResponse:\n{ex.reference.strip()}\n"
    return f"### Example {i}\nProblem:\n{ex.prompt}\n\nReference answer:\n{ex.reference.strip()}\n"


def meta_prompt(demos: Sequence[Example], family: str) -> str:
    """Ask for one general, example-free instruction from a few solved demonstrations."""
    blocks = "\n".join(_demo_block(i + 1, d, family) for i, d in enumerate(demos))
    return (
        "## Examples\n"
        "The examples below are for reference only. Do NOT solve or answer them again.\n\n"
        f"{blocks}\n"
        "## Your Task now\n"
        "Give me ONE concise, high-level instruction that would help someone solve similar tasks correctly.\n"
        "Rules:\n"
        "- General rules only: no names, numbers or values taken from the examples.\n"
        "- Do not write code, an answer choice or a tool call.\n"
        "- Write only 3-4 sentences.\n\n"
        "Output ONLY the instruction text, nothing else:"
    )


def plan_prompts(examples: Sequence[Example], num_demos: int, seed: int, max_prompts: int = MAX_PROMPTS,
                 task: object = None) -> list[tuple[list[str], str]]:
    """``min(N // num_demos, max_prompts)`` (at least 1) meta-prompts of seeded random demonstrations,
    each as ``(demo ids, prompt text)``."""
    rng = random.Random(seed)
    count = max(1, min(len(examples) // max(num_demos, 1), max_prompts))
    plans = []
    for _ in range(count):
        demos = rng.sample(list(examples), min(num_demos, len(examples)))
        family = family_of(demos[0], task)
        plans.append(([d.id for d in demos], meta_prompt(demos, family)))
    return plans


def induced_instructions(
    examples: Sequence[Example], generate: Generate, *, num_demos: int, seed: int, model_tag: str,
    max_prompts: int = MAX_PROMPTS, folder: Path | None = None, task: object = None,
) -> list[dict]:
    """``[{"instruction", "demo_ids"}]``, generated on the first call and read from the cache afterwards."""
    plans = plan_prompts(examples, num_demos, seed, max_prompts, task)
    key = hashlib.sha256(json.dumps([model_tag, plans]).encode("utf-8")).hexdigest()[:16]
    folder = folder or cache_dir() / "induction" / _safe(model_tag)
    path = folder / f"induction_{num_demos}-demos_{len(plans)}-prompts_{key}.json"
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    texts = generate([p for _, p in plans])
    records = [{"instruction": t.strip(), "demo_ids": ids} for (ids, _), t in zip(plans, texts, strict=True)]
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(records, indent=1), encoding="utf-8")
    os.replace(tmp, path)
    return records


def assign_instructions(examples: Sequence[Example], records: Sequence[dict], num_contexts: int,
                        seed: int) -> dict[str, list[str]]:
    """Per example, K instructions drawn uniformly with replacement (seeded), never one induced from it."""
    rng = random.Random(seed)
    usable = [r for r in records if r["instruction"]]
    everyone = [r["instruction"] for r in usable]
    # Only the few examples that were demonstrations (≤ prompts × demos) need a filtered list; the
    # rest share one, so a large data set (MedMCQA's 180k) costs O(N), not O(N × prompts).
    demo_of: set[str] = {i for r in usable for i in r["demo_ids"]}
    out: dict[str, list[str]] = {}
    for ex in examples:
        allowed = everyone if ex.id not in demo_of else [r["instruction"] for r in usable if ex.id not in r["demo_ids"]]
        out[ex.id] = [rng.choice(allowed) if allowed else FALLBACK_INSTRUCTION for _ in range(num_contexts)]
    return out


def _safe(tag: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in tag.strip("/").split("/")[-1]) or "model"
