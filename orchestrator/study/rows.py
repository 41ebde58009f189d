"""A study's search as rows: one per search trial, from Tune's experiment state and the trials' MLflow runs,
with each arm's Pareto front, the robustness-against-compute table, the rung correlations, the expected best
after k trials (was the budget enough?) and the method's cost per epoch against its base.

    outcome = collect(study, name, path, tracker, parent)     # a StudyOutcome (orchestrator/study/outcome.py)
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from orchestrator.config.study import StudyFile
from orchestrator.execution import warmup
from orchestrator.execution.phases import exists, phase_trials
from orchestrator.execution.search import rungs
from orchestrator.execution.trial_outcome import TrialOutcome
from orchestrator.execution.trial_settings import TrialSettings
from orchestrator.record import tags
from orchestrator.record.artifacts import compute_table, rung_table
from orchestrator.record.tracking import Tracker
from orchestrator.results import Status, arm_fronts, finite
from orchestrator.study.budget import expected_best_table
from orchestrator.study.outcome import StudyOutcome


def collect(study: StudyFile, name: str, path: str, tracker: Tracker, parent: str) -> StudyOutcome:
    """One row per search trial of each arm (the untuned baseline included) from Tune's experiment state and
    the MLflow runs, per replicate and arm in the order its searcher created them (stable across --resume)."""
    children = {run.data.tags.get(tags.TRIAL_ID): run for run in tracker.children(parent)}
    objectives = [(o.metric, o.mode) for o in study.study.objectives]
    trials, frames = phase_trials(path, "search")
    order = {arm.name: i for i, arm in enumerate(study.arm_list())}
    trials = sorted(trials, key=lambda t: (TrialSettings.of(t.config).replicate or 1,
                                           order.get(TrialSettings.of(t.config).arm, 9),
                                           TrialSettings.of(t.config).number or 0))
    rows, spans, histories = [], [], {}
    for trial in trials:
        row = trial_row(study, trial, children.get(trial.trial_id), objectives)
        history = frames.get(trial.trial_id)
        if history is not None and objectives[0][0] in history and history[objectives[0][0]].notna().any():
            row.update(history_summary(history, *objectives[0]))
            spans.append((row["forked_at"] + 1, int(history["epoch"].max())))
            histories[trial.trial_id] = dict(zip(history["epoch"].astype(int), history[objectives[0][0]], strict=True))
        rows.append(row)
    warmup_epochs = max(warmup.search_warmup_lengths(study)) if exists(path, "warmup") else 0
    trained, unshared = warmup.epochs_saved(spans, warmup_epochs)
    pareto = [False] * len(rows)  # each replicate's arms' own fronts
    for replicate in {r["replicate"] for r in rows}:
        index = [i for i, r in enumerate(rows) if r["replicate"] == replicate]
        for i, on in zip(index, arm_fronts([rows[i] for i in index], objectives), strict=True):
            pareto[i] = on
    outcome = StudyOutcome(name, parent, path, rows, pareto, tracker.ui_command(), objectives, study.arm_list(),
                           epochs_trained=trained, epochs_unshared=unshared, histories=histories)
    outcome.compute = compute_table(rows, *objectives[0])
    outcome.rungs = rung_table(rows, histories, rungs(study), objectives[0][0], study.max_epochs())
    outcome.expected_best = expected_best_table(rows, *objectives[0], seed=study.study.seed)
    outcome.cost_ratios = cost_ratios(rows, study)
    outcome.cost_ratio = outcome.cost_ratios.get(study.arm_list()[-1].name, math.nan) if len(outcome.arms) == 2 else (
        math.nan)
    return outcome


def trial_row(study: StudyFile, trial, run, objectives: list[tuple[str, str]]) -> dict[str, Any]:
    """A search trial's row of study/trials.parquet from its Tune state and its MLflow run."""
    outcome = TrialOutcome.of_trial(trial)
    settings, last = outcome.settings, trial.last_result or {}
    failure = None
    if outcome.status == Status.FAILED:
        failure = (run.data.tags.get(tags.FAILURE) if run else None) or f"its worker failed; see {trial.path}/error.txt"
    return {"trial_id": trial.trial_id, "replicate": settings.replicate or 1, "arm": settings.arm,
            "number": settings.number, "sequence": settings.sequence, "label": settings.label,
            "role": str(settings.role), "status": outcome.status, "failure_reason": failure,
            "epochs": outcome.epoch, "budget_epochs": settings.experiment_config().train.epochs,
            "wall_seconds": run.data.metrics.get("time/trial_wall_seconds") if run else None,
            "finished_at": float(last["timestamp"]) if "timestamp" in last else None,
            "sensitivity_selected": last.get("val/sensitivity_selected"),
            "sensitivity_all": last.get("val/sensitivity_all"),
            "mlflow_run_id": run.info.run_id if run else outcome.mlflow_run_id,
            **{f"param.{p}": settings.overrides.get(p) for p in study.search_space},
            **{m: (last.get(m) if outcome.status != Status.FAILED else None) for m, _ in objectives}}


def history_summary(history, metric: str, mode: str) -> dict[str, Any]:
    """From a trial's per-epoch results: its best epoch, training seconds, first epoch, and the median seconds of
    its regularized epochs (SNS with the regularizer on) and of its plain ones."""
    column, seconds = history[metric], history["time/epoch_seconds"]
    regularized = history["train/sns_reg"].notna() if "train/sns_reg" in history else seconds.isna()
    return {"best_epoch": int(history.loc[column.idxmax() if mode == "max" else column.idxmin(), "epoch"]),
            "train_seconds": float(seconds.sum()), "forked_at": int(history["epoch"].min()) - 1,
            "regularized_epoch_seconds": float(seconds[regularized].median()) if regularized.any() else None,
            "base_epoch_seconds": float(seconds[~regularized].median()) if (~regularized).any() else None}


def cost_ratios(rows: list[dict], study: StudyFile) -> dict[str, float]:
    """Each arm's median seconds per epoch over the control arm's (PGD-AT in a shootout, the baseline of a two-arm
    study): what one epoch of each method costs, on the same machine and recipe. An SNS arm is timed on its
    regularized epochs (its warm-up epochs are its base's); {} without a control arm."""
    control = study.control_arm
    base = [r["base_epoch_seconds"] for r in rows if r["arm"] == control and finite(r.get("base_epoch_seconds"))]
    if not base:
        return {}
    out = {}
    for arm in study.arm_list():
        key = "regularized_epoch_seconds" if arm.method == "sns" else "base_epoch_seconds"
        seconds = [r[key] for r in rows if r["arm"] == arm.name and finite(r.get(key))]
        out[arm.name] = statistics.median(seconds) / statistics.median(base) if seconds else math.nan
    return out
