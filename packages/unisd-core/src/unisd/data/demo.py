"""The embedded demo task: short answers the bundled SmolLM2 gets wrong alone but right with a reference.

Two kinds of items, generated deterministically: rewriting two words in capital letters, and adding two
2-digit numbers, each asking for the bare answer. SmolLM2-135M-Instruct as the student explains instead
of answering (accuracy ≈ 0); shown the reference, as the teacher, it answers in the requested format
about two times in three. That gap is what self-distillation can close.

The test split has 384 items so that a difference of 0.05 in accuracy shows: an accuracy's standard
error sqrt(p(1-p)/n) is at most 0.026 at n = 384 (0.072 at n = 48, where 0.05 is noise). The default
demo evaluates only the first 48 (``eval_limit`` in data/demo.toml) to stay within its time budget;
``--eval-limit 384`` (or ``eval_limit = 384``) uses them all. Its first 48 items are the original test split and
the train split is unchanged: train excludes those 48, the other 336 exclude train.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import ClassVar

from .tasks import Example, Score, Task

WORDS = (
    "apple river stone cloud green table music winter garden silver orange pencil window forest candle "
    "rocket planet yellow bridge castle summer paper butter copper dragon island marble meadow ocean "
    "pepper rabbit shadow thunder tiger violet wagon basket honey lemon mirror"
).split()
SPLIT_SIZES = {"train": 384, "test": 384}
SPLIT_SEEDS = {"train": 1, "test": 2}
FIRST_TEST = 48  # the original test split: train excludes these; later test items exclude train


def _uppercase_item(rng: random.Random) -> tuple[str, str, dict]:
    a, b = rng.sample(WORDS, 2)
    prompt = f"Rewrite '{a} {b}' in capital letters. Reply with only the rewritten words."
    return prompt, f"{a.upper()} {b.upper()}", {"kind": "uppercase", "key": (a, b)}


def _addition_item(rng: random.Random) -> tuple[str, str, dict]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"What is {a} + {b}? Reply with only the number.", str(a + b), {"kind": "addition", "key": (a, b)}


def _items(split: str) -> list[Example]:
    if split == "train":
        return _draw("train", SPLIT_SIZES["train"], _keys(_draw("test", FIRST_TEST, set())))
    # The first FIRST_TEST draws never meet a train key (train excluded them), so they are the same
    # items as before the split grew; only the later ones skip train's keys.
    return _draw("test", SPLIT_SIZES["test"], _keys(_items("train")))


def _keys(examples: list[Example]) -> set:
    return {(ex.meta["kind"], tuple(ex.meta["key"])) for ex in examples}


def _draw(split: str, size: int, exclude: set) -> list[Example]:
    """``size`` distinct items from the split's own seeded stream, skipping the keys in ``exclude``."""
    rng = random.Random(SPLIT_SEEDS[split])
    out, seen = [], set(exclude)
    while len(out) < size:
        maker = _uppercase_item if len(out) % 2 == 0 else _addition_item
        prompt, answer, meta = maker(rng)
        key = (meta["kind"], tuple(meta["key"]))
        if key in seen:
            continue
        seen.add(key)
        meta["key"] = list(meta["key"])
        out.append(Example(f"demo-{split}-{len(out)}", prompt, answer, meta))
    return out


def _strip_answer(text: str) -> str:
    """Without surrounding whitespace, quotes, emphasis and final punctuation."""
    return re.sub(r"^[\s'\"`*]+|[\s'\"`*.!]+$", "", text)


def first_answer_line(completion: str) -> str | None:
    """The first non-empty line without surrounding quotes and final punctuation, or None."""
    for line in completion.strip().splitlines():
        cleaned = _strip_answer(line)
        if cleaned:
            return cleaned
    return None


@dataclass
class DemoScore(Score):
    """A demo verdict; ``strict`` also requires that nothing but the answer was written."""

    strict: bool = False


class DemoTask(Task):
    """Uppercase rewriting and 2-digit addition, answered with the bare answer (built in, offline)."""

    name: ClassVar[str] = "demo"
    description: ClassVar[str] = "built-in: uppercase rewriting + 2-digit addition, bare answers"
    splits: ClassVar[tuple[str, ...]] = ("train", "test")
    max_new_tokens: ClassVar[int] = 24

    def load(self, split: str, path: str | None = None, limit: int | None = None) -> list[Example]:
        from ..errors import UsageError

        if split not in SPLIT_SIZES:
            raise UsageError(f"task demo has splits {', '.join(SPLIT_SIZES)}, not {split!r}")
        items = _items(split)
        return items[:limit] if limit else items

    def negative(self, example: Example) -> str | None:
        """A deterministic wrong answer in the reference's layout, for the contrastive component.

        The demo's mistakes are the ones its student makes: a sum off by a little, the two words in
        the wrong order. Needing no model, they let ``--preset unisd-star`` run without a negatives cache.
        """
        kind, key = example.meta.get("kind"), example.meta.get("key")
        if not isinstance(key, list | tuple) or len(key) != 2:
            return None
        if kind == "addition":
            a, b = (int(v) for v in key)
            # Off by one or by ten (carry mistakes), chosen by the operands so it is fixed per item.
            return str(a + b + (1, -1, 10, -10)[(a * 7 + b) % 4])
        if kind == "uppercase":
            a, b = (str(v) for v in key)
            return f"{b.upper()} {a.upper()}"  # both words capitalised, in the wrong order
        return None

    def score(self, example: Example, completion: str) -> Score:
        """First-line scoring (``value``), and ``strict``: the whole completion is the bare answer.

        The first line alone counts ``"CLOUD TABLE\\n\\nThis is an example for a"`` as correct, although
        the student went on to copy the teacher's template; ``strict`` does not.
        """
        extracted = first_answer_line(completion)
        if extracted is None:
            return DemoScore(0.0, None, "unparsed")
        ok = extracted == example.reference
        strict = ok and _strip_answer(completion) == example.reference
        return DemoScore(1.0 if ok else 0.0, extracted, "correct" if ok else "wrong", strict=strict)

    def aggregate(self, scores: list[Score]) -> dict[str, float]:
        """``accuracy`` (first line) and ``strict_accuracy`` (the whole completion is the answer)."""
        metrics = super().aggregate(scores)
        metrics["strict_accuracy"] = sum(bool(getattr(s, "strict", False)) for s in scores) / max(len(scores), 1)
        return metrics
