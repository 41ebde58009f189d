"""Confirmation: the study's best configurations and its baseline retrained on fresh seeds, judged on test.

    confirmation = run_confirmation(study, rows, pareto, settings, study_dir, resources)
    print(confirmation.text())          # the per-seed table, then one verdict line per configuration

The search chose on validation; this stage is the only one of a study that reads the test split. The top
`confirm.top_k` configurations by the primary objective (or the whole Pareto front) and the baseline each
train again on every seed of `confirm.seeds` (none equal to the search seed), as Tune trials nested under
the study's parent run, and are evaluated on the test split with the final attack suite. Per configuration:
the paired differences against the baseline seed by seed (robust and clean), their mean ± std, a 95%
interval, the number of seeds it wins, and a verdict in words, whichever way it goes.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
from matplotlib.figure import Figure

from orchestrator.config import apply_overrides
from orchestrator.stats import PairedDifference, paired_difference, points
from orchestrator.study_config import StudyFile
from orchestrator.tuning import TrialSpec, nslab_settings, run_fixed

log = logging.getLogger(__name__)
COMPLETE = "TERMINATED"


@dataclass
class Comparison:
    label: str
    params: dict[str, Any]
    robust: PairedDifference
    clean: PairedDifference
    robust_name: str
    baseline: str
    left_out: dict[int, str] = field(default_factory=dict)  # seed -> why it is not in the comparison

    def verdict(self) -> str:
        """e.g. 'sns lam=0.8 fraction=0.12: +2.9 ± 1.1 AutoAttack points over pgd_at (3/3 seeds, 95% CI
        +0.2 to +5.6), -0.7 clean: higher'."""
        r, c = self.robust, self.clean
        if r.n == 0:
            return f"{self.label}: no seed finished for both it and {self.baseline}; no verdict"
        low, high = r.ci95
        interval = "" if math.isnan(low) else f", 95% CI {points(low)} to {points(high)}"
        spread = "" if math.isnan(r.std) else f" ± {points(r.std, sign=False)}"
        word = {"higher": f"beats {self.baseline}", "lower": f"is worse than {self.baseline}",
                "no clear difference": f"does not beat {self.baseline} (the interval includes 0)"}[r.verdict()]
        missing = "".join(f"; seed {seed} left out: {why}" for seed, why in sorted(self.left_out.items()))
        return (f"{self.label}: {points(r.mean)}{spread} {self.robust_name} points over {self.baseline} "
                f"({r.wins}/{r.n} seeds{interval}), {points(c.mean)} clean: {word}{missing}")


@dataclass
class Confirmation:
    rows: list[dict[str, Any]]  # one per (configuration, seed)
    comparisons: list[Comparison]
    seeds: list[int]

    def table(self) -> pa.Table:
        keys = list(dict.fromkeys(k for row in self.rows for k in row))
        return pa.Table.from_pylist([{k: row.get(k) for k in keys} for row in self.rows])

    def text(self) -> str:
        lines = [f"{'configuration':<34}{'seed':>5}{'clean %':>9}{'robust %':>10}{'Δ robust':>10}{'Δ clean':>9}"
                 "  status"]
        for r in self.rows:
            lines.append(f"{r['label'][:33]:<34}{r['seed']:>5}{_pct(r.get('test_clean_acc')):>9}"
                         f"{_pct(r.get('test_robust_acc')):>10}{_pts(r.get('robust_diff')):>10}{_pts(r.get('clean_diff')):>9}"
                         f"  {r['status']}{_flags_note(r.get('flags'))}")
        return "\n".join(lines + ["", "verdict:"] + [f"  {c.verdict()}" for c in self.comparisons])


def _flags_note(flags) -> str:
    return "" if flags in (None, "", "none") else f" ({flags})"


def _pct(v) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


def _pts(v) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else points(v)


def select_configurations(study: StudyFile, rows: list[dict], pareto: list[bool]) -> list[dict]:
    """The search trials to confirm: the top_k completed ones by the primary objective, or the Pareto front."""
    metric, mode = study.study.objectives[0].metric, study.study.objectives[0].mode
    done = [r for r in rows if r["role"] == "search" and r["status"] == COMPLETE and _finite(r.get(metric))]
    if study.confirm.pareto:
        chosen = [r for r, on in zip(rows, pareto, strict=True) if on]
    else:
        chosen = sorted(done, key=lambda r: r[metric], reverse=mode == "max")[:study.confirm.top_k]
    return chosen


def _finite(v) -> bool:
    return isinstance(v, int | float) and math.isfinite(v)


def describe(params: dict[str, Any]) -> str:
    short = {k.removeprefix("sns.").replace("warmup_epochs", "warmup"): v for k, v in params.items()}
    return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in short.items())


def confirmation_specs(study: StudyFile, chosen: list[dict]) -> list[TrialSpec]:
    settings = {"attacks": [a.to_dict() for a in study.confirm.attacks] if study.confirm.attacks else None,
                "examples": study.confirm.examples}
    specs = []
    for seed in study.confirm_seeds():
        if study.baseline is not None:
            specs.append(TrialSpec(f"baseline-s{seed}", "confirm", study.baseline_experiment(seed), evaluate=True,
                                   settings={**settings, "configuration": "baseline"}))
        for number, row in enumerate(chosen, start=1):
            params = {p: row[f"param.{p}"] for p in study.search_space}
            experiment = apply_overrides(study.experiment, {**params, "train.seed": seed})
            specs.append(TrialSpec(f"config{number}-s{seed}", "confirm", experiment, evaluate=True,
                                   settings={**settings, "configuration": f"config{number}",
                                             "params": params, "search_trial": row["trial_id"]}))
    return specs


def run_confirmation(study: StudyFile, rows: list[dict], pareto: list[bool], settings: dict[str, Any], path: str,
                     resources: dict[str, float], callbacks=()) -> Confirmation | None:
    chosen = select_configurations(study, rows, pareto)
    if not chosen:
        log.warning("confirmation skipped: no search trial completed every epoch")
        return None
    specs = confirmation_specs(study, chosen)
    log.info("confirmation: %d configuration(s) and the baseline on seeds %s (%d trainings, test split)",
             len(chosen), study.confirm_seeds(), len(specs))
    grid = run_fixed(specs, settings, path, "confirm", resources, max_failures=study.study.max_failures,
                     callbacks=callbacks, share_warmup=study.study.share_warmup)
    return summarize(study, grid, chosen)


def summarize(study: StudyFile, grid, chosen: list[dict]) -> Confirmation:
    rows = []
    for result in grid:
        nslab = nslab_settings(result.config)
        metrics = result.metrics or {}
        final = bool(metrics.get("final")) and result.error is None
        rows.append({"label": nslab["label"], "configuration": nslab["configuration"],
                     "seed": int(result.config["spec"]["experiment"]["train"]["seed"]),
                     "status": COMPLETE if final else "ERROR" if result.error else "INCOMPLETE",
                     "failure": _failure(result.error),
                     "params": describe(nslab.get("params", {})) if nslab.get("params") else study.baseline_method(),
                     "search_trial": nslab.get("search_trial"), "mlflow_run_id": metrics.get("mlflow_run_id"),
                     "test_clean_acc": metrics.get("test/clean_acc") if final else None,
                     "test_robust_acc": metrics.get("test/robust_acc") if final else None,
                     "flags": _flags(metrics) if final else None,
                     **{k: v for k, v in metrics.items() if k.startswith("test/") and final}})
    rows.sort(key=lambda r: (r["configuration"] != "baseline", r["configuration"], r["seed"]))
    base = {r["seed"]: r for r in rows if r["configuration"] == "baseline" and r["test_robust_acc"] is not None}
    for r in rows:
        if r["configuration"] != "baseline" and r["seed"] in base and r["test_robust_acc"] is not None:
            r["robust_diff"] = r["test_robust_acc"] - base[r["seed"]]["test_robust_acc"]
            r["clean_diff"] = r["test_clean_acc"] - base[r["seed"]]["test_clean_acc"]
    suite = study.confirm.attacks or study.experiment.final_suite()
    robust_name = "AutoAttack" if any(a.name == "autoattack" for a in suite) else "worst-case robust"
    comparisons = []
    for number, row in enumerate(chosen, start=1):
        mine = [r for r in rows if r["configuration"] == f"config{number}" and r["test_robust_acc"] is not None]
        params = {p: row[f"param.{p}"] for p in study.search_space}
        label = f"{study.experiment.method} {describe(params)}"
        failed = {r["seed"]: f"the {'baseline' if r['configuration'] == 'baseline' else 'configuration'} "
                             f"{r['failure'] or 'did not finish'}" for r in rows
                  if r["configuration"] in ("baseline", f"config{number}") and r["test_robust_acc"] is None}
        comparisons.append(Comparison(
            label, params,
            paired_difference({r["seed"]: r["test_robust_acc"] for r in mine},
                              {s: b["test_robust_acc"] for s, b in base.items()}),
            paired_difference({r["seed"]: r["test_clean_acc"] for r in mine},
                              {s: b["test_clean_acc"] for s, b in base.items()}),
            robust_name, study.baseline_method() or "baseline", failed))
    return Confirmation(rows, comparisons, study.confirm_seeds())


def _failure(error) -> str | None:
    """'collapsed (TrainingCollapsed)' from a trial's error, or None."""
    if error is None:
        return None
    found = re.search(r"(TrainingCollapsed|TrainingDiverged|CatastrophicOverfitting)", str(error))
    return f"failed ({found.group(1)})" if found else "failed"


def _flags(metrics: dict) -> str:
    flags = metrics.get("test/flags")
    return "none" if not flags else f"{int(flags)} masking flag(s)"


def confirmation_figure(confirmation: Confirmation, baseline: str) -> Figure:
    """Per configuration, the paired robust and clean differences against the baseline, one dot per seed."""
    figure = Figure(figsize=(6.5, 4.2), layout="constrained")
    ax = figure.subplots()
    for i, comparison in enumerate(confirmation.comparisons):
        for offset, (diff, color, name) in enumerate(((comparison.robust, "tab:red", "robust"),
                                                      (comparison.clean, "tab:blue", "clean"))):
            x = i + (offset - 0.5) * 0.3
            values = [100 * d for d in diff.differences]
            ax.scatter([x] * len(values), values, color=color, s=22, zorder=3,
                       label=f"{name}, one seed" if i == 0 else None)
            if diff.n:
                ax.hlines(100 * diff.mean, x - 0.1, x + 0.1, color="black", linewidth=2,
                          label="mean" if i == 0 and offset == 0 else None)
    ax.axhline(0, color="gray", linestyle="--", linewidth=0.8)
    ax.set_xticks(range(len(confirmation.comparisons)), [c.label for c in confirmation.comparisons], fontsize=7,
                  rotation=15)
    ax.set_ylabel(f"test accuracy − {baseline}'s, same seed (points)")
    ax.set_title(f"Confirmation on {len(confirmation.seeds)} fresh seeds (test split)", fontsize=10)
    ax.legend(fontsize=8)
    return figure
