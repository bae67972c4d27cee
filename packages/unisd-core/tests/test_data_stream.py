"""DataStream: a seeded permutation per epoch, O(1) per draw, resumable from its cursor."""

import random

import pytest

from unisd.data.tasks import Example
from unisd.run import DataStream


def reference_order(n: int, seed: int, draws: int) -> list[int]:
    """The stream's definition, computed the slow way: each draw reshuffles its epoch from scratch."""
    out = []
    for cursor in range(draws):
        epoch, index = divmod(cursor, n)
        order = list(range(n))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        out.append(order[index])
    return out


@pytest.mark.parametrize(("n", "seed"), [(1, 0), (7, 3), (50, 12345)])
def test_draws_follow_the_per_epoch_permutation_across_epochs_and_resume(n, seed):
    examples = [Example(str(i), f"p{i}", f"r{i}") for i in range(n)]
    rng = random.Random(n + seed)
    draws = 3 * n + 5  # crosses several epoch boundaries
    stream = DataStream(examples, seed)
    taken = []
    while len(taken) < draws:  # uneven batch sizes, as micro-batches and resumes produce
        taken += [int(e.id) for e in stream.take(rng.randint(1, 4))]
    assert taken == reference_order(n, seed, len(taken))
    for cursor in (0, n - 1, n, 2 * n + 1):  # a stream resumed at any cursor continues identically
        resumed = DataStream(examples, seed, cursor=cursor)
        assert [int(e.id) for e in resumed.take(n + 2)] == taken[cursor : cursor + n + 2]
