"""95% confidence intervals of a mean: Student's t interval, exact t quantiles without scipy.

    half_width <- t(0.975, n - 1) * s / sqrt(n)        s: sample standard deviation (n - 1 in the denominator)
    interval   <- mean -/+ half_width                  (none for a single value)

The t interval assumes roughly normal means, which holds for the dozens of images per (method, N)
cell of a benchmark; with a handful of images it is wide, as it should be. Deterministic, unlike a
bootstrap, so a report rendered twice shows the same numbers.
"""

from __future__ import annotations

import math
from typing import Iterable, NamedTuple

CONFIDENCE = 0.95


class Interval(NamedTuple):
    """Mean of ``count`` values and its confidence interval (low = high = None below two values)."""

    mean: float
    low: float | None
    high: float | None
    count: int  # type: ignore[assignment]  # the field shadows tuple.count, as it may


def mean_interval(values: Iterable[float], confidence: float = CONFIDENCE) -> Interval | None:
    """The mean and its two-sided Student t interval; None for no values."""
    values = [float(value) for value in values]
    count = len(values)
    if not count:
        return None
    mean = math.fsum(values) / count
    if count < 2:
        return Interval(mean, None, None, count)
    deviation = math.sqrt(math.fsum((value - mean) ** 2 for value in values) / (count - 1))
    half_width = t_quantile(0.5 + confidence / 2, count - 1) * deviation / math.sqrt(count)
    return Interval(mean, mean - half_width, mean + half_width, count)


def t_quantile(probability: float, df: int) -> float:
    """The ``probability`` quantile of Student's t with ``df`` degrees of freedom (0.5 < p < 1),
    by bisection on the exact distribution function."""
    if not 0.5 < probability < 1 or df < 1:
        raise ValueError(f"t_quantile({probability}, {df}): need 0.5 < p < 1 and df >= 1")
    low, high = 0.0, 1.0
    while t_cdf(high, df) < probability:
        high *= 2
    for _ in range(200):
        middle = (low + high) / 2
        low, high = (middle, high) if t_cdf(middle, df) < probability else (low, middle)
        if high - low <= 1e-12 * high:
            break
    return (low + high) / 2


def t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's t with integer ``df``, from the finite series of Abramowitz & Stegun
    26.7.3 (odd df) and 26.7.4 (even df) for A(t | df) = P(|T| <= |t|)."""
    theta = math.atan(abs(t) / math.sqrt(df))
    cos2 = math.cos(theta) ** 2
    if df % 2:  # A = 2/pi * (theta + sin(theta) * cos(theta) * (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ...)), df - 2 powers
        term, total = 1.0, 1.0 if df > 1 else 0.0
        for k in range(1, (df - 1) // 2):
            term *= cos2 * (2 * k) / (2 * k + 1)
            total += term
        inside = 2 / math.pi * (theta + math.sin(theta) * math.cos(theta) * total)
    else:  # A = sin(theta) * (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ...), up to cos^(df - 2)
        term, total = 1.0, 1.0
        for k in range(1, df // 2):
            term *= cos2 * (2 * k - 1) / (2 * k)
            total += term
        inside = math.sin(theta) * total
    return 0.5 + inside / 2 if t >= 0 else 0.5 - inside / 2
