"""A confirmed study's ranking, and the paper's claim per base: what a shootout answers after its verdicts.

    rows = ranking(confirmation, control)        # one row per confirmed configuration, best mean robust first
    ranking_text(rows); base_lines(confirmation)  # the console / report forms

The rank orders the configurations by their mean robust accuracy on the confirmation seeds; beside it stands the
interval that says whether the order means anything: the paired difference to the control with its 95% interval
and the decision of the study's sequential rule (Holm over the comparisons). Neighbours whose intervals cover
each other are not told apart by this study, and the decision column says so.
"""

from __future__ import annotations

import statistics
from typing import Any

import pyarrow as pa

from orchestrator.results import count, finite, pct, points
from orchestrator.study.confirmation import Comparison, Confirmation

RANKING_SCHEMA = pa.schema([
    ("rank", pa.int64()), ("configuration", pa.string()), ("method", pa.string()), ("replicate", pa.int64()),
    ("seeds", pa.int64()), ("robust_acc_mean", pa.float64()), ("robust_acc_std", pa.float64()),
    ("clean_acc_mean", pa.float64()), ("vs", pa.string()), ("robust_diff_mean", pa.float64()),
    ("ci95_low", pa.float64()), ("ci95_high", pa.float64()), ("decision", pa.string())])


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def shown(confirmation: Confirmation | None) -> bool:
    """A ranking says more than the verdicts where one search confirmed more than two configurations (a shootout,
    top_k > 1); with two, the verdict is the ranking (a replicated two-arm study has each search's verdict)."""
    if confirmation is None:
        return False
    per_search: dict[int | None, int] = {}
    for conf in confirmation.configurations:
        per_search[conf.replicate] = per_search.get(conf.replicate, 0) + 1
    return max(per_search.values(), default=0) > 2


def ranking(confirmation: Confirmation, control: str | None) -> list[dict[str, Any]]:
    """One row per confirmed configuration, ordered by mean test robust accuracy (fractions, as the tables
    hold them), each with its comparison against the control arm's configuration of the same search (a replicated
    study: each search's own comparison, not the verdict over searches)."""
    judged = confirmation.per_search or confirmation.comparisons  # a replicated study: each search's own pairs
    against: dict[str, Comparison] = {c.configuration.name: c for c in judged if c.baseline.arm.name == control}
    out = []
    for conf in confirmation.configurations:
        finished = [r for r in confirmation.rows
                    if r["configuration"] == conf.name and finite(r.get("test_robust_acc"))]
        robust, robust_std = _mean_std([r["test_robust_acc"] for r in finished])
        clean, _ = _mean_std([r["test_clean_acc"] for r in finished])
        comparison = against.get(conf.name)
        low, high = comparison.robust.ci95 if comparison else (None, None)
        out.append({"configuration": conf.name, "method": conf.arm.title, "replicate": conf.replicate,
                    "seeds": len(finished), "robust_acc_mean": robust, "robust_acc_std": robust_std,
                    "clean_acc_mean": clean, "vs": comparison.baseline.name if comparison else None,
                    "robust_diff_mean": comparison.robust.mean if comparison else None, "ci95_low": low,
                    "ci95_high": high, "decision": str(comparison.decision) if comparison else
                    ("control" if conf.arm.name == control else None)})
    out.sort(key=lambda r: -r["robust_acc_mean"] if r["robust_acc_mean"] is not None else float("inf"))
    return [{"rank": i + 1, **r} for i, r in enumerate(out)]


def ranking_table(rows: list[dict[str, Any]]) -> pa.Table:
    """`study/ranking.parquet` (docs/studies.md): the ranking's rows under RANKING_SCHEMA."""
    return pa.Table.from_pylist(rows, schema=RANKING_SCHEMA)


def ranking_cells(row: dict[str, Any]) -> list[str]:
    """rank, configuration, method, seeds, robust % (± sd over seeds), clean %, Δ robust vs, 95% CI, decision."""
    spread = f" ± {points(row['robust_acc_std'], sign=False)}" if finite(row["robust_acc_std"]) else ""
    diff = f"{points(row['robust_diff_mean'])} vs {row['vs']}" if finite(row["robust_diff_mean"]) else "-"
    ci = (f"{points(row['ci95_low'])} to {points(row['ci95_high'])}" if finite(row["ci95_low"]) else "-")
    return [str(row["rank"]), row["configuration"], row["method"], str(row["seeds"]),
            pct(row["robust_acc_mean"]) + spread, pct(row["clean_acc_mean"]), diff, ci, row["decision"] or "-"]


RANKING_HEADER = ["rank", "configuration", "method", "seeds", "robust %", "clean %", "Δ robust (points)", "95% CI",
                  "decision"]


def ranking_text(rows: list[dict[str, Any]]) -> str:
    """The ranking as aligned text (the console's)."""
    lines = [RANKING_HEADER, *[ranking_cells(r) for r in rows]]
    widths = [max(len(line[i]) for line in lines) for i in range(len(RANKING_HEADER))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines)


def base_lines(confirmation: Confirmation) -> list[str]:
    """The paper's claim put to the test once per base: each SNS arm against the arm of its own base method
    ('SNS on TRADES: -0.6 points vs TRADES (95% CI -2.4 to +1.3), undecided after 5 seeds')."""
    out = []
    for c in confirmation.comparisons:
        arm, base = c.configuration.arm, c.baseline.arm
        if arm.method != "sns" or base.method != arm.experiment.sns.base:
            continue
        low, high = c.robust.ci95
        interval = f" (95% CI {points(low)} to {points(high)})" if finite(low) else ""
        out.append(f"{arm.title}: {points(c.robust.mean)} robust points vs {base.title}{interval}, "
                   f"{c.decision} after {count(c.robust.n, c.unit)}")
    return out
