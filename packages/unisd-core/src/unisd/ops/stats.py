"""Mean, standard deviation and a Student-t confidence interval over a handful of seeds.

The t quantile is computed here rather than taken from scipy: scipy is not a dependency of
unisd-core, and for the integer degrees of freedom a seed count gives, Student's t distribution has
a closed-form CDF (Abramowitz & Stegun 26.7.3/26.7.4), which bisection inverts to full float
precision. No table, no approximation.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from dataclasses import dataclass

CONFIDENCE = 0.95
INTERVAL_NAME = "Student t"


def t_two_sided_mass(t: float, df: int) -> float:
    """P(|T| ≤ t) for Student's t with ``df`` (integer ≥ 1) degrees of freedom."""
    if df < 1 or int(df) != df:
        raise ValueError(f"degrees of freedom must be an integer ≥ 1, got {df}")
    if t <= 0:
        return 0.0
    theta = math.atan(t / math.sqrt(df))
    cos2 = math.cos(theta) ** 2
    if df % 2 == 1:
        # (2/π)(θ + sinθ (cosθ + (2/3)cos³θ + … + (2·4···(df−3))/(1·3···(df−2)) cos^(df−2)θ))
        term, total = math.cos(theta), 0.0
        for j in range(1, (df - 1) // 2 + 1):
            total += term
            term *= cos2 * (2 * j) / (2 * j + 1)
        return (2 / math.pi) * (theta + math.sin(theta) * total) if df > 1 else 2 * theta / math.pi
    # sinθ (1 + (1/2)cos²θ + (1·3)/(2·4)cos⁴θ + … + (1·3···(df−3))/(2·4···(df−2)) cos^(df−2)θ)
    term, total = 1.0, 0.0
    for j in range(1, df // 2 + 1):
        total += term
        term *= cos2 * (2 * j - 1) / (2 * j)
    return math.sin(theta) * total


@functools.lru_cache(maxsize=256)  # curves ask for the same few (confidence, df) at every step
def t_quantile(confidence: float, df: int) -> float:
    """The two-sided critical value: ``t`` with P(|T| ≤ t) = ``confidence`` (e.g. 4.303 for 0.95, df 2)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    low, high = 0.0, 1.0
    while t_two_sided_mass(high, df) < confidence:
        high *= 2
    for _ in range(200):  # bisection: the mass is increasing in t
        mid = (low + high) / 2
        if t_two_sided_mass(mid, df) < confidence:
            low = mid
        else:
            high = mid
        if high - low <= 1e-12 * high:
            break
    return (low + high) / 2


@dataclass(frozen=True)
class Summary:
    """Statistics of one metric over the seeds of one group (NaN where undefined)."""

    n: int
    mean: float
    sd: float  # sample standard deviation (n − 1 in the denominator)
    half_width: float  # of the confidence interval: t(confidence, n − 1) · sd / √n
    confidence: float = CONFIDENCE

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width


def summarize(values: Iterable[float], confidence: float = CONFIDENCE) -> Summary:
    """Mean, sd and t-interval of the finite ``values``; with one value the sd and interval are NaN
    (one seed says nothing about the spread), with none everything is."""
    xs = [float(v) for v in values if v is not None and math.isfinite(v)]
    n = len(xs)
    if n == 0:
        return Summary(0, math.nan, math.nan, math.nan, confidence)
    mean = math.fsum(xs) / n
    if n == 1:
        return Summary(1, mean, math.nan, math.nan, confidence)
    if all(x == xs[0] for x in xs):  # exactly 0, not the rounding residue of the mean (1e-16)
        return Summary(n, xs[0], 0.0, 0.0, confidence)
    sd = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))
    return Summary(n, mean, sd, t_quantile(confidence, n - 1) * sd / math.sqrt(n), confidence)


def interval_description(confidence: float = CONFIDENCE) -> str:
    """One sentence for reports: what the ± means."""
    pct = f"{confidence * 100:g}%"
    return (f"± is the half-width of a {pct} confidence interval over seeds, t · sd/√n with t the two-sided "
            f"{INTERVAL_NAME} quantile for n − 1 degrees of freedom (exact, computed by unisd); sd is the sample "
            "standard deviation; one seed gives no interval")
