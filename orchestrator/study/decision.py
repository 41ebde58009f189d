"""Paired comparisons over seeds, and when they are decided: a method against its baseline, seed by seed.

    diff = paired_difference({1: 0.71, 2: 0.69, 3: 0.74}, {1: 0.70, 2: 0.70, 3: 0.71})
    diff.mean, diff.std, diff.ci95, diff.wins        # +0.0100, 0.0200, (-0.0397, 0.0597), 2
    decide(diff, margin=0.01)                         # Decision.UNDECIDED: the interval straddles 0 and the margin
    seeds_needed(diff)                                # 18: seeds for an effect this size and spread to exclude 0
    probability_of_improvement(diff)                  # 0.77: paired bootstrap over seeds

Each seed gives one difference (configuration minus baseline, same seed, same data); the mean, the sample
standard deviation, a 95% Student-t interval and the number of seeds where the configuration is higher
describe them. With one seed the spread is unknown (NaN) and no interval is claimed. A comparison is decided
when its interval excludes 0 (beats / loses) or lies inside ±margin (equivalent); three seeds give a t
quantile of 4.30 (df 2), wide enough that float rounding in one seed can flip an undecided pair, so
sequential confirmation adds seeds until one of those holds (docs/studies.md, "Decisive verdicts").
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum


class Decision(StrEnum):
    BEATS = "beats"
    LOSES = "loses"
    EQUIVALENT = "equivalent"
    UNDECIDED = "undecided"


@dataclass(frozen=True)
class PairedDifference:
    seeds: tuple[int, ...]
    differences: tuple[float, ...]

    @property
    def n(self) -> int:
        return len(self.differences)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.differences) if self.differences else math.nan

    @property
    def std(self) -> float:
        return statistics.stdev(self.differences) if self.n > 1 else math.nan

    @property
    def ci95(self) -> tuple[float, float]:
        if self.n < 2:
            return math.nan, math.nan
        half = t_quantile(self.n - 1) * self.std / math.sqrt(self.n)
        return self.mean - half, self.mean + half

    @property
    def wins(self) -> int:
        return sum(d > 0 for d in self.differences)


def t_quantile(df: int, level: float = 0.975) -> float:
    from scipy.stats import t

    return float(t.ppf(level, df))


def paired_difference(a: Mapping[int, float], b: Mapping[int, float]) -> PairedDifference:
    """a[seed] - b[seed] over the seeds both have (a seed one side lacks, e.g. a failed run, is left out)."""
    seeds = tuple(sorted(set(a) & set(b)))
    return PairedDifference(seeds, tuple(float(a[s]) - float(b[s]) for s in seeds))


def decide(diff: PairedDifference, margin: float) -> Decision:
    """BEATS / LOSES when the 95% interval excludes 0, EQUIVALENT when it lies inside ±margin, else UNDECIDED
    (always with fewer than two seeds: no interval)."""
    low, high = diff.ci95
    if math.isnan(low):
        return Decision.UNDECIDED
    if low > 0:
        return Decision.BEATS
    if high < 0:
        return Decision.LOSES
    if -margin < low and high < margin:
        return Decision.EQUIVALENT
    return Decision.UNDECIDED


def seeds_needed(diff: PairedDifference, limit: int = 1000) -> int | None:
    """About how many seeds a true effect of the observed mean and spread needs before its 95% interval excludes
    0 (the smallest n with t(n-1) * std / sqrt(n) < |mean|); None beyond `limit` or without a spread."""
    if diff.n < 2 or not diff.std > 0 or diff.mean == 0:
        return None
    for n in range(2, limit + 1):
        if t_quantile(n - 1) * diff.std / math.sqrt(n) < abs(diff.mean):
            return n
    return None


def probability_of_improvement(diff: PairedDifference, draws: int = 10_000, seed: int = 0) -> float:
    """Paired bootstrap: the share of resamples of the seeds (with replacement) whose mean difference is above 0
    (ties count half). NaN without seeds; seeded, so the same differences give the same number."""
    if diff.n == 0:
        return math.nan
    rng = random.Random(seed)
    values, n = diff.differences, diff.n
    above = 0.0
    for _ in range(draws):
        total = sum(values[rng.randrange(n)] for _ in range(n))
        above += 1.0 if total > 0 else 0.5 if total == 0 else 0.0
    return above / draws
