"""A study: two arms searched alike by Ray Tune + Optuna (the baseline and the method), then a sequential
confirmation of each arm's best on fresh seeds; everything recorded in MLflow.

    with ray_session():
        outcome = run_study(load_study("configs/study/quick.yaml"), name="quick-20260101-120000")

Phases, each a Tune experiment under <storage.ray>/<name>/ (so --resume restores whichever was running):

1. warmup: when no searched path shapes the base-method trajectory (orchestrator/execution/warmup.py), one trial of the
   base method trains the longest warm-up the search space allows, keeping a checkpoint after each length;
2. search-baseline, search-<method>: each arm's trials (the same searcher, multi-fidelity scheduler, trial
   count and maximum epochs; the baseline arm over the shared recipe paths, the method's arm over those and
   its own), choosing on the validation split only; an untuned baseline is the single phase `baseline`;
3. confirm-1, confirm-2, ...: each arm's best on fresh seeds, evaluated on the test split, until decided
   (orchestrator/study/confirmation.py).

One MLflow parent run per study holds every trial as a child run, the study's tables (trials, Pareto front,
importances, compute, rung correlations, confirmation), their plots, a Markdown report and the verdict.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from orchestrator.config.loader import settings_text
from orchestrator.config.study import Arm, ParamSpec, StudyFile
from orchestrator.execution import warmup
from orchestrator.execution.phases import (
    TrialLog,
    exists,
    known_trial_ids,
    phase_trials,
    run_search,
    run_warmups,
    warmup_checkpoints,
)
from orchestrator.execution.ray_session import trial_resources
from orchestrator.execution.search import arm_sampler, distribution, rungs, status
from orchestrator.execution.trainable import FAILURE_TAG, TRIAL_ID_TAG
from orchestrator.execution.trial_settings import Record, Role, TrialSettings
from orchestrator.record import figures
from orchestrator.record.artifacts import IMPORTANCE_SCHEMA, compute_table, rung_table, trials_table
from orchestrator.record.tracking import Tracker, config_hash, flatten, git_commit
from orchestrator.results import Status, finite, objective_points, pareto_mask, rows_table
from orchestrator.study.confirmation import Confirmation, run_confirmation

log = logging.getLogger(__name__)
STUDY_TAG = "nslab.study"
ORPHAN_TAG = "nslab.orphaned"
LAUNCH_FILE = "nslab-study.json"  # how the study was started: config, command-line overrides, smoke mode
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
    histories: dict[str, dict[int, float]] = field(default_factory=dict)


def study_dir(study: StudyFile, name: str) -> str:
    return f"{study.storage.ray.rstrip('/')}/{name}"


def read_launch(path: str) -> dict | None:
    """How the study at `path` was started ({"config", "overrides", "origins", "smoke"}), if it exists."""
    file = Path(path) / LAUNCH_FILE
    return json.loads(file.read_text()) if file.is_file() else None


def run_study(study: StudyFile, name: str, resume: bool = False, keep_gpu: bool = False,
              launch: dict | None = None, confirm: bool = True, confirm_only: bool = False) -> StudyOutcome:
    """Run (or resume) the study `name` on the current Ray cluster and record it in MLflow. Ctrl+C ends the
    parent run KILLED and raises KeyboardInterrupt once Tune has saved its state (--resume continues).
    `launch`: how it was started (config path, command-line overrides), kept with the study for --resume."""
    path = study_dir(study, name)
    started = read_launch(path) is not None
    if (resume or confirm_only) and not started:
        raise FileNotFoundError(f"no study to {'resume' if resume else 'confirm'} at {path}; run it without "
                                f"{'--resume' if resume else '--confirm-only'} first")
    if not (resume or confirm_only) and Path(path).exists():
        raise ValueError(f"study {name!r} already exists at {path}; pass --resume to continue it or --name NEW "
                         "for a fresh one")
    if confirm_only and not exists(path, "search"):
        raise FileNotFoundError(f"study {name!r} has not finished its search at {path}; --resume it first")
    tracker = Tracker(study.tracking.uri, study.tracking.experiment)
    parent = _parent_run(tracker, study, name, resume or confirm_only, launch or {})
    if not started and "://" not in path:
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / LAUNCH_FILE).write_text(json.dumps(launch or {}, indent=1))
    record = Record(study.tracking.uri, study.tracking.experiment, parent, name)
    s = study.study
    resources = trial_resources(s.resources.cpu, s.resources.gpu, keep_gpu)
    arms = study.arms()
    log.info("study %s: %s; %d at a time, objectives %s; MLflow parent run %s", name,
             " and ".join(a.describe() for a in arms), s.concurrency,
             ", ".join(f"{o.metric} ({o.mode})" for o in s.objectives), parent)
    try:
        if not confirm_only:
            search(study, record, path, resources, search_warmup(study, record, path, resources))
        outcome = collect(study, name, path, tracker, parent)
        if confirm and study.confirm is not None:
            outcome.confirmation = run_confirmation(study, outcome.rows, outcome.pareto, record, path, resources)
    except BaseException as err:
        tracker.set_tags(parent, {"error": f"{type(err).__name__}: {err}"[:5000]})
        tracker.end_run(parent, "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        raise
    outcome.seconds = time.time() - tracker.get_run(parent).info.start_time / 1000  # the whole study, resumes included
    close_orphans(tracker, parent, path)
    record_outcome(study, outcome, tracker)
    return outcome


def search_warmup(study: StudyFile, record: Record, path: str,
                  resources: dict[str, float]) -> tuple[str, dict[int, str]] | None:
    """(trajectory key, {epoch: checkpoint}) of the shared warm-up of the search, trained once, when every
    trial of the method's arm would train the same base-method warm-up epochs; else None."""
    method = study.arms()[-1]
    lengths = sorted(warmup_lengths(study) - {0})
    if not (study.study.share_warmup and lengths and not any(warmup.shapes_trajectory(p) for p in method.space)
            and warmup.takes_part(method.experiment) and study.experiment.method == "sns"):
        if study.study.share_warmup and lengths:
            moved = [p for p in method.space if warmup.shapes_trajectory(p)]
            log.info("no shared warm-up in the search: its trials differ in %s, which shape the warm-up epochs",
                     ", ".join(moved))
        return None
    experiment = study.experiment
    trial = warmup.warmup_trial(experiment, lengths, record, "warmup")
    grid = run_warmups([trial], path, "warmup", resources, study.study.max_failures)
    checkpoints = warmup_checkpoints(grid).get("warmup")
    if not checkpoints:
        raise RuntimeError(f"the shared warm-up failed ({grid[0].error}); see {path}/warmup")
    return warmup.trajectory_key(experiment), checkpoints


def warmup_lengths(study: StudyFile) -> set[int]:
    """Every SNS warm-up length a trial of the method's arm may ask for."""
    epochs, space = study.experiment.train.epochs, study.search_space
    if "sns.warmup_epochs" in space:
        return {min(int(v), epochs) for v in space["sns.warmup_epochs"].values()}
    if "sns.warmup_share" in space:
        low, high = space["sns.warmup_share"].low, space["sns.warmup_share"].high
        return {int((low + (high - low) * i / 1000) * epochs + 0.5) for i in range(1001)}
    return {warmup.warmup_length(study.experiment)}


def search(study: StudyFile, record: Record, path: str, resources: dict[str, float],
           forks: tuple[str, dict[int, str]] | None) -> None:
    """The search phase: every arm's trials in one Tune experiment (an untuned baseline is one fixed trial of
    it), each forking from the shared warm-up when it shares its trajectory."""
    samplers = []
    for arm in study.arms():
        shares = forks is not None and forks[0] == warmup.trajectory_key(arm.experiment)
        template = TrialSettings(role=Role.SEARCH if arm.tuned else Role.BASELINE, label=arm.name,
                                 experiment=arm.experiment.model_dump(mode="json"), record=record, arm=arm.name,
                                 forks=forks[1] if shares else {}, objective=study.study.objectives[0].metric)
        samplers.append(arm_sampler(study, arm, template))
    objectives = [o.metric for o in study.study.objectives]
    progress = TrialLog(record.tracking_uri, record.mlflow_experiment, objectives, sum(a.trials for a in study.arms()),
                        "search")
    run_search(study, samplers, path, resources, callbacks=[progress])


def close_orphans(tracker: Tracker, parent: str, path: str) -> int:
    """End the runs of trials Tune never recorded: a driver killed within seconds of starting a trial loses it
    from the experiment state, and the resumed study runs that configuration again as a new trial. The lost
    run stays in the record, KILLED, with the reason as a tag."""
    known = known_trial_ids(path)
    orphans = [run for run in tracker.children(parent) if run.data.tags.get(TRIAL_ID_TAG) not in known]
    for run in orphans:
        tracker.set_tags(run.info.run_id, {ORPHAN_TAG: "the driver died before Ray Tune recorded this trial; the "
                                                       "resumed study ran its configuration again as another trial"})
        if run.info.status == "RUNNING":
            tracker.end_run(run.info.run_id, "KILLED")
    return len(orphans)


def study_hash(study: StudyFile) -> str:
    """Hash of what defines the study's results (not where they are stored), to refuse a changed resume."""
    return config_hash(study.model_dump(mode="json", include={"study", "experiment", "search_space", "baseline"}))


def _parent_run(tracker: Tracker, study: StudyFile, name: str, resume: bool, launch: dict) -> str:
    if resume:
        runs = tracker.find_runs(f"tags.`{STUDY_TAG}` = '{name}' and tags.`nslab.kind` = 'study'")
        if runs:
            saved = runs[0].data.tags.get("config_hash")
            if saved and saved != study_hash(study):
                raise ValueError(f"the config of study {name!r} changed since it started (hash {saved} -> "
                                 f"{study_hash(study)}); resume it with the config and flags it started with")
            return tracker.reopen(runs[0].info.run_id)
        log.warning("no MLflow parent run tagged %s=%s in %s: starting a new one", STUDY_TAG, name,
                    tracker.tracking_uri)
    parent = tracker.start_run(name, params=flatten(study.model_dump(mode="json")), tags={
        STUDY_TAG: name, "nslab.kind": "study", "git_commit": git_commit(), "config_hash": study_hash(study),
        "nslab.config_path": launch.get("config", ""), "nslab.flags": json.dumps(launch.get("overrides", {})),
        "nslab.ray_experiment": study_dir(study, name)})
    tracker.log_text(parent, settings_text(study), "study/config.yaml")
    return parent


def collect(study: StudyFile, name: str, path: str, tracker: Tracker, parent: str) -> StudyOutcome:
    """One row per search trial of each arm (the untuned baseline included) from Tune's experiment state and
    the MLflow runs, per arm in the order its searcher created them (stable across --resume)."""
    children = {run.data.tags.get(TRIAL_ID_TAG): run for run in tracker.children(parent)}
    objectives = [(o.metric, o.mode) for o in study.study.objectives]
    trials, frames = phase_trials(path, "search")
    order = {arm.name: i for i, arm in enumerate(study.arms())}
    trials = sorted(trials, key=lambda t: (order.get(TrialSettings.of(t.config).arm, 9),
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
    warmup_epochs = max(warmup_lengths(study)) if exists(path, "warmup") else 0
    trained, unshared = warmup.epochs_saved(spans, warmup_epochs)
    pareto = [False] * len(rows)
    for arm in study.arms():
        index = [i for i, r in enumerate(rows) if r["arm"] == arm.name]
        eligible = [rows[i]["status"] == Status.COMPLETE for i in index]
        for i, on in zip(index, pareto_mask(objective_points([rows[i] for i in index], objectives, eligible)),
                         strict=True):
            pareto[i] = on
    outcome = StudyOutcome(name, parent, path, rows, pareto, tracker.ui_command(), objectives, study.arms(),
                           epochs_trained=trained, epochs_unshared=unshared, histories=histories)
    outcome.compute = compute_table(rows, *objectives[0])
    outcome.rungs = rung_table(rows, histories, rungs(study), objectives[0][0])
    outcome.cost_ratio = cost_ratio(rows)
    return outcome


def trial_row(study: StudyFile, trial, run, objectives: list[tuple[str, str]]) -> dict[str, Any]:
    """A search trial's row of study/trials.parquet from its Tune state and its MLflow run."""
    settings = TrialSettings.of(trial.config)
    last = trial.last_result or {}
    outcome = status(trial.status == "ERROR", trial.status == "TERMINATED", bool(last.get("final")), settings.role)
    failure = None
    if outcome == Status.FAILED:
        failure = (run.data.tags.get(FAILURE_TAG) if run else None) or f"its worker failed; see {trial.path}/error.txt"
    return {"trial_id": trial.trial_id, "arm": settings.arm, "number": settings.number, "label": settings.label,
            "role": str(settings.role), "status": outcome, "failure_reason": failure,
            "epochs": int(last.get("epoch", 0)), "budget_epochs": settings.experiment_config().train.epochs,
            "wall_seconds": run.data.metrics.get("time/trial_wall_seconds") if run else None,
            "finished_at": float(last["timestamp"]) if "timestamp" in last else None,
            "sensitivity_selected": last.get("val/sensitivity_selected"),
            "sensitivity_all": last.get("val/sensitivity_all"),
            "mlflow_run_id": run.info.run_id if run else last.get("mlflow_run_id"),
            **{f"param.{p}": settings.overrides.get(p) for p in study.search_space},
            **{m: (last.get(m) if outcome != Status.FAILED else None) for m, _ in objectives}}


def history_summary(history, metric: str, mode: str) -> dict[str, Any]:
    """From a trial's per-epoch results: its best epoch, training seconds, first epoch, and the median seconds of
    its regularized epochs (SNS with the regularizer on) and of its plain ones."""
    column, seconds = history[metric], history["time/epoch_seconds"]
    regularized = history["train/sns_reg"].notna() if "train/sns_reg" in history else seconds.isna()
    return {"best_epoch": int(history.loc[column.idxmax() if mode == "max" else column.idxmin(), "epoch"]),
            "train_seconds": float(seconds.sum()), "forked_at": int(history["epoch"].min()) - 1,
            "regularized_epoch_seconds": float(seconds[regularized].median()) if regularized.any() else None,
            "base_epoch_seconds": float(seconds[~regularized].median()) if (~regularized).any() else None}


def cost_ratio(rows: list[dict]) -> float:
    """The method's median seconds per regularized epoch over the baseline arm's median seconds per epoch."""
    regularized = [r["regularized_epoch_seconds"] for r in rows if finite(r.get("regularized_epoch_seconds"))]
    base = [r["base_epoch_seconds"] for r in rows if r["arm"] == "baseline" and finite(r.get("base_epoch_seconds"))]
    if not regularized or not base:
        return math.nan
    return statistics.median(regularized) / statistics.median(base)


def record_outcome(study: StudyFile, outcome: StudyOutcome, tracker: Tracker) -> None:
    """Write the study's tables, plots, report and verdict to the parent run and mark it FINISHED."""
    from orchestrator.record.summary import study_markdown, summary_metrics

    parent, rows, objectives = outcome.parent_run_id, outcome.rows, outcome.objectives
    table = trials_table(rows, study.search_space, [m for m, _ in objectives])
    tracker.log_table(parent, table, "study/trials.parquet")
    tracker.log_table(parent, table.filter(pa.array(outcome.pareto, type=pa.bool_())), "study/pareto.parquet")
    tracker.log_figure(parent, figures.pareto_figure(rows, objectives, outcome.pareto), "study/pareto_front.png")
    tracker.log_table(parent, outcome.compute, "study/compute.parquet")
    tracker.log_figure(parent, figures.compute_figure(outcome.compute, objectives[0][0]), "study/robust_vs_compute.png")
    tracker.log_table(parent, outcome.rungs, "study/rung_correlation.parquet")
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
    report = study_markdown(study, outcome)
    tracker.log_text(parent, report, "study/report.md")
    verdicts = [c.verdict() for c in outcome.confirmation.comparisons] if outcome.confirmation else []
    tracker.log_text(parent, "\n".join(verdicts) + "\n" if verdicts else "no confirmation\n", "study/verdict.txt")
    tracker.set_description(parent, report)
    tracker.log_metrics(parent, summary_metrics(study, outcome))
    tracker.end_run(parent, "FINISHED")


def param_importances(rows: list[dict], study: StudyFile, objectives: list[tuple[str, str]]) -> pa.Table:
    """Optuna's fANOVA importances per objective over the method arm's completed trials, on a study rebuilt from
    them; empty below MIN_IMPORTANCE_TRIALS completed trials (the report says how many there were)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    arm = study.arms()[-1]
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
