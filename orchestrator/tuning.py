"""Ray Tune behind one module: the Optuna searcher (with the baseline kept out of its model), ASHA (which
never stops the baseline), and one function that runs, or resumes, a set of trials.

    specs = [TrialSpec("baseline-s1", "confirm", experiment_s1, evaluate=True), ...]
    results = run_fixed(specs, settings, path, name="confirm", resources=..., max_failures=1)
    results = run_search(study, settings, path, baseline=spec, warmups={...}, resources=...)

Every trial runs orchestrator.trial.train_trial with {"experiment": ..., "nslab": settings}. A phase whose
Tune experiment already exists is restored (finished trials stay finished, interrupted ones resume from
their checkpoints, Optuna's state comes back from the searcher checkpoint). SNS trials whose base
trajectory is shared (same data, budget, seed and training attack as a base-method run) fork from one
warm-up trial of that base method instead of each training the same warm-up epochs again.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ray import tune
from ray.tune.schedulers import ASHAScheduler, TrialScheduler
from ray.tune.search import ConcurrencyLimiter, Searcher
from ray.tune.search.optuna import OptunaSearch

from ns_core.objectives import SNS_BASES
from orchestrator.experiment_config import ExperimentConfig
from orchestrator.study_config import ParamSpec, StudyFile
from orchestrator.trial import train_trial

log = logging.getLogger(__name__)


@dataclass
class TrialSpec:
    """One fixed trial: its label, role, experiment, and whether it is evaluated on the test split."""

    label: str
    role: str
    experiment: ExperimentConfig
    evaluate: bool = False
    settings: dict[str, Any] = field(default_factory=dict)  # extra nslab settings (attacks, examples, ...)

    def config(self, settings: dict[str, Any]) -> dict[str, Any]:
        return {"experiment": self.experiment.model_dump(mode="json"),
                "nslab": {**settings, **self.settings, "role": self.role, "label": self.label,
                          "evaluate": self.evaluate}}


# ---- shared warm-ups ---------------------------------------------------------------------------------------


def base_key(experiment: ExperimentConfig) -> str:
    """What fixes a base-method trajectory: everything but the name, the SNS block and the final evaluation,
    with the method replaced by the base method. Runs with equal keys train identical warm-up epochs."""
    data = experiment.model_dump(mode="json", exclude={"name", "sns", "eval"})
    data["method"] = experiment.base_method
    return json.dumps(data, sort_keys=True)


def plan_warmups(specs: Sequence[TrialSpec]) -> dict[str, TrialSpec]:
    """Warm-up trials for groups of runs that share a base trajectory: SNS runs (warm-up >= 1) and a
    base-method run with the same key. Each warm-up trains to the longest warm-up its group needs."""
    groups: dict[str, list[TrialSpec]] = {}
    for spec in specs:
        sns_with_warmup = spec.experiment.method == "sns" and spec.experiment.sns.warmup_epochs > 0
        if sns_with_warmup or spec.experiment.method in SNS_BASES:
            groups.setdefault(base_key(spec.experiment), []).append(spec)
    warmups = {}
    for key, group in groups.items():
        consumers = [s for s in group if s.experiment.method == "sns"]
        if not consumers or len(group) < 2:
            continue
        keep = sorted({s.experiment.sns.warmup_epochs for s in consumers})
        base = group[0].experiment
        experiment = base.model_copy(update={"method": base.base_method, "name": f"{base.name}-warmup"})
        label = f"warmup-{base.base_method}-s{base.train.seed}"
        warmups[key] = TrialSpec(label, "warmup", experiment, settings={"until": max(keep), "keep_epochs": keep})
    return warmups


def warmup_checkpoints(results: tune.ResultGrid) -> dict[str, dict[str, str]]:
    """label -> {epoch: checkpoint path} of every warm-up trial that finished."""
    out: dict[str, dict[str, str]] = {}
    for result in results:
        if result.error is not None:
            continue
        label = nslab_settings(result.config)["label"]
        out[label] = {str(int(m["epoch"])): ckpt.path for ckpt, m in result.best_checkpoints}
    return out


# ---- running trials ----------------------------------------------------------------------------------------


def nslab_settings(config: dict) -> dict:
    """A trial's nslab settings, whether it came from the search or (wrapped in "spec") from a fixed list."""
    return config.get("nslab") or config.get("spec", {}).get("nslab", {})


def _trial_name(trial) -> str:
    return f"{nslab_settings(trial.config).get('label') or 'trial'}_{trial.trial_id}"


def _trainable(config: dict) -> None:
    """Tune's entry: a fixed trial arrives wrapped in {"spec": ...} by grid_search."""
    spec = config.get("spec")
    train_trial({**spec, **{k: v for k, v in config.items() if k != "spec"}} if spec else config)


class PhaseInterrupted(KeyboardInterrupt):
    """Tune stopped a phase before its trials finished (Ctrl+C): its state is saved, --resume continues it."""


def _fit(path: str, name: str, resources: dict[str, float], *, param_space: dict, tune_config: tune.TuneConfig,
         max_failures: int, callbacks: Sequence[tune.Callback], keep: int | None) -> tune.ResultGrid:
    """Run (or restore and finish) the Tune experiment <path>/<name>; PhaseInterrupted if Ctrl+C stopped it."""
    trainable = tune.with_resources(_trainable, resources)
    full = f"{path.rstrip('/')}/{name}"
    if tune.Tuner.can_restore(full):
        log.info("resuming %s from %s", name, full)
        tuner = tune.Tuner.restore(full, trainable=trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(trainable, param_space=param_space, tune_config=tune_config, run_config=tune.RunConfig(
            name=name, storage_path=path, verbose=0, callbacks=list(callbacks),
            failure_config=tune.FailureConfig(max_failures=max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=keep)))
    grid = tuner.fit()
    unfinished = [t.trial_id for t in tune.ExperimentAnalysis(full).trials if t.status not in ("TERMINATED", "ERROR")]
    if unfinished:  # Tune catches Ctrl+C itself, saves its state and returns
        raise PhaseInterrupted(f"{name}: {len(unfinished)} trial(s) unfinished")
    return grid


def spread(resources: dict[str, float], settings: dict[str, Any], trials: int) -> tuple[dict, dict]:
    """CPU-only phases with fewer trials than the cluster has cores (a study's warm-up) give each trial more
    cores (torch threads) instead of leaving them idle; GPU trials keep their request."""
    import ray

    if resources.get("gpu", 0) > 0 or trials < 1:
        return resources, settings
    cpus = max(resources["cpu"], float(int(ray.cluster_resources().get("CPU", 1) // trials)))
    return {**resources, "cpu": cpus}, {**settings, "cpus": cpus}


def run_fixed(specs: Sequence[TrialSpec], settings: dict[str, Any], path: str, name: str,
              resources: dict[str, float], max_failures: int = 1, callbacks: Sequence[tune.Callback] = (),
              share_warmup: bool = True, keep: int | None = 2) -> tune.ResultGrid:
    """Run `specs` as Tune trials (in parallel as resources allow); shared warm-ups first when they pay.
    `keep`: checkpoints kept per trial (None: all of them, as a warm-up needs)."""
    specs = list(specs)
    warmups = plan_warmups(specs) if share_warmup else {}
    if warmups:
        wide, wide_settings = spread(resources, settings, len(warmups))
        grid = _fit(path, f"{name}-warmup", wide, param_space={"spec": tune.grid_search(
            [w.config(wide_settings) for w in warmups.values()])}, tune_config=tune.TuneConfig(
            trial_dirname_creator=_trial_name, trial_name_creator=_trial_name, reuse_actors=True),
            max_failures=max_failures, callbacks=callbacks, keep=None)
        checkpoints = warmup_checkpoints(grid)
        for spec in specs:
            warmup = warmups.get(base_key(spec.experiment))
            if warmup is not None and warmup.label in checkpoints:
                spec.settings = {**spec.settings, "warmups": checkpoints[warmup.label]}
    return _fit(path, name, resources, param_space={"spec": tune.grid_search([s.config(settings) for s in specs])},
                tune_config=tune.TuneConfig(trial_dirname_creator=_trial_name, trial_name_creator=_trial_name,
                                            reuse_actors=True),
                max_failures=max_failures, callbacks=callbacks, keep=keep)


class BaselineFirst(Searcher):
    """Suggests one fixed configuration (the baseline) first, then delegates to the wrapped searcher, which
    never hears of the baseline: it stays out of Optuna's model. Tune saves the wrapped searcher through
    `self.searcher` and this wrapper's `get_state`."""

    def __init__(self, searcher: Searcher, baseline: dict) -> None:
        super().__init__(metric=searcher.metric, mode=searcher.mode)
        self.searcher = searcher
        self.baseline = copy.deepcopy(baseline)
        self.baseline_trial_id: str | None = None

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        ok = self.searcher.set_search_properties(metric, mode, config, **spec)
        self._metric, self._mode = self.searcher.metric, self.searcher.mode
        return ok

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        return False  # ConcurrencyLimiter does the limiting

    def suggest(self, trial_id: str):
        if self.baseline_trial_id is None:
            self.baseline_trial_id = trial_id
            return copy.deepcopy(self.baseline)
        return self.searcher.suggest(trial_id)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id != self.baseline_trial_id:
            self.searcher.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id != self.baseline_trial_id:
            self.searcher.on_trial_complete(trial_id, result=result, error=error)

    def add_evaluated_point(self, *args, **kwargs):
        return self.searcher.add_evaluated_point(*args, **kwargs)

    def get_state(self) -> dict:
        return {"baseline": copy.deepcopy(self.baseline), "baseline_trial_id": self.baseline_trial_id,
                "_metric": self._metric, "_mode": self._mode}

    def set_state(self, state: dict) -> None:
        self.__dict__.update(state)


class BaselineSparingASHA(ASHAScheduler):
    """ASHA on the primary objective, except for the baseline: the reference always trains every epoch."""

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if nslab_settings(trial.config).get("role") == "baseline":
            return TrialScheduler.CONTINUE
        return super().on_trial_result(tune_controller, trial, result)


def distribution(spec: ParamSpec):
    import optuna

    if spec.type == "float":
        return optuna.distributions.FloatDistribution(spec.low, spec.high, log=spec.log, step=spec.step)
    if spec.type == "int":
        return optuna.distributions.IntDistribution(int(spec.low), int(spec.high), log=spec.log,
                                                    step=int(spec.step or 1))
    return optuna.distributions.CategoricalDistribution(spec.optuna_choices())


def make_searcher(study: StudyFile, name: str, baseline: dict | None) -> Searcher:
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
    searcher: Searcher = OptunaSearch(
        space={path: distribution(spec) for path, spec in study.search_space.items()},
        metric=metrics if len(metrics) > 1 else metrics[0], mode=modes if len(modes) > 1 else modes[0],
        sampler=sampler, storage=storage, study_name=name,
        points_to_evaluate=[{p: study.search_space[p].encode(v) for p, v in point.items()}
                            for point in s.points_to_evaluate] or None)
    if baseline is not None:
        searcher = BaselineFirst(searcher, baseline)
    return ConcurrencyLimiter(searcher, max_concurrent=s.concurrency)


def make_scheduler(study: StudyFile) -> ASHAScheduler | None:
    s = study.study
    if s.scheduler != "asha":
        return None
    primary = s.objectives[0]  # ASHA stops on one metric: the first objective
    return BaselineSparingASHA(time_attr="epoch", metric=primary.metric, mode=primary.mode,
                               max_t=study.experiment.train.epochs, grace_period=s.grace_period,
                               reduction_factor=s.reduction_factor)


def run_search(study: StudyFile, settings: dict[str, Any], path: str, name: str, resources: dict[str, float],
               baseline: TrialSpec | None, callbacks: Sequence[tune.Callback] = ()) -> tune.ResultGrid:
    """The search phase: Optuna's trials plus the baseline (first, outside Optuna's model)."""
    s = study.study
    space = {"experiment": study.experiment.model_dump(mode="json"), "nslab": {**settings, "role": "search"}}
    baseline_config = baseline.config(settings) if baseline is not None else None
    return _fit(path, name, resources, param_space=space, tune_config=tune.TuneConfig(
        search_alg=make_searcher(study, settings["study"], baseline_config), scheduler=make_scheduler(study),
        num_samples=s.trials + (baseline is not None), trial_dirname_creator=_trial_name,
        trial_name_creator=_trial_name,
        # a warm worker keeps torch, MLflow and the decoded data loaded across trials (bench/orchestration)
        reuse_actors=True), max_failures=s.max_failures, callbacks=callbacks, keep=2)


class TrialLog(tune.Callback):
    """One log line per finished trial (counted per Tune experiment); records each trial's wall time (start to
    end, seen from the driver) on its MLflow run and closes the runs of trials that ASHA stopped early. Holds
    only plain values: Tune pickles its callbacks with the experiment and restores them on --resume."""

    def __init__(self, tracking_uri: str, mlflow_experiment: str, objectives: list[str],
                 total: int | None = None) -> None:
        self.tracking_uri, self.mlflow_experiment = tracking_uri, mlflow_experiment
        self.objectives, self.total = objectives, total
        self.started: dict[str, float] = {}
        self.reported: set[str] = set()

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self.started.setdefault(trial.trial_id, time.time())

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        last = trial.last_result or {}
        role = nslab_settings(trial.config).get("role")
        status = "TERMINATED" if last.get("final") else "WARMED_UP" if role == "warmup" else "STOPPED_EARLY"
        self._finish(trials, trial, status, last)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._finish(trials, trial, "ERROR", trial.last_result or {})

    def _finish(self, trials, trial, status: str, last: dict) -> None:
        from orchestrator.tracking import Tracker

        if trial.trial_id in self.reported:  # a resumed driver replays finished trials
            return
        self.reported.add(trial.trial_id)
        started = self.started.pop(trial.trial_id, None)
        wall = time.time() - started if started is not None else float("nan")
        run_id = last.get("mlflow_run_id")
        if run_id:
            tracker = Tracker(self.tracking_uri, self.mlflow_experiment)
            if started is not None:
                tracker.log_metrics(run_id, {"time/trial_wall_seconds": wall})
            if status == "STOPPED_EARLY":
                tracker.set_tags(run_id, {"stopped_early": "asha"})
                tracker.end_run(run_id, "KILLED")
        done = sum(t.trial_id in self.reported for t in trials)
        total = self.total or len(trials)
        values = "  ".join(f"{m.removeprefix('val/')}={last[m]:.3f}" for m in self.objectives if m in last)
        label = nslab_settings(trial.config).get("label") or ", ".join(
            f"{k}={_short(v)}" for k, v in trial.config.items() if k not in ("experiment", "nslab", "spec"))
        log.info("%d/%d %-13s %4.0fs  %s  [%s]", done, total, status, wall, values or "-", label)


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
