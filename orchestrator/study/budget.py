"""Was each arm's search budget enough? The expected best validation result after k = 1..n trials (Dodge et al.,
EMNLP 2019, "Show Your Work"): the expected maximum of k draws from the arm's trials that ended with a value,
with a bootstrap band, and whether the curve still rises at the arm's budget.

    table = expected_best_table(rows, "val/robust_acc", "max")    # study/expected_best.parquet
    curve, low, high = expected_best([0.81, 0.84, 0.79], trials=3)

orchestrator/record/summary.py `budget_lines` says per arm whether the curve still rises at the arm's budget.

A trial stopped at a rung counts with the value it was stopped on (the search saw it no better than its peers
there, and it could not be chosen); a failed trial has no value and is left out. The draws are with
replacement from the trials at hand (the empirical distribution of one trial's result under the arm's search),
so the curve at n sits below the best trial seen: E[max of k] = sum_i v_(i) ((i/N)^k - ((i-1)/N)^k), v sorted.
With replicated searches an arm's trials are pooled, and the curve runs past one search's budget: how much a
larger one would have found.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from orchestrator.record.artifacts import EXPECTED_BEST_SCHEMA
from orchestrator.results import Status, finite

BOOTSTRAP = 1000


def expected_max(values: Sequence[float], trials: int) -> np.ndarray:
    """E[max of k draws with replacement from `values`] for k = 1..trials (values: larger is better)."""
    v = np.sort(np.asarray(values, dtype=float))
    n = len(v)
    ranks = np.arange(n + 1) / n  # F(v_(i)) = i / n
    k = np.arange(1, trials + 1)
    weights = ranks[1:, None] ** k[None, :] - ranks[:-1, None] ** k[None, :]  # (n, trials): P(max is v_(i))
    return v @ weights


def expected_best(values: Sequence[float], trials: int, seed: int = 0,
                  boots: int = BOOTSTRAP) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(curve, low, high) for k = 1..trials: the expected maximum and its 95% percentile-bootstrap band over the
    trials (resampled with replacement, seeded)."""
    v = np.asarray(values, dtype=float)
    curve = expected_max(v, trials)
    rng = np.random.default_rng(seed)
    samples = np.sort(v[rng.integers(0, len(v), size=(boots, len(v)))], axis=1)
    n = len(v)
    ranks = np.arange(n + 1) / n
    k = np.arange(1, trials + 1)
    curves = samples @ (ranks[1:, None] ** k[None, :] - ranks[:-1, None] ** k[None, :])
    low, high = np.percentile(curves, [2.5, 97.5], axis=0)
    return curve, low, high


def expected_best_table(rows: Sequence[Mapping[str, Any]], metric: str, mode: str, seed: int = 0) -> pa.Table:
    """study/expected_best.parquet: per arm (every replicate's trials pooled), k = 1..its trials with a value."""
    out = []
    sign = 1.0 if mode == "max" else -1.0
    for arm in dict.fromkeys(r["arm"] for r in rows):
        values = [sign * r[metric] for r in rows if r["arm"] == arm and finite(r.get(metric))
                  and r["status"] in (Status.COMPLETE, Status.STOPPED_EARLY)]
        if not values:
            continue
        curve, low, high = expected_best(values, len(values), seed)
        if sign < 0:
            curve, low, high = -curve, -high, -low
        out += [{"arm": arm, "trials": k + 1, "expected_best": float(curve[k]), "low": float(low[k]),
                 "high": float(high[k])} for k in range(len(values))]
    return pa.Table.from_pylist(out, schema=EXPECTED_BEST_SCHEMA)
