"""Control runs: training that keeps everything but the thing whose effect is in question.

``reference_control = "shuffled"`` gives every training example *another* example's reference, so
the teacher still sees a well-formed demonstration in the right template, just not the answer to
this question. A gain that survives the control comes from the format (or from training at all),
not from the reference's content; the gap between plain self-distillation and its control is what
the right reference is worth.
"""

from __future__ import annotations

import random
from dataclasses import replace

from ..errors import DataError
from .tasks import Example


def shuffle_references(examples: list[Example], seed: int) -> list[Example]:
    """The examples with their references permuted so that none keeps a reference equal to its own.

    A seeded derangement over the examples, repaired where two examples share the same reference
    text (a swap between them would change nothing). Prompts, ids and ``meta`` stay with their
    example; only ``reference`` moves. Deterministic for a given ``seed`` and example order.
    """
    n = len(examples)
    if n < 2:
        raise DataError(f"--reference-control shuffled needs at least 2 training examples, got {n}")
    refs = [e.reference for e in examples]
    if len(set(refs)) < 2:
        raise DataError("--reference-control shuffled: every training example has the same reference, "
                        "so no example can be shown another one")
    rng = random.Random(seed * 7_919 + 17)
    order = list(range(n))
    rng.shuffle(order)
    # A cyclic shift of a random order is a derangement: example order[i] gets order[i+1]'s reference.
    target = [0] * n
    for i in range(n):
        target[order[i]] = order[(i + 1) % n]
    # Repair positions whose new reference is textually their own (duplicated references): swap the
    # assignment with a position where the exchange leaves both different from their own.
    for i in range(n):
        if refs[target[i]] != refs[i]:
            continue
        for j in rng.sample(range(n), n):
            if refs[target[j]] != refs[i] and refs[target[i]] != refs[j]:
                target[i], target[j] = target[j], target[i]
                break
    return [replace(e, reference=refs[target[i]]) for i, e in enumerate(examples)]
