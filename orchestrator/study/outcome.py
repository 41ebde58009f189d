"""A study's outcome and its record: the rows, fronts and tables a finished study holds, written to its MLflow
parent run as Parquet tables, plots, the Markdown report, the verdict and the summary metrics, with Optuna's
parameter importances over the method arm.

    record_outcome(study, outcome, tracker)      # then the parent run is FINISHED
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from orchestrator.config.arms import Arm
from orchestrator.config.search_space import ParamSpec
from orchestrator.config.study import StudyFile
from orchestrator.execution.search import distribution
from orchestrator.record import figures, tags
from orchestrator.record.artifacts import IMPORTANCE_SCHEMA, trials_table
from orchestrator.record.tracking import Tracker
from orchestrator.results import Status, finite, rows_table
from orchestrator.study import ranking
from orchestrator.study.confirmation import Confirmation

log = logging.getLogger(__name__)
MIN_IMPORTANCE_TRIALS = 8  # fANOVA on fewer completed trials is noise: not computed, and the report says so


@dataclass
class StudyOutcome:
    name: str
    parent_run_id: str
    experiment_path: str
    rows: list[dict]
    pareto: list[bool]
    ui_command: str
    objectives: list[tuple[str, str]]
    arms: list[Arm]
    importances: pa.Table | None = None
    seconds: float = 0.0
    confirmation: Confirmation | None = None
    epochs_trained: int = 0
    epochs_unshared: int = 0  # what the same trials would have trained without a shared warm-up
    compute: pa.Table | None = None
    rungs: pa.Table | None = None
    cost_ratio: float = math.nan  # the method's seconds per regularized epoch / the baseline's per epoch
    cost_ratios: dict[str, float] = field(default_factory=dict)  # each arm's seconds per epoch / the control's
    histories: dict[str, dict[int, float]] = field(default_factory=dict)
    expected_best: pa.Table | None = None  # per arm, the expected best after k trials (orchestrator/study/budget.py)


def record_outcome(study: StudyFile, outcome: StudyOutcome, tracker: Tracker) -> None:
    """Write the study's tables, plots, report and verdict to the parent run and mark it FINISHED."""
    from orchestrator.record.summary import parent_run_name, short_verdict, study_markdown, summary_metrics

    parent, rows, objectives = outcome.parent_run_id, outcome.rows, outcome.objectives
    table = trials_table(rows, study.search_space, [m for m, _ in objectives])
    tracker.log_table(parent, table, "study/trials.parquet")
    tracker.log_table(parent, table.filter(pa.array(outcome.pareto, type=pa.bool_())), "study/pareto.parquet")
    tracker.log_figure(parent, figures.pareto_figure(rows, objectives, outcome.pareto), "study/pareto_front.png")
    tracker.log_table(parent, outcome.compute, "study/compute.parquet")
    tracker.log_figure(parent, figures.compute_figure(outcome.compute, objectives[0][0]), "study/robust_vs_compute.png")
    tracker.log_table(parent, outcome.rungs, "study/rung_correlation.parquet")
    if outcome.expected_best is not None:
        tracker.log_table(parent, outcome.expected_best, "study/expected_best.parquet")
        tracker.log_figure(parent, figures.expected_best_figure(outcome.expected_best, objectives[0][0], {
            arm.name: arm.trials for arm in outcome.arms if arm.tuned}), "study/expected_best.png")
    outcome.importances = param_importances(rows, study, objectives)
    tracker.log_table(parent, outcome.importances, "study/param_importances.parquet")
    if outcome.importances.num_rows:
        tracker.log_figure(parent, figures.importance_figure(outcome.importances), "study/param_importances.png")
    if outcome.confirmation is not None:
        tracker.log_table(parent, outcome.confirmation.table(), "study/confirmation.parquet")
        if outcome.confirmation.comparisons:
            tracker.log_table(parent, rows_table([c.summary() for c in outcome.confirmation.comparisons]),
                              "study/verdicts.parquet")
        tracker.log_figure(parent, figures.confirmation_figure(outcome.confirmation), "study/confirmation.png")
        if ranking.shown(outcome.confirmation):
            tracker.log_table(parent, ranking.ranking_table(ranking.ranking(outcome.confirmation, study.control_arm)),
                              "study/ranking.parquet")
    report = study_markdown(study, outcome)
    tracker.log_text(parent, report, "study/report.md")
    verdicts = [c.verdict() for c in outcome.confirmation.comparisons] if outcome.confirmation else []
    tracker.log_text(parent, "\n".join(verdicts) + "\n" if verdicts else "no confirmation\n", "study/verdict.txt")
    tracker.set_description(parent, report)
    tracker.log_metrics(parent, summary_metrics(study, outcome))
    tracker.set_tags(parent, {tags.VERDICT: short_verdict(outcome)})  # the answer in the runs table's first screen
    tracker.rename(parent, parent_run_name(study, outcome))
    tracker.end_run(parent, "FINISHED")


def param_importances(rows: list[dict], study: StudyFile, objectives: list[tuple[str, str]]) -> pa.Table:
    """Optuna's fANOVA importances per objective over the method arm's completed trials, on a study rebuilt from
    them; empty below MIN_IMPORTANCE_TRIALS completed trials (the report says how many there were)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    arm = study.arm_list()[-1]
    complete = [r for r in rows if r["arm"] == arm.name and r["status"] == Status.COMPLETE
                and all(finite(r.get(m)) for m, _ in objectives)]
    empty = IMPORTANCE_SCHEMA.empty_table()
    if len(complete) < MIN_IMPORTANCE_TRIALS:
        log.info("parameter importances need %d completed trials of the %s arm (have %d): skipped",
                 MIN_IMPORTANCE_TRIALS, arm.name, len(complete))
        return empty
    space: dict[str, ParamSpec] = arm.space
    rebuilt = optuna.create_study(directions=["maximize" if mode == "max" else "minimize" for _, mode in objectives])
    for r in complete:
        rebuilt.add_trial(optuna.trial.create_trial(
            params={p: spec.encode(r[f"param.{p}"]) for p, spec in space.items()},
            distributions={p: distribution(spec) for p, spec in space.items()},
            values=[r[m] for m, _ in objectives]))
    out: list[dict[str, Any]] = []
    for i, (metric, _) in enumerate(objectives):
        try:
            importances = optuna.importance.get_param_importances(
                rebuilt, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=study.study.seed),
                target=lambda t, i=i: t.values[i])
        except (ValueError, RuntimeError, ZeroDivisionError) as err:
            log.warning("parameter importances for %s failed: %s", metric, err)
            continue
        out += [{"objective": metric, "param": p, "importance": float(v), "trials": len(complete)}
                for p, v in importances.items()]
    return pa.Table.from_pylist(out, schema=IMPORTANCE_SCHEMA) if out else empty
