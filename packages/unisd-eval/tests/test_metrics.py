"""pass@k against the closed form, and the aggregation helpers."""

from __future__ import annotations

import random
from math import comb

import pytest

from unisd_eval.metrics import grouped_mean, ks_for, mean_pass_at_k, pass_at_k

# 1 - C(3, k) / C(5, k) for n = 5 samples with c = 2 correct, worked by hand.
HAND = {1: 1 - 3 / 5, 2: 1 - 3 / 10, 3: 1 - 1 / 10, 4: 1.0, 5: 1.0}


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_pass_at_k_n5_c2_matches_closed_form(k):
    assert pass_at_k(5, 2, k) == pytest.approx(HAND[k], abs=1e-12)
    assert pass_at_k(5, 2, k) == pytest.approx(1 - comb(3, k) / comb(5, k), abs=1e-12)


def test_pass_at_k_random_cases_match_exact_binomials():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 60)
        c = rng.randint(0, n)
        k = rng.randint(1, n)
        exact = 1.0 - comb(n - c, k) / comb(n, k)  # float64 reference from exact integers
        assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)


def test_pass_at_k_edges_and_errors():
    assert pass_at_k(10, 0, 3) == 0.0
    assert pass_at_k(10, 10, 1) == 1.0
    assert pass_at_k(1000, 1, 1) == pytest.approx(0.001)
    for bad in [(0, 0, 1), (5, 6, 1), (5, 2, 0), (5, 2, 6)]:
        with pytest.raises(ValueError):
            pass_at_k(*bad)


def test_mean_pass_at_k_and_ks():
    assert mean_pass_at_k([(5, 2), (5, 5)], 1) == pytest.approx((0.4 + 1.0) / 2)
    assert mean_pass_at_k([(5, 2), (1, 1)], 2) is None  # a problem with fewer than k samples
    assert ks_for(1) == [1] and ks_for(5) == [1, 2, 5] and ks_for(12) == [1, 2, 5, 10]


def test_grouped_mean_skips_missing_keys():
    assert grouped_mean(["a", "b", "a", None], [1.0, 0.0, 0.0, 1.0]) == {"a": 0.5, "b": 0.0}
