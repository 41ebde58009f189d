"""The planned looks of a sequential confirmation, and the boundaries that keep its error rates wherever it stops.

    design = Design((3, 4, 5, 6))          # the demo: 3 seeds, then one more per look, up to 6
    design.levels()                        # (0.0096, 0.0096, 0.0096, 0.0096): one-sided level of each look
    design.critical(4)                     # 4.6: the t multiplier of the interval after 4 seeds
    design.critical(4, share=1 / 3)        # Holm's first step over three comparisons (2.5% / 3 per direction)

Looking at a Student-t interval after 3, 4, 5 and 6 seeds and stopping at the first that excludes 0 calls
"beats" about 5.6% of the time when nothing differs (docs/design.md, "What a printed confidence must mean"). A
group-sequential boundary tests every look at a lower nominal level, chosen so that the chance of crossing at
ANY look is 2.5% per direction (Jennison & Turnbull 2000). Two shapes are computed, per design:

- `pocock`: one nominal level for every look (Pocock 1977; the default, docs/studies.md says why);
- `obrien_fleming`: Lan & DeMets' (1983) O'Brien-Fleming-type spending, alpha(t) = 2 - 2 Phi(z_{1-a/2} / sqrt(t))
  at information fraction t = seeds / max seeds: strict early looks, nearly the fixed-sample level at the last.

The boundary is on the t statistic of the seeds' paired differences, which is pivotal under normal differences:
its null distribution does not depend on the spread, so one calibration holds at every spread. It is calibrated
by a seeded, vectorized Monte Carlo of the null (PATHS paths of standard normal seeds; the level's Monte Carlo
error is about 2% of itself; fewer paths for designs beyond 10 seeds) and cached per design, in the process and
on disk ($NSLAB_CACHE/designs, default ~/.cache/nslab: a 4-look calibration costs 1-3 CPU-seconds, paid once
per machine instead of once per study process and per `nslab power`). A look with fewer
than 2 seeds has no interval and spends nothing. A confirmation that ends up with fewer seeds at a look than
planned (a failed run is left out) tests that look's level at the seeds it has.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

log = logging.getLogger(__name__)

ALPHA = 0.025  # per direction: at most 2.5% false "beats" and 2.5% false "loses"
PATHS = 200_000
DRAWS = 2_000_000  # normal draws per calibration at most: a long design (what more seeds would need) gets fewer paths
Boundary = Literal["pocock", "obrien_fleming"]


@dataclass(frozen=True)
class Design:
    looks: tuple[int, ...]  # seeds at each planned look, increasing
    alpha: float = ALPHA
    boundary: Boundary = "pocock"

    def __post_init__(self) -> None:
        if not self.looks or list(self.looks) != sorted(set(self.looks)) or self.looks[0] < 1:
            raise ValueError(f"a design's looks must be increasing seed counts >= 1 (got {self.looks})")

    @classmethod
    def schedule(cls, first: int, per_round: int, max_seeds: int, **kwargs) -> Design:
        """Looks at `first` seeds, then every `per_round` more, and at `max_seeds` (a study's confirmation)."""
        looks = list(range(min(first, max_seeds), max_seeds + 1, max(1, per_round)))
        return cls(tuple(looks if looks[-1] == max_seeds else [*looks, max_seeds]), **kwargs)

    @classmethod
    def fixed(cls, seeds: int) -> Design:
        """One look at a fixed number of seeds: the plain 95% Student-t interval."""
        return cls((max(1, seeds),))

    @property
    def sequential(self) -> bool:
        return sum(n >= 2 for n in self.looks) > 1

    def levels(self, share: float = 1.0) -> tuple[float, ...]:
        """The one-sided nominal level each look is tested at, for `share` of alpha (Holm's steps)."""
        return nominal_levels(self.looks, round(self.alpha * share, 12), self.boundary)

    def look_of(self, n: int) -> int:
        """The index of the last planned look at or below n seeds (0 before the first)."""
        return max(0, int(np.searchsorted(self.looks, n, side="right")) - 1)

    def critical(self, n, look: int | None = None, share: float = 1.0, df=None):
        """The t multiplier of the interval after n seeds (array or scalar) at look `look` (default: the look n
        seeds reach), with `df` degrees of freedom (default n - 1: the seeds'; more where the test examples'
        variation is part of the standard error, decision.effective_df); NaN below 2 seeds."""
        from scipy.special import stdtrit

        n = np.asarray(n, dtype=float)
        levels = np.asarray(self.levels(share))
        index = np.searchsorted(self.looks, n, side="right") - 1 if look is None else np.full(n.shape, look)
        level = levels[np.clip(index, 0, len(levels) - 1)]
        df = np.maximum(n - 1, 1) if df is None else np.maximum(np.asarray(df, dtype=float), np.maximum(n - 1, 1))
        out = np.where(n >= 2, -stdtrit(df, level), np.nan)
        return float(out) if out.ndim == 0 else out

    def extended(self, max_seeds: int) -> Design:
        """The same schedule continued to `max_seeds` (what more seeds would have needed)."""
        step = self.looks[-1] - self.looks[-2] if len(self.looks) > 1 else 1
        looks = [*self.looks, *range(self.looks[-1] + step, max_seeds + 1, step)]
        return Design(tuple(looks if looks[-1] >= max_seeds else [*looks, max_seeds]), self.alpha, self.boundary)

    def describe(self) -> str:
        """'looks at 3, 4, 5, 6 seeds; Pocock boundary: 0.96% one-sided per look (t 7.10 / 4.59 / 3.83 / 3.44)'."""
        looks = ", ".join(str(n) for n in self.looks)
        if not self.sequential:
            return f"one look at {looks} seeds: a {100 * (1 - 2 * self.alpha):g}% Student-t interval"
        levels = self.levels()
        shown = [f"{self.critical(n, look=k):.2f}" for k, n in enumerate(self.looks) if n >= 2]
        if self.boundary == "pocock":
            rule = f"Pocock boundary: {100 * levels[-1]:.2f}% one-sided at every look"
        else:
            rule = "O'Brien-Fleming-type spending: " + " / ".join(f"{100 * a:.2g}%" for a in levels) + " one-sided"
        return f"looks at {looks} seeds; {rule} (t {' / '.join(shown)})"


def t_statistics(z: np.ndarray, looks: tuple[int, ...]) -> np.ndarray:
    """(paths, looks) t statistics of the first n columns of z at each look (NaN below 2 seeds)."""
    total, squares = np.cumsum(z, axis=1), np.cumsum(z * z, axis=1)
    out = np.full((z.shape[0], len(looks)), np.nan)
    for k, n in enumerate(looks):
        if n < 2:
            continue
        mean = total[:, n - 1] / n
        var = np.maximum(squares[:, n - 1] - n * mean * mean, 0.0) / (n - 1)
        with np.errstate(divide="ignore", invalid="ignore"):
            out[:, k] = mean / np.sqrt(var / n)
    return out


@functools.lru_cache(maxsize=128)
def nominal_levels(looks: tuple[int, ...], alpha: float, boundary: Boundary, paths: int = PATHS,
                   seed: int = 0) -> tuple[float, ...]:
    """Per look, the one-sided level at which its t statistic is tested, so that the chance of crossing at any
    look under the null is `alpha` (seeded Monte Carlo of `paths` null confirmations; cached per design, on disk
    too: the same seeded calibration, so a cached design is the computed one)."""
    key = json.dumps({"v": 1, "looks": list(looks), "alpha": alpha, "boundary": boundary, "paths": paths,
                      "seed": seed, "numpy": np.__version__})
    path = _cache_dir() / f"{hashlib.sha1(key.encode()).hexdigest()}.json"
    try:
        saved = json.loads(path.read_text())
        if saved["key"] == key and len(saved["levels"]) == len(looks):
            return tuple(float(a) for a in saved["levels"])
    except (OSError, ValueError, KeyError, TypeError):
        pass  # not cached yet, or unreadable: computed again and rewritten
    levels = _calibrate(looks, alpha, boundary, paths, seed)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(json.dumps({"key": key, "levels": list(levels)}))
        partial.replace(path)  # atomic: a reader sees the old file or the whole new one
    except OSError as err:  # a cache that cannot be written is only slower
        log.debug("design cache not written (%s)", err)
    return levels


def _cache_dir() -> Path:
    return Path(os.environ.get("NSLAB_CACHE") or Path.home() / ".cache" / "nslab") / "designs"


def _calibrate(looks: tuple[int, ...], alpha: float, boundary: Boundary, paths: int, seed: int) -> tuple[float, ...]:
    from scipy.special import stdtr

    usable = [k for k, n in enumerate(looks) if n >= 2]
    if len(usable) <= 1:
        return (alpha,) * len(looks)
    paths = min(paths, DRAWS // max(looks))
    rng = np.random.default_rng(seed)
    t = t_statistics(rng.standard_normal((paths, max(looks))), looks)[:, usable]
    df = np.array([looks[k] - 1 for k in usable], dtype=float)
    p = stdtr(df, -t)  # one-sided p-values, (paths, usable looks)
    levels = np.zeros(len(looks))
    if boundary == "pocock":
        levels[usable] = float(np.quantile(p.min(axis=1), alpha))
        return tuple(float(a) for a in levels)
    from scipy.special import ndtr, ndtri

    fraction = np.array([looks[k] for k in usable]) / looks[-1]
    spent = 2 - 2 * ndtr(ndtri(1 - alpha / 2) / np.sqrt(fraction))  # Lan & DeMets' OBF-type alpha(t)
    alive = np.ones(paths, dtype=bool)
    for j, k in enumerate(usable):
        budget = spent[j] - (spent[j - 1] if j else 0.0)  # the chance of first crossing at this look
        ranked = np.sort(p[alive, j])
        take = int(round(budget * paths))
        levels[k] = ranked[take - 1] if take > 0 else ranked[0] / 2
        alive &= ~(p[:, j] <= levels[k])
    return tuple(float(a) for a in levels)
