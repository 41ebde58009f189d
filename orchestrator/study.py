"""A study: a baseline and Ray Tune trials of ns_core training searched by Optuna, then a confirmation of
the best configurations on fresh seeds; everything recorded in MLflow.

    with ray_session():
        outcome = run_study(load_study("configs/study/quick.yaml"), name="quick-20260101-120000")

Phases, each a Tune experiment under <storage.ray>/<name>/ (so --resume restores whichever was running):

1. warmup: when SNS trials share their base trajectory, one trial of the base method trains the longest
   warm-up the search space allows and keeps a checkpoint after each warm-up length;
2. search: the baseline (the base method, same budget and seed, outside Optuna's model) and Optuna's
   trials, forked from the warm-up; objectives, ASHA and best epochs read the validation split only;
3. confirm: the best configurations and the baseline on fresh seeds, evaluated on the test split
   (orchestrator/confirm.py).

One MLflow parent run per study (flattened config as params; git commit, config hash and study name as
tags) holds every trial as a child run, study/trials.parquet, study/pareto.parquet, Optuna's parameter
importances, study/confirmation.parquet and the plots.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
from ray import tune

from orchestrator.artifacts import COMPLETE, IMPORTANCE_SCHEMA, pareto_mask, trials_table
from orchestrator.config import settings_text
from orchestrator.confirm import Confirmation, confirmation_figure, run_confirmation
from orchestrator.plots import importance_figure, pareto_figure
from orchestrator.ray_runtime import trial_resources
from orchestrator.study_config import StudyFile
from orchestrator.tracking import Tracker, config_hash, flatten, git_commit
from orchestrator.trial import FAILURE_TAG, TRIAL_ID_TAG
from orchestrator.tuning import (
    TrialLog,
    TrialSpec,
    distribution,
    nslab_settings,
    run_fixed,
    run_search,
    spread,
    warmup_checkpoints,
)

log = logging.getLogger(__name__)
STUDY_TAG = "nslab.study"
ORPHAN_TAG = "nslab.orphaned"


@dataclass
class StudyOutcome:
    name: str
    parent_run_id: str
    experiment_path: str
    rows: list[dict]
    pareto: list[bool]
    ui_command: str
    importances: pa.Table | None = None
    seconds: float = 0.0
    objectives: list[tuple[str, str]] = field(default_factory=list)
    confirmation: Confirmation | None = None
    epochs_trained: int = 0
    epochs_unshared: int = 0  # what the same trials would have trained without a shared warm-up


def study_dir(study: StudyFile, name: str) -> str:
    return f"{study.storage.ray.rstrip('/')}/{name}"


def run_study(study: StudyFile, name: str, resume: bool = False, keep_gpu: bool = False,
              config_path: str | None = None, confirm: bool = True, confirm_only: bool = False) -> StudyOutcome:
    """Run (or resume) the study `name` on the current Ray cluster and record it in MLflow. Ctrl+C ends the
    parent run KILLED and raises KeyboardInterrupt once Tune has saved its state (--resume continues)."""
    path = study_dir(study, name)
    exists = tune.Tuner.can_restore(f"{path}/search")
    if (resume or confirm_only) and not exists:
        raise FileNotFoundError(f"no study to {'resume' if resume else 'confirm'} at {path}; run it without "
                                f"{'--resume' if resume else '--confirm-only'} first")
    if not (resume or confirm_only) and Path(path).exists():
        raise ValueError(f"study {name!r} already exists at {path}; pass --resume to continue it or --name NEW "
                         "for a fresh one")
    tracker = Tracker(study.tracking.uri, study.tracking.experiment)
    parent = _parent_run(tracker, study, name, resume or confirm_only, config_path)
    s = study.study
    settings = {"tracking_uri": study.tracking.uri, "mlflow_experiment": study.tracking.experiment,
                "parent_run_id": parent, "study": name, "cpus": s.resources.cpu}
    resources = trial_resources(s.resources.cpu, s.resources.gpu, keep_gpu)
    objectives = [o.metric for o in s.objectives]
    total = s.trials + (study.baseline is not None)
    log.info("study %s: %d trials%s, %d at a time, objectives %s; MLflow parent run %s", name, s.trials,
             " + the baseline" if study.baseline is not None else "", s.concurrency,
             ", ".join(f"{o.metric} ({o.mode})" for o in s.objectives), parent)
    confirmation = None
    try:
        warmups = _search_warmup(study, settings, path, resources) if study.warmup_shareable() else None
        baseline = None
        if study.baseline is not None:
            baseline = TrialSpec("baseline", "baseline", study.baseline_experiment(),
                                 settings={"warmups": warmups} if warmups else {})
        search_settings = {**settings, "warmups": warmups,
                           "search_space": {p: spec.model_dump() for p, spec in study.search_space.items()}}
        run_search(study, search_settings, path, "search", resources, baseline,
                   callbacks=[TrialLog(study.tracking.uri, study.tracking.experiment, objectives, total)])
        outcome = collect(study, name, path, tracker, parent)
        if confirm and study.confirm is not None:
            confirmation = run_confirmation(
                study, outcome.rows, outcome.pareto, settings, path, resources,
                callbacks=[TrialLog(study.tracking.uri, study.tracking.experiment,
                                    ["test/clean_acc", "test/robust_acc"])])
    except BaseException as err:
        tracker.set_tags(parent, {"error": f"{type(err).__name__}: {err}"[:5000]})
        tracker.end_run(parent, "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        raise
    outcome.confirmation = confirmation
    outcome.seconds = time.time() - tracker.get_run(parent).info.start_time / 1000  # the whole study, resumes included
    close_orphans(tracker, parent, path)
    record(study, outcome, tracker)
    return outcome


def close_orphans(tracker: Tracker, parent: str, path: str) -> int:
    """End the runs of trials Tune never recorded: a driver killed within seconds of starting a trial loses it
    from the experiment state, and the resumed study runs that configuration again as a new trial. The lost
    run stays in the record, KILLED, with the reason as a tag."""
    known = {t.trial_id for phase in sorted(Path(path).iterdir()) if tune.Tuner.can_restore(str(phase))
             for t in tune.ExperimentAnalysis(str(phase)).trials} if Path(path).is_dir() else set()
    orphans = [run for run in tracker.children(parent) if run.data.tags.get(TRIAL_ID_TAG) not in known]
    for run in orphans:
        tracker.set_tags(run.info.run_id, {ORPHAN_TAG: "the driver died before Ray Tune recorded this trial; the "
                                                       "resumed study ran its configuration again as another trial"})
        if run.info.status == "RUNNING":
            tracker.end_run(run.info.run_id, "KILLED")
    return len(orphans)


def _search_warmup(study: StudyFile, settings: dict, path: str, resources: dict) -> dict[str, str] | None:
    """The base method's shared warm-up for the search: one trial, a checkpoint after each warm-up length."""
    keep = [w for w in study.warmup_epochs() if w > 0]
    if not keep:
        return None
    spec = TrialSpec("warmup", "warmup", study.baseline_experiment().model_copy(update={"name": "warmup"}),
                     settings={"until": max(keep), "keep_epochs": keep})
    wide, wide_settings = spread(resources, settings, 1)  # the only trial running: it may use every core
    grid = run_fixed([spec], wide_settings, path, "warmup", wide, max_failures=study.study.max_failures,
                     share_warmup=False, keep=None)
    checkpoints = warmup_checkpoints(grid).get("warmup")
    if not checkpoints:
        raise RuntimeError(f"the shared warm-up failed ({grid[0].error}); see {path}/warmup")
    return checkpoints


def study_hash(study: StudyFile) -> str:
    """Hash of what defines the study's results (not where they are stored), to refuse a changed resume."""
    return config_hash(study.model_dump(mode="json", include={"study", "experiment", "search_space", "baseline"}))


def _parent_run(tracker: Tracker, study: StudyFile, name: str, resume: bool, config_path: str | None) -> str:
    if resume:
        runs = tracker.find_runs(f"tags.`{STUDY_TAG}` = '{name}' and tags.`nslab.kind` = 'study'")
        if runs:
            saved = runs[0].data.tags.get("config_hash")
            if saved and saved != study_hash(study):
                raise ValueError(f"the config of study {name!r} changed since it started (hash {saved} -> "
                                 f"{study_hash(study)}); resume it with the config it started with")
            return tracker.reopen(runs[0].info.run_id)
        log.warning("no MLflow parent run tagged %s=%s in %s: starting a new one", STUDY_TAG, name,
                    tracker.tracking_uri)
    config = study.model_dump(mode="json")
    parent = tracker.start_run(name, params=flatten(config), tags={
        STUDY_TAG: name, "nslab.kind": "study", "git_commit": git_commit(), "config_hash": study_hash(study),
        "nslab.config_path": str(Path(config_path).resolve()) if config_path else "",
        "nslab.ray_experiment": study_dir(study, name)})
    tracker.log_dict(parent, {"settings": settings_text(study)}, "study/config.json")
    return parent


def collect(study: StudyFile, name: str, path: str, tracker: Tracker, parent: str) -> StudyOutcome:
    """One row per search trial (the baseline included) from Tune's experiment state and the MLflow runs,
    numbered in the order Tune created them (stable across --resume)."""
    analysis = tune.ExperimentAnalysis(f"{path}/search")
    children = {run.data.tags.get(TRIAL_ID_TAG): run for run in tracker.children(parent)}
    epochs = study.experiment.train.epochs
    objectives = [(o.metric, o.mode) for o in study.study.objectives]
    primary, mode = objectives[0]
    rows, trained, unshared = [], 0, 0
    for number, trial in enumerate(sorted(analysis.trials, key=lambda t: t.trial_id), start=1):
        last = trial.last_result or {}
        run = children.get(trial.trial_id)
        tags = run.data.tags if run else {}
        role = nslab_settings(trial.config).get("role", "search")
        if trial.status == "ERROR":
            status = "ERROR"
        elif trial.status == "TERMINATED":
            status = COMPLETE if last.get("final") else "STOPPED_EARLY"
        else:
            status = "INCOMPLETE"
        history = analysis.trial_dataframes.get(trial.trial_id)
        best_epoch = train_seconds = first_epoch = None
        if history is not None and primary in history and history[primary].notna().any():
            column = history[primary]
            best_epoch = int(history.loc[column.idxmax() if mode == "max" else column.idxmin(), "epoch"])
            train_seconds = float(history["time/epoch_seconds"].sum())
            first_epoch = int(history["epoch"].min())
            trained += int(history["epoch"].max()) - first_epoch + 1
            unshared += int(history["epoch"].max())
        params = {p: spec.decode(trial.config[p]) if p in trial.config else None
                  for p, spec in study.search_space.items()}
        rows.append({
            "trial_id": trial.trial_id, "number": number, "role": role, "status": status,
            "failure_reason": (tags.get(FAILURE_TAG) or f"its worker failed; see {trial.path}/error.txt")
            if status == "ERROR" else None,
            "epochs": int(last.get("epoch", 0)), "forked_at": (first_epoch - 1) if first_epoch else None,
            "best_epoch": best_epoch, "wall_seconds": run.data.metrics.get("time/trial_wall_seconds") if run else None,
            "train_seconds": train_seconds, "sensitivity_selected": last.get("val/sensitivity_selected"),
            "sensitivity_all": last.get("val/sensitivity_all"),
            "mlflow_run_id": run.info.run_id if run else last.get("mlflow_run_id"),
            **{f"param.{p}": v for p, v in params.items()},
            **{m: (last.get(m) if status != "ERROR" else None) for m, _ in objectives}})
    warmup = Path(path) / "warmup"
    if warmup.exists():  # the shared warm-up's epochs were trained once, for everyone
        trained += max(study.warmup_epochs())
    pareto = pareto_mask([r if r["role"] == "search" else {} for r in rows], objectives, epochs)
    return StudyOutcome(name, parent, path, rows, pareto, tracker.ui_command(), objectives=objectives,
                        epochs_trained=trained, epochs_unshared=unshared)


def record(study: StudyFile, outcome: StudyOutcome, tracker: Tracker) -> None:
    """Write the study tables and plots to the parent run and mark it FINISHED."""
    parent, rows, objectives = outcome.parent_run_id, outcome.rows, outcome.objectives
    table = trials_table(rows, study.search_space, [m for m, _ in objectives])
    tracker.log_table(parent, table, "study/trials.parquet")
    tracker.log_table(parent, table.filter(pa.array(outcome.pareto, type=pa.bool_())), "study/pareto.parquet")
    baseline = next((r for r in rows if r["role"] == "baseline"), None)
    tracker.log_figure(parent, pareto_figure([r for r in rows if r["role"] == "search"], objectives,
                                             [on for r, on in zip(rows, outcome.pareto, strict=True)
                                              if r["role"] == "search"], reference=baseline),
                       "study/pareto_front.png")
    outcome.importances = param_importances(rows, study, objectives)
    tracker.log_table(parent, outcome.importances, "study/param_importances.parquet")
    if outcome.importances.num_rows:
        tracker.log_figure(parent, importance_figure(outcome.importances), "study/param_importances.png")
    if outcome.confirmation is not None:
        tracker.log_table(parent, outcome.confirmation.table(), "study/confirmation.parquet")
        tracker.log_figure(parent, confirmation_figure(outcome.confirmation, study.baseline_method() or "baseline"),
                           "study/confirmation.png")
        tracker.set_tags(parent, {f"verdict.{i}": c.verdict()[:5000]
                                  for i, c in enumerate(outcome.confirmation.comparisons, start=1)})
    counts = {s: sum(r["status"] == s for r in rows) for s in (COMPLETE, "STOPPED_EARLY", "ERROR", "INCOMPLETE")}
    tracker.log_metrics(parent, {f"trials_{k.lower()}": v for k, v in counts.items()} | {
        "study_seconds": outcome.seconds, "pareto_size": sum(outcome.pareto),
        "epochs_trained": outcome.epochs_trained, "epochs_without_shared_warmup": outcome.epochs_unshared})
    tracker.end_run(parent, "FINISHED")


def param_importances(rows: list[dict], study: StudyFile, objectives: list[tuple[str, str]]) -> pa.Table:
    """Optuna's fANOVA importances per objective, on a study rebuilt from the completed search trials."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    complete = [r for r in rows if r["role"] == "search" and r["status"] == COMPLETE
                and all(_finite(r.get(m)) for m, _ in objectives)]
    empty = IMPORTANCE_SCHEMA.empty_table()
    if len(complete) < 2:
        log.info("parameter importances need at least 2 completed trials (have %d): skipped", len(complete))
        return empty
    space = study.search_space
    rebuilt = optuna.create_study(directions=["maximize" if mode == "max" else "minimize" for _, mode in objectives])
    for r in complete:
        rebuilt.add_trial(optuna.trial.create_trial(
            params={p: spec.encode(r[f"param.{p}"]) for p, spec in space.items()},
            distributions={p: distribution(spec) for p, spec in space.items()},
            values=[r[m] for m, _ in objectives]))
    out = []
    for i, (metric, _) in enumerate(objectives):
        try:
            importances = optuna.importance.get_param_importances(
                rebuilt, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=study.study.seed),
                target=lambda t, i=i: t.values[i])
        except (ValueError, RuntimeError, ZeroDivisionError) as err:
            log.warning("parameter importances for %s failed: %s", metric, err)
            continue
        out += [{"objective": metric, "param": p, "importance": float(v)} for p, v in importances.items()]
    return pa.Table.from_pylist(out, schema=IMPORTANCE_SCHEMA) if out else empty


def _finite(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)
