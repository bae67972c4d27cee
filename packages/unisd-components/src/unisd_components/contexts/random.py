"""Random donors: for each example, K·demo_k distinct other examples drawn with a seeded generator."""

from __future__ import annotations

import random as _random
from collections.abc import Sequence

from unisd.errors import ConfigError
from unisd.tasks import Example


def random_donors(examples: Sequence[Example], num_contexts: int, demo_k: int, seed: int) -> dict[str, list[list[int]]]:
    """``{example id: [[donor index, ...] per context]}``; never the example itself.

    Donors are drawn without replacement when the pool allows it, and cycled when K·demo_k exceeds
    the other examples. The draw depends only on ``seed`` and the examples' order.
    """
    if len(examples) < 2:
        raise ConfigError("agreement with random contexts needs at least 2 training examples (donors are other examples)")
    rng = _random.Random(seed)
    need = num_contexts * demo_k
    out: dict[str, list[list[int]]] = {}
    for i, ex in enumerate(examples):
        others = [j for j in range(len(examples)) if j != i]
        picked = rng.sample(others, min(need, len(others)))
        picked = [picked[n % len(picked)] for n in range(need)]
        out[ex.id] = [picked[k * demo_k:(k + 1) * demo_k] for k in range(num_contexts)]
    return out
