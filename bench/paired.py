"""A ratio from paired rounds, with how sure one run can be of it.

bench/audit.py runs audit-on and audit-off one after the other in each round, so each
round gives one ratio measured under nearly the same machine conditions. On a small
shared machine those per-round ratios scatter widely (±8 % per 10 s round was seen on
2 cores), so the mean of two rounds can land on either side of a 0.90x target by
chance. This module turns the rounds into an estimate with a 95 % confidence interval
and a verdict that says when the rounds cannot decide.

Ratios are averaged as logarithms (the geometric mean): a round at 0.8x and one at
1.25x cancel out, as they should for a ratio. The interval is Student's t over the
rounds' log ratios, which treats rounds as independent samples: rounds of several runs
(``bench/audit.py --pool``) can be combined the same way.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["RatioEstimate", "estimate", "t_quantile", "verdict"]

#: Two-sided 95 % quantiles of Student's t (the 0.975 quantile) for 1..30 degrees of
#: freedom, from the standard tables.
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip
_Z975 = 1.959964


def t_quantile(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (``df`` >= 1).

    From the table up to 30, beyond by the Cornish-Fisher expansion around the normal
    quantile (within 0.001 of the exact value there)."""
    if df < 1:
        raise ValueError("Student's t needs at least one degree of freedom")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


@dataclass(frozen=True, slots=True)
class RatioEstimate:
    """The geometric mean of per-round ratios and its 95 % interval (None from one round)."""

    mean: float
    low: float | None
    high: float | None
    rounds: int

    def interval_text(self) -> str:
        if self.low is None or self.high is None:
            return "-"
        return f"{self.low:.2f}-{self.high:.2f}x"


def estimate(ratios: Sequence[float]) -> RatioEstimate | None:
    """The estimate from per-round ratios (positive numbers); None without any."""
    logs = [math.log(r) for r in ratios if r > 0 and math.isfinite(r)]
    if len(logs) != len(ratios):
        raise ValueError("per-round ratios must be positive and finite")
    if not logs:
        return None
    mean = statistics.fmean(logs)
    if len(logs) == 1:
        return RatioEstimate(math.exp(mean), None, None, 1)
    half = t_quantile(len(logs) - 1) * statistics.stdev(logs) / math.sqrt(len(logs))
    return RatioEstimate(math.exp(mean), math.exp(mean - half), math.exp(mean + half), len(logs))


def verdict(est: RatioEstimate | None, goal: float) -> str:
    """``PASS`` or ``MISS`` when the interval lies on one side of ``goal``; otherwise
    what the mean says, marked as not proven by these rounds."""
    if est is None:
        return "n/a"
    if est.low is None or est.high is None:
        return ("PASS" if est.mean >= goal else "MISS") + " (1 round, no interval)"
    if est.low >= goal:
        return "PASS"
    if est.high < goal:
        return "MISS"
    return "unsure, mean " + ("meets" if est.mean >= goal else "misses") + " it"
