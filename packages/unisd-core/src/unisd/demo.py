"""The embedded demo task: short answers the bundled SmolLM2 gets wrong alone but right with a reference.

Two kinds of items, generated deterministically: rewriting two words in capital letters, and adding two
2-digit numbers, each asking for the bare answer. SmolLM2-135M-Instruct as the student explains instead
of answering (accuracy ≈ 0); shown the reference, as the teacher, it answers in the requested format
about two times in three. That gap is what self-distillation can close.
"""

from __future__ import annotations

import random
import re
from typing import ClassVar

from .tasks import Example, Score, Task

WORDS = (
    "apple river stone cloud green table music winter garden silver orange pencil window forest candle "
    "rocket planet yellow bridge castle summer paper butter copper dragon island marble meadow ocean "
    "pepper rabbit shadow thunder tiger violet wagon basket honey lemon mirror"
).split()
SPLIT_SIZES = {"train": 384, "test": 48}
SPLIT_SEEDS = {"train": 1, "test": 2}


def _uppercase_item(rng: random.Random) -> tuple[str, str, dict]:
    a, b = rng.sample(WORDS, 2)
    prompt = f"Rewrite '{a} {b}' in capital letters. Reply with only the rewritten words."
    return prompt, f"{a.upper()} {b.upper()}", {"kind": "uppercase", "key": (a, b)}


def _addition_item(rng: random.Random) -> tuple[str, str, dict]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"What is {a} + {b}? Reply with only the number.", str(a + b), {"kind": "addition", "key": (a, b)}


def _items(split: str) -> list[Example]:
    # Test items are drawn first from a separate stream and excluded from train, so no test item leaks.
    test_keys: set = set()
    if split == "train":
        test_keys = {(ex.meta["kind"], tuple(ex.meta["key"])) for ex in _items("test")}
    rng = random.Random(SPLIT_SEEDS[split])
    out, seen = [], set(test_keys)
    while len(out) < SPLIT_SIZES[split]:
        maker = _uppercase_item if len(out) % 2 == 0 else _addition_item
        prompt, answer, meta = maker(rng)
        key = (meta["kind"], tuple(meta["key"]))
        if key in seen:
            continue
        seen.add(key)
        meta["key"] = list(meta["key"])
        out.append(Example(f"demo-{split}-{len(out)}", prompt, answer, meta))
    return out


def first_answer_line(completion: str) -> str | None:
    """The first non-empty line without surrounding quotes and final punctuation, or None."""
    for line in completion.strip().splitlines():
        cleaned = re.sub(r"^[\s'\"`*]+|[\s'\"`*.!]+$", "", line)
        if cleaned:
            return cleaned
    return None


class DemoTask(Task):
    """Uppercase rewriting and 2-digit addition, answered with the bare answer (built in, offline)."""

    name: ClassVar[str] = "demo"
    description: ClassVar[str] = "built-in: uppercase rewriting + 2-digit addition, bare answers"
    splits: ClassVar[tuple[str, ...]] = ("train", "test")
    max_new_tokens: ClassVar[int] = 24

    def load(self, split: str, path: str | None = None, limit: int | None = None) -> list[Example]:
        from .errors import UsageError

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
        extracted = first_answer_line(completion)
        if extracted is None:
            return Score(0.0, None, "unparsed")
        ok = extracted == example.reference
        return Score(1.0 if ok else 0.0, extracted, "correct" if ok else "wrong")
