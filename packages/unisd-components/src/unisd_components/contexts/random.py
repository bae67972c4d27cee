"""Random donors: for each example, K·demo_k distinct other examples drawn with a seeded generator."""

from __future__ import annotations

import gc
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np

from unisd.data.tasks import Example
from unisd.errors import ConfigError


def _skip_self(draws: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Indices drawn from ``range(n − 1)`` mapped onto the others of each row's example: those at or
    past the example's own index move up by one, so the example itself is never drawn."""
    return draws + (draws >= rows[:, None])


def _has_repeat(draws: np.ndarray) -> np.ndarray:
    """Per row, whether it names a donor twice."""
    ordered = np.sort(draws, axis=1)
    return (ordered[:, 1:] == ordered[:, :-1]).any(axis=1)


def donor_matrix(n: int, count: int, seed: int) -> np.ndarray:
    """``[n, count]``: row i holds ``count`` distinct indices of ``range(n)``, none of them i.

    O(n·count): each index is drawn from the n−1 others directly (no list of the others per
    example, which made the old draw O(N²): about an hour for MedMCQA's 180k examples). Rows that
    drew a donor twice are redrawn, rarely when count ≪ n; small pools use a permutation per row.
    Deterministic for a seed (numpy's PCG64).
    """
    rng = np.random.default_rng(seed)
    if n - 1 <= 4 * count:  # a small pool: repeats would be common, permute the others instead
        return np.stack([_skip_self(rng.permutation(n - 1)[None, :count], np.array([i]))[0] for i in range(n)])
    rows = np.arange(n)
    draws = _skip_self(rng.integers(0, n - 1, size=(n, count)), rows)
    bad = _has_repeat(draws)
    while bad.any():
        draws[bad] = _skip_self(rng.integers(0, n - 1, size=(int(bad.sum()), count)), rows[bad])
        bad = _has_repeat(draws)
    return draws


def random_donors(examples: Sequence[Example], num_contexts: int, demo_k: int, seed: int) -> dict[str, list[list[int]]]:
    """``{example id: [[donor index, ...] per context]}``; never the example itself.

    Donors are drawn without replacement when the pool allows it, and cycled when K·demo_k exceeds
    the other examples. The draw depends only on ``seed`` and the examples' order.
    """
    n = len(examples)
    if n < 2:
        raise ConfigError("agreement with random contexts needs at least 2 training examples (donors are other examples)")
    need = num_contexts * demo_k
    take = min(need, n - 1)
    # Fewer others than donors wanted: cycle through them (column m takes donor m mod take).
    picked = donor_matrix(n, take, seed)[:, np.arange(need) % take].reshape(n, num_contexts, demo_k)
    with _gc_paused():
        return dict(zip((ex.id for ex in examples), picked.tolist(), strict=True))


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Build many small lists without the cyclic garbage collector: its passes over the growing
    heap, not the draw, took most of the time for 200k examples (and lists of ints hold no cycles)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
