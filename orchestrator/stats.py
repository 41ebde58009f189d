"""Paired comparisons over seeds: a method against its baseline, seed by seed, with the spread.

    diff = paired_difference({0: 0.71, 1: 0.69, 2: 0.74}, {0: 0.70, 1: 0.70, 2: 0.71})
    diff.mean, diff.std, diff.ci95, diff.wins        # +0.0100, 0.0200, (-0.0397, 0.0597), 2

Each seed gives one difference (configuration minus baseline, same seed, same data); the mean, the sample
standard deviation, a 95% Student-t interval and the number of seeds where the configuration is higher
describe them. With one seed the spread is unknown (NaN) and no interval is claimed.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass


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
        from scipy.stats import t

        half = t.ppf(0.975, self.n - 1) * self.std / math.sqrt(self.n)
        return self.mean - half, self.mean + half

    @property
    def wins(self) -> int:
        return sum(d > 0 for d in self.differences)

    def verdict(self) -> str:
        """'higher' when the whole 95% interval is above 0, 'lower' when below, else 'no clear difference'."""
        low, high = self.ci95
        if math.isnan(low):
            return "higher" if self.mean > 0 else "lower" if self.mean < 0 else "no clear difference"
        return "higher" if low > 0 else "lower" if high < 0 else "no clear difference"


def paired_difference(a: Mapping[int, float], b: Mapping[int, float]) -> PairedDifference:
    """a[seed] - b[seed] over the seeds both have (a seed one side lacks, e.g. a failed run, is left out)."""
    seeds = tuple(sorted(set(a) & set(b)))
    return PairedDifference(seeds, tuple(float(a[s]) - float(b[s]) for s in seeds))


def points(value: float, digits: int = 1, sign: bool = True) -> str:
    """An accuracy difference (a fraction) in percentage points, e.g. '+2.9'."""
    return "n/a" if math.isnan(value) else f"{100 * value:{'+' if sign else ''}.{digits}f}"
