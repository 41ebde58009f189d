"""A study: Ray Tune trials of ns_core training, searched by Optuna, recorded in MLflow.

    started = init_ray(address=None)                 # connect ($RAY_ADDRESS / address) or start a local Ray
    outcome = run_study(load_study("configs/study/quick.yaml"), name="quick-20260101-120000")
    if started: ray.shutdown()

One MLflow parent run per study (flattened config as params; git commit, config hash and study name as
tags); Tune runs `orchestrator.trial.train_trial` per trial under an OptunaSearch (seeded, one or more
objectives) behind a ConcurrencyLimiter, with ASHA on the primary objective when asked. At the end the
parent run gets study/trials.parquet, study/pareto.parquet, Optuna's parameter importances and PNGs.
`resume=True` restores the Tune experiment (trials resume from their checkpoints; the Optuna study
comes back from Tune's searcher checkpoint, or from `storage.optuna`) and reopens the same parent run.

Traps handled here (DESIGN.md field notes): metric/mode lists live on OptunaSearch and not on
TuneConfig; ASHA needs its own metric/mode; ASHA-stopped trials reach Optuna as COMPLETE, so the
Pareto front keeps only trials that trained every epoch; a GPU request on a cluster without GPUs
would leave trials PENDING forever, so it drops to 0 with a warning.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from orchestrator.artifacts import COMPLETE, IMPORTANCE_SCHEMA, pareto_mask, trials_table
from orchestrator.config import ParamSpec, StudyFile, settings_text
from orchestrator.plots import importance_figure, pareto_figure
from orchestrator.tracking import Tracker, config_hash, flatten, git_commit
from orchestrator.trial import FAILURE_TAG, TRIAL_ID_TAG, find_trial_run, train_trial

log = logging.getLogger(__name__)
STUDY_TAG = "nslab.study"


@dataclass
class StudyOutcome:
    name: str
    parent_run_id: str
    experiment_path: str
    rows: list[dict]
    pareto: list[bool]
    interrupted: bool
    ui_command: str
    importances: pa.Table | None = None
    seconds: float = 0.0
    objectives: list[tuple[str, str]] = field(default_factory=list)


def init_ray(address: str | None = None) -> bool:
    """Connect to `address` or $RAY_ADDRESS, else start a local Ray on all cores (dashboard off).
    Returns True when this call initialized Ray (the caller then calls ray.shutdown()). A local Ray
    stays on 127.0.0.1 only if RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 was set before Ray was imported
    (pipelines.study does that)."""
    if ray.is_initialized():
        return False
    target = address or os.environ.get("RAY_ADDRESS")
    if target:
        ray.init(address=target)
    else:
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False)
    return True


def trial_resources(study: StudyFile, keep_gpu: bool = False) -> dict[str, float]:
    """cpu/gpu per trial; a GPU request on a cluster without GPUs drops to 0 (else trials wait forever)."""
    cpu, gpu = study.study.resources.cpu, study.study.resources.gpu
    if gpu > 0 and not keep_gpu and ray.cluster_resources().get("GPU", 0) == 0:
        log.warning("the study asks for %.3g GPU per trial but the Ray cluster has none: running on CPUs "
                    "(pass --keep-gpu on an autoscaling cluster whose GPU workers are not up yet)", gpu)
        gpu = 0.0
    return {"cpu": cpu, "gpu": gpu}


def distribution(spec: ParamSpec):
    import optuna

    if spec.type == "float":
        return optuna.distributions.FloatDistribution(spec.low, spec.high, log=spec.log, step=spec.step)
    if spec.type == "int":
        return optuna.distributions.IntDistribution(int(spec.low), int(spec.high), log=spec.log,
                                                    step=int(spec.step or 1))
    return optuna.distributions.CategoricalDistribution(spec.optuna_choices())


def encode(spec: ParamSpec, value):
    return json.dumps(value) if isinstance(value, list | dict) else value


def make_searcher(study: StudyFile, name: str) -> ConcurrencyLimiter:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    s = study.study
    if s.sampler == "nsga2":
        population = s.population_size or max(4, 2 * s.concurrency)
        sampler = optuna.samplers.NSGAIISampler(seed=s.seed, population_size=population)
    else:  # half the budget (at most 10) random first, then TPE
        sampler = optuna.samplers.TPESampler(seed=s.seed, n_startup_trials=max(2, min(10, s.trials // 2)))
    metrics, modes = [o.metric for o in s.objectives], [o.mode for o in s.objectives]
    storage = optuna.storages.RDBStorage(study.storage.optuna) if study.storage.optuna else None
    searcher = OptunaSearch(
        space={path: distribution(spec) for path, spec in study.search_space.items()},
        metric=metrics if len(metrics) > 1 else metrics[0], mode=modes if len(modes) > 1 else modes[0],
        sampler=sampler, storage=storage, study_name=name,
        points_to_evaluate=[{p: encode(study.search_space[p], v) for p, v in point.items()}
                            for point in s.points_to_evaluate] or None)
    return ConcurrencyLimiter(searcher, max_concurrent=s.concurrency)


def make_scheduler(study: StudyFile) -> ASHAScheduler | None:
    s = study.study
    if s.scheduler != "asha":
        return None
    primary = s.objectives[0]  # ASHA stops on one metric: the first objective
    return ASHAScheduler(time_attr="training_iteration", metric=primary.metric, mode=primary.mode,
                         max_t=study.experiment.train.epochs, grace_period=s.grace_period,
                         reduction_factor=s.reduction_factor)


def trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


class TrialLog(tune.Callback):
    """One log line per finished trial; records each trial's wall time (start to end, seen from the
    driver) on its MLflow run and closes the runs of trials that ASHA stopped early. Holds only plain
    values: Tune pickles its callbacks with the experiment and restores them on --resume."""

    def __init__(self, tracking_uri: str, mlflow_experiment: str, total: int, objectives: list[str]) -> None:
        self.tracking_uri, self.mlflow_experiment = tracking_uri, mlflow_experiment
        self.total, self.objectives = total, objectives
        self.started: dict[str, float] = {}

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self.started[trial.trial_id] = time.time()

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        last = trial.last_result or {}
        self._finish(trials, trial, "TERMINATED" if last.get("final") else "STOPPED_EARLY", last)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._finish(trials, trial, "ERROR", trial.last_result or {})

    def _finish(self, trials, trial, status: str, last: dict) -> None:
        started = self.started.pop(trial.trial_id, None)
        wall = time.time() - started if started is not None else float("nan")
        tracker = Tracker(self.tracking_uri, self.mlflow_experiment)
        run_id = last.get("mlflow_run_id") or find_trial_run(tracker, trial.config["nslab"]["parent_run_id"],
                                                             trial.trial_id)
        if run_id and started is not None:
            tracker.log_metrics(run_id, {"trial_wall_seconds": wall})
        if run_id and status == "STOPPED_EARLY":
            tracker.set_tags(run_id, {"stopped_early": "asha"})
            tracker.end_run(run_id, "KILLED")
        done = sum(t.status in ("TERMINATED", "ERROR") for t in trials) + 1  # this one is not marked yet
        values = "  ".join(f"{m}={last[m]:.3f}" for m in self.objectives if m in last)
        params = ", ".join(f"{k}={_short(v)}" for k, v in trial.config.items() if k not in ("experiment", "nslab"))
        log.info("trial %d/%d %s %-13s %4.0fs  %s  [%s]", min(done, self.total), self.total, trial.trial_id,
                 status, wall, values or "-", params)


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def run_study(study: StudyFile, name: str, resume: bool = False, keep_gpu: bool = False,
              config_path: str | None = None) -> StudyOutcome:
    """Run (or resume) the study `name` on the current Ray cluster and record it in MLflow."""
    start = time.time()
    s = study.study
    experiment_path = f"{study.storage.ray.rstrip('/')}/{name}"
    exists = tune.Tuner.can_restore(experiment_path)
    if resume and not exists:
        raise FileNotFoundError(f"no study to resume at {experiment_path}; run it without --resume first")
    if not resume and Path(experiment_path).exists():
        raise ValueError(f"study {name!r} already exists at {experiment_path}; pass --resume to continue it "
                         "or --name NEW for a fresh one")
    tracker = Tracker(study.tracking.uri, study.tracking.experiment)
    parent = _parent_run(tracker, study, name, resume, config_path)
    objectives = [o.metric for o in s.objectives]
    callback = TrialLog(study.tracking.uri, study.tracking.experiment, s.trials, objectives)
    trainable = tune.with_resources(train_trial, trial_resources(study, keep_gpu))
    if resume:
        log.info("resuming study %s from %s (parent run %s)", name, experiment_path, parent)
        tuner = tune.Tuner.restore(experiment_path, trainable=trainable, resume_errored=True)
    else:
        settings = {"tracking_uri": study.tracking.uri, "mlflow_experiment": study.tracking.experiment,
                    "parent_run_id": parent, "study": name, "cpus": s.resources.cpu,
                    "search_space": {p: spec.model_dump() for p, spec in study.search_space.items()}}
        tuner = tune.Tuner(
            trainable,
            param_space={"experiment": study.experiment.model_dump(), "nslab": settings},
            tune_config=tune.TuneConfig(search_alg=make_searcher(study, name), scheduler=make_scheduler(study),
                                        num_samples=s.trials, trial_dirname_creator=trial_dirname,
                                        # a warm worker keeps torch, MLflow and the data loaded across
                                        # trials: per-trial overhead 6.7 s -> 1.4-2.5 s (bench/orchestration)
                                        reuse_actors=True),
            run_config=tune.RunConfig(
                name=name, storage_path=study.storage.ray, verbose=0, callbacks=[callback],
                failure_config=tune.FailureConfig(max_failures=s.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2)))
    log.info("study %s: %d trials, %d at a time, objectives %s; MLflow parent run %s", name, s.trials,
             s.concurrency, ", ".join(f"{o.metric} ({o.mode})" for o in s.objectives), parent)
    try:
        grid = tuner.fit()
    except BaseException as err:
        tracker.set_tags(parent, {"error": f"{type(err).__name__}: {err}"[:5000]})
        tracker.end_run(parent, "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        raise
    outcome = collect(study, name, grid.experiment_path, tracker, parent)
    outcome.seconds = time.time() - start
    record(study, outcome, tracker)
    return outcome


def study_hash(study: StudyFile) -> str:
    """Hash of what defines the study's results (not where they are stored), to refuse a changed resume."""
    return config_hash(study.model_dump(mode="json", include={"study", "experiment", "search_space"}))


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
        "nslab.ray_experiment": f"{study.storage.ray.rstrip('/')}/{name}"})
    tracker.log_dict(parent, {"settings": settings_text(study)}, "study/config.json")
    return parent


def collect(study: StudyFile, name: str, experiment_path: str, tracker: Tracker, parent: str) -> StudyOutcome:
    """One row per trial from Tune's experiment state and the MLflow child runs."""
    analysis = tune.ExperimentAnalysis(experiment_path)
    children = {run.data.tags.get(TRIAL_ID_TAG): run for run in tracker.children(parent)}
    epochs = study.experiment.train.epochs
    objectives = [(o.metric, o.mode) for o in study.study.objectives]
    rows = []
    for number, trial in enumerate(analysis.trials, start=1):
        last = trial.last_result or {}
        run = children.get(trial.trial_id)
        tags = run.data.tags if run else {}
        if trial.status == "ERROR":
            status = "ERROR"
        elif trial.status == "TERMINATED":
            status = COMPLETE if last.get("final") else "STOPPED_EARLY"
        else:
            status = "INCOMPLETE"
        reason = None
        if status == "ERROR":  # a retried trial that then finished keeps an old `error` tag: ignore it
            reason = tags.get(FAILURE_TAG) or tags.get("error") or f"its worker failed; see {trial.path}/error.txt"
        history = analysis.trial_dataframes.get(trial.trial_id)
        primary, mode = objectives[0]
        best_epoch = train_seconds = None
        if history is not None and primary in history and history[primary].notna().any():
            column = history[primary]
            best_epoch = int(history.loc[column.idxmax() if mode == "max" else column.idxmin(), "epoch"])
            train_seconds = float(history["epoch_seconds"].sum())
        params = {path: spec.decode(trial.config[path]) if path in trial.config else None
                  for path, spec in study.search_space.items()}
        rows.append({
            "trial_id": trial.trial_id, "number": number, "status": status, "failure_reason": reason,
            "training_iterations": int(last.get("training_iteration", 0)), "best_epoch": best_epoch,
            "wall_seconds": run.data.metrics.get("trial_wall_seconds") if run else None,
            "train_seconds": train_seconds,
            "sensitivity_selected": last.get("sensitivity_selected"), "sensitivity_all": last.get("sensitivity_all"),
            "test_clean_acc": last.get("test_clean_acc") if status == COMPLETE else None,
            "test_worst_case_acc": last.get("test_worst_case_acc") if status == COMPLETE else None,
            "mlflow_run_id": run.info.run_id if run else last.get("mlflow_run_id"),
            **{f"param.{p}": v for p, v in params.items()},
            **{m: (last.get(m) if status != "ERROR" else None) for m, _ in objectives}})
    finished = sum(r["status"] != "INCOMPLETE" for r in rows)
    interrupted = finished < study.study.trials
    return StudyOutcome(name, parent, experiment_path, rows, pareto_mask(rows, objectives, epochs), interrupted,
                        tracker.ui_command(), objectives=objectives)


def record(study: StudyFile, outcome: StudyOutcome, tracker: Tracker) -> None:
    """Write the study tables and plots to the parent run; mark it FINISHED (KILLED if interrupted)."""
    parent, rows, objectives = outcome.parent_run_id, outcome.rows, outcome.objectives
    metrics = [m for m, _ in objectives]
    table = trials_table(rows, study.search_space, metrics)
    tracker.log_table(parent, table, "study/trials.parquet")
    tracker.log_table(parent, table.filter(pa.array(outcome.pareto, type=pa.bool_())), "study/pareto.parquet")
    tracker.log_figure(parent, pareto_figure(rows, objectives, outcome.pareto), "study/pareto_front.png")
    outcome.importances = param_importances(rows, study, objectives)
    tracker.log_table(parent, outcome.importances, "study/param_importances.parquet")
    if outcome.importances.num_rows:
        tracker.log_figure(parent, importance_figure(outcome.importances), "study/param_importances.png")
    counts = {s: sum(r["status"] == s for r in rows) for s in (COMPLETE, "STOPPED_EARLY", "ERROR", "INCOMPLETE")}
    tracker.log_metrics(parent, {f"trials_{k.lower()}": v for k, v in counts.items()} | {
        "study_seconds": outcome.seconds, "pareto_size": sum(outcome.pareto)})
    tracker.end_run(parent, "KILLED" if outcome.interrupted else "FINISHED")


def param_importances(rows: list[dict], study: StudyFile, objectives: list[tuple[str, str]]) -> pa.Table:
    """Optuna's fANOVA importances per objective, on a study rebuilt from the completed trials."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    complete = [r for r in rows if r["status"] == COMPLETE and all(_finite(r.get(m)) for m, _ in objectives)]
    empty = IMPORTANCE_SCHEMA.empty_table()
    if len(complete) < 2:
        log.info("parameter importances need at least 2 completed trials (have %d): skipped", len(complete))
        return empty
    space = study.search_space
    rebuilt = optuna.create_study(directions=["maximize" if mode == "max" else "minimize" for _, mode in objectives])
    for r in complete:
        rebuilt.add_trial(optuna.trial.create_trial(
            params={p: encode(spec, r[f"param.{p}"]) for p, spec in space.items()},
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
