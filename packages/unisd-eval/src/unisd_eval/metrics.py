"""pass@k and small aggregation helpers shared by the evaluators."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with ``n`` samples of which ``c`` passed.

    ``1 - C(n-c, k) / C(n, k)``, computed as ``1 - prod_{i=n-c+1}^{n} (1 - k/i)`` so that large ``n``
    neither overflows nor loses precision in the binomials.
    """
    if n < 1 or not 0 <= c <= n:
        raise ValueError(f"pass@k needs n >= 1 and 0 <= c <= n (got n={n}, c={c})")
    if not 1 <= k <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n (got k={k}, n={n})")
    if n - c < k:
        return 1.0  # every draw of k samples contains a passing one
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def mean_pass_at_k(counts: Iterable[tuple[int, int]], k: int) -> float | None:
    """Mean pass@k over problems given ``(n, c)`` per problem; None if some problem has fewer than k samples."""
    counts = list(counts)
    if not counts or any(n < k for n, _ in counts):
        return None
    return sum(pass_at_k(n, c, k) for n, c in counts) / len(counts)


def ks_for(n_min: int) -> list[int]:
    """The k of pass@k worth reporting when every problem has at least ``n_min`` samples."""
    return [k for k in (1, 2, 5, 10, 20, 50, 100) if k <= n_min] or [1]


def mean(values: Sequence[float]) -> float:
    """Arithmetic mean; 0.0 for an empty sequence (an empty eval scores nothing)."""
    return sum(values) / len(values) if values else 0.0


def grouped_mean(keys: Sequence[str | None], values: Sequence[float]) -> dict[str, float]:
    """Mean of ``values`` per key (None keys are skipped), e.g. per-domain accuracy."""
    groups: dict[str, list[float]] = defaultdict(list)
    for key, value in zip(keys, values, strict=True):
        if key is not None and key != "":
            groups[str(key)].append(value)
    return {key: mean(vals) for key, vals in sorted(groups.items())}
