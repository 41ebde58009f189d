"""Ray Tune behind one module: the search (both arms in one experiment, Optuna per arm, ASHA per arm), trials
in rounds (the sequential confirmation), fixed trials, and the one function that runs or resumes a phase.

    results = run_search(study, [arm_sampler(study, arm, template) for ...], path, resources, callbacks=[...])
    results = run_rounds(plan, path, "confirm", resources, limit=20)     # plan(rows) -> the next round's trials
    results = run_fixed(trials, path, "methods", resources, record=record)   # shared warm-ups first

Every trial, searched or fixed, runs orchestrator.trial.train_trial with the same shape of config,
`{"trial": TrialSettings}`: a searched trial's settings are built on the driver from what its arm's Optuna
sampler suggested, decoded to config values and numbered in the order the arm's trials were created. A phase
whose Tune experiment exists is restored (finished trials stay finished, interrupted ones resume from their
checkpoints, the searcher's state — Optuna's studies, the trial numbers, the rounds so far — comes back from
Tune's searcher checkpoint).
"""

from __future__ import annotations

import logging
import pickle
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import ConcurrencyLimiter, Searcher
from ray.tune.search.optuna import OptunaSearch

from orchestrator import warmup
from orchestrator.results import Status, fmt
from orchestrator.study_config import Arm, ParamSpec, StudyFile
from orchestrator.trial import train_trial
from orchestrator.trials import CONFIG_KEY, Record, Role, TrialSettings

log = logging.getLogger(__name__)
TUNE_DONE = ("TERMINATED", "ERROR")


def status(errored: bool, finished: bool, final: bool, role: Role) -> Status:
    """Our vocabulary for what Tune saw: an error, a final report (every epoch trained), a warm-up that reached
    its last kept epoch, a trial ASHA stopped, or one that has not finished."""
    if errored:
        return Status.FAILED
    if final:
        return Status.COMPLETE
    if finished:
        return Status.WARMED_UP if role == Role.WARMUP else Status.STOPPED_EARLY
    return Status.INCOMPLETE


def result_status(result) -> Status:
    """The Status of a tune.Result of a finished phase."""
    metrics = result.metrics or {}
    return status(result.error is not None, True, bool(metrics.get("final")), TrialSettings.of(result.config).role)


# ---- searching both arms -------------------------------------------------------------------------------


@dataclass
class ArmSampler:
    """One arm's trials as TrialSettings: its Optuna searcher's sample, decoded to config values, in a copy of
    `template` labelled `<arm>-NN` in the order the arm's trials were created."""

    optuna: Searcher | None  # None: an untuned arm, its one trial as the template has it
    template: TrialSettings
    space: dict[str, ParamSpec]
    trials: int
    created: int = 0

    def suggest(self, trial_id: str) -> dict | None:
        if self.optuna is None:
            self.created += 1
            return self.template.with_(number=self.created).tune_config()
        sample = self.optuna.suggest(trial_id)
        if not isinstance(sample, dict):
            return None
        self.created += 1
        overrides = {path: spec.decode(sample[path]) for path, spec in self.space.items() if path in sample}
        label = f"{self.template.arm}-{self.created:02d}"
        return self.template.with_(label=label, number=self.created, overrides=overrides).tune_config()

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if self.optuna is not None:
            self.optuna.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None, error: bool) -> None:
        if self.optuna is not None:
            self.optuna.on_trial_complete(trial_id, result=result, error=error)


class ArmsSearcher(Searcher):
    """Every arm's trials from one Tune experiment: suggestions take turns between the arms until each has its
    trial count, and each result goes back to the sampler of the arm that suggested it (never across arms).
    One experiment keeps its workers warm for both arms and fills the cluster to the end. Tune saves it with
    `save` (its samplers, their Optuna studies and the trial numbers survive a resume)."""

    def __init__(self, samplers: list[ArmSampler], metric, mode) -> None:
        super().__init__(metric=metric, mode=mode)
        self.samplers = samplers
        self.owner: dict[str, int] = {}
        self.turn = 0

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return all(s.optuna.set_search_properties(metric, mode, config, **spec) for s in self.samplers if s.optuna)

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        return False  # ConcurrencyLimiter does the limiting

    def suggest(self, trial_id: str):
        for _ in range(len(self.samplers)):
            index = self.turn % len(self.samplers)
            self.turn += 1
            sampler = self.samplers[index]
            if sampler.created < sampler.trials:
                config = sampler.suggest(trial_id)
                if config is not None:
                    self.owner[trial_id] = index
                    return config
        return Searcher.FINISHED if all(s.created >= s.trials for s in self.samplers) else None

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self.samplers[self.owner[trial_id]].on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self.samplers[self.owner[trial_id]].on_trial_complete(trial_id, result, error)

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as file:
            pickle.dump(self.__dict__, file)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as file:
            self.__dict__.update(pickle.load(file))


def distribution(spec: ParamSpec):
    import optuna

    if spec.type == "float":
        return optuna.distributions.FloatDistribution(spec.low, spec.high, log=spec.log, step=spec.step)
    if spec.type == "int":
        return optuna.distributions.IntDistribution(int(spec.low), int(spec.high), log=spec.log,
                                                    step=int(spec.step or 1))
    return optuna.distributions.CategoricalDistribution(spec.optuna_choices())


def arm_sampler(study: StudyFile, arm: Arm, template: TrialSettings) -> ArmSampler:
    """The same searcher for every arm: Optuna's TPE (half the budget, at most 10, random first) or NSGA-II,
    seeded, over the arm's own space; the method's points_to_evaluate (the baseline arm: their shared part)."""
    import optuna

    if not arm.tuned:
        return ArmSampler(None, template, {}, 1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    s = study.study
    if s.sampler == "nsga2":
        sampler = optuna.samplers.NSGAIISampler(seed=s.seed, population_size=s.population_size or max(
            4, 2 * s.concurrency))
    else:
        sampler = optuna.samplers.TPESampler(seed=s.seed, n_startup_trials=max(2, min(10, arm.trials // 2)))
    metrics, modes = [o.metric for o in s.objectives], [o.mode for o in s.objectives]
    points = [{p: arm.space[p].encode(v) for p, v in point.items() if p in arm.space}
              for point in s.points_to_evaluate]
    points = [p for i, p in enumerate(points) if p and p not in points[:i]]
    storage = optuna.storages.RDBStorage(study.storage.optuna) if study.storage.optuna else None
    searcher = OptunaSearch(
        space={path: distribution(spec) for path, spec in arm.space.items()},
        metric=metrics if len(metrics) > 1 else metrics[0], mode=modes if len(modes) > 1 else modes[0],
        sampler=sampler, storage=storage, study_name=f"{template.record.study}-{arm.name}",
        points_to_evaluate=points or None)
    return ArmSampler(searcher, template, arm.space, arm.trials)


def make_searcher(study: StudyFile, samplers: list[ArmSampler]) -> Searcher:
    metrics, modes = [o.metric for o in study.study.objectives], [o.mode for o in study.study.objectives]
    searcher = ArmsSearcher(samplers, metrics if len(metrics) > 1 else metrics[0],
                            modes if len(modes) > 1 else modes[0])
    return ConcurrencyLimiter(searcher, max_concurrent=study.study.concurrency)


def rungs(study: StudyFile) -> list[int]:
    """The epochs at which ASHA compares trials (grace_period x reduction_factor^k below the maximum)."""
    s = study.study
    if s.scheduler != "asha":
        return []
    out, epoch = [], float(s.grace_period)
    while epoch < study.max_epochs():
        out.append(int(epoch))
        epoch *= s.reduction_factor
    return sorted(set(out))


class PerArm(FIFOScheduler):
    """One ASHA per arm, each seeing only its arm's trials: an arm is stopped early against its own trials,
    never against the other arm's (whose early epochs may simply run another schedule)."""

    def __init__(self, study: StudyFile) -> None:
        super().__init__()
        s = study.study
        self.primary = s.objectives[0]
        self.settings = {"time_attr": "epoch", "metric": self.primary.metric, "mode": self.primary.mode,
                         "max_t": study.max_epochs(), "grace_period": s.grace_period,
                         "reduction_factor": s.reduction_factor}
        self.arms: dict[str, ASHAScheduler] = {}

    def of(self, trial) -> ASHAScheduler:
        arm = TrialSettings.of(trial.config).arm or ""
        if arm not in self.arms:
            self.arms[arm] = ASHAScheduler(**self.settings)
        return self.arms[arm]

    def set_search_properties(self, metric, mode, **spec) -> bool:
        return True  # each arm's ASHA has the study's primary objective

    def on_trial_add(self, tune_controller, trial) -> None:
        self.of(trial).on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        return self.of(trial).on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        self.of(trial).on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial) -> None:
        self.of(trial).on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        return "; ".join(f"{arm}: {asha.debug_string()}" for arm, asha in self.arms.items())


def run_search(study: StudyFile, samplers: list[ArmSampler], path: str, resources: dict[str, float],
               callbacks: Sequence[tune.Callback] = ()) -> tune.ResultGrid:
    """The search phase: every arm's trials in one Tune experiment, taking turns, each arm stopped early by
    its own ASHA (when the study asks for it)."""
    return _fit(path, "search", resources, param_space={}, tune_config=tune.TuneConfig(
        search_alg=make_searcher(study, samplers), scheduler=PerArm(study) if study.study.scheduler == "asha" else None,
        num_samples=sum(s.trials for s in samplers), trial_dirname_creator=_trial_name, trial_name_creator=_trial_name,
        # a warm worker keeps torch, MLflow and the decoded data loaded across trials (bench/orchestration)
        reuse_actors=True), max_failures=study.study.max_failures, callbacks=callbacks, keep=2)


# ---- trials in rounds ------------------------------------------------------------------------------------


class Rounds(Searcher):
    """Fixed trials in rounds from one Tune experiment: `plan(rows)` gives the next round's trials from one row
    per finished trial ([] when there is nothing left to run); a round starts when the last one has finished.
    The sequential confirmation adds seeds this way, in warm workers, and a resumed driver continues the round
    it was in: Tune saves this searcher (the trials issued, the rows, the plan) with the experiment."""

    def __init__(self, plan: Callable[[list[dict]], list[TrialSettings]]) -> None:
        super().__init__()
        self.plan = plan
        self.queue = list(plan([]))
        self.issued: dict[str, TrialSettings] = {}
        self.rows: dict[str, dict] = {}
        self.rounds = 1 if self.queue else 0

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True

    def suggest(self, trial_id: str):
        if not self.queue:
            if len(self.rows) < len(self.issued):
                return None  # the round is still running
            self.queue = list(self.plan(list(self.rows.values())))
            if not self.queue:
                return Searcher.FINISHED
            self.rounds += 1
        settings = self.queue.pop(0)
        self.issued[trial_id] = settings
        return settings.tune_config()

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        settings, result = self.issued[trial_id], result or {}
        final = bool(result.get("final")) and not error
        self.rows[trial_id] = {"configuration": settings.configuration, "seed": settings.seed, "label": settings.label,
                               "status": str(status(error, True, final, settings.role)),
                               "test_clean_acc": result.get("test/clean_acc") if final else None,
                               "test_robust_acc": result.get("test/robust_acc") if final else None}

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as file:
            pickle.dump(self.__dict__, file)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as file:
            self.__dict__.update(pickle.load(file))


def run_rounds(plan: Callable[[list[dict]], list[TrialSettings]], path: str, name: str, resources: dict[str, float],
               *, limit: int, max_failures: int = 1, callbacks: Sequence[tune.Callback] = ()) -> tune.ResultGrid:
    """Trials in rounds (Rounds) as the Tune experiment <path>/<name>; `limit`: the most trials it may run."""
    return _fit(path, name, resources, param_space={}, tune_config=tune.TuneConfig(
        search_alg=Rounds(plan), num_samples=limit, trial_dirname_creator=_trial_name,
        trial_name_creator=_trial_name, reuse_actors=True), max_failures=max_failures, callbacks=callbacks, keep=2)


# ---- fixed trials ----------------------------------------------------------------------------------------


def run_fixed(trials: Sequence[TrialSettings], path: str, name: str, resources: dict[str, float], *,
              record: Record, max_failures: int = 1, callbacks: Sequence[tune.Callback] = (),
              share_warmup: bool = True, keep: int | None = 2) -> tune.ResultGrid:
    """Run `trials` as Tune trials (in parallel as resources allow); shared warm-ups first where trials share
    a trajectory (orchestrator/warmup.py). `keep`: checkpoints kept per trial (None: all, as a warm-up needs)."""
    trials = list(trials)
    warmups = warmup.plan_warmups(trials, record) if share_warmup else {}
    if warmups:
        done = run_warmups(list(warmups.values()), path, f"{name}-warmup", resources, max_failures, callbacks)
        trials = warmup.attach(trials, warmups, warmup_checkpoints(done))
    return _fit(path, name, resources, param_space=grid(trials), tune_config=tune.TuneConfig(
        trial_dirname_creator=_trial_name, trial_name_creator=_trial_name, reuse_actors=True),
        max_failures=max_failures, callbacks=callbacks, keep=keep)


def grid(trials: Sequence[TrialSettings]) -> dict[str, Any]:
    """A Tune param_space with one trial per TrialSettings."""
    return {CONFIG_KEY: tune.grid_search([t.tune_config()[CONFIG_KEY] for t in trials])}


def run_warmups(trials: Sequence[TrialSettings], path: str, name: str, resources: dict[str, float],
                max_failures: int = 1, callbacks: Sequence[tune.Callback] = ()) -> tune.ResultGrid:
    """Warm-up trials, each keeping every checkpoint; with fewer of them than the cluster has cores (CPU
    trials), each gets more cores (torch threads) instead of leaving them idle."""
    wide = spread(resources, len(trials))
    return _fit(path, name, wide, param_space=grid(trials), tune_config=tune.TuneConfig(
        trial_dirname_creator=_trial_name, trial_name_creator=_trial_name, reuse_actors=True),
        max_failures=max_failures, callbacks=callbacks, keep=None)


def warmup_checkpoints(results: tune.ResultGrid) -> dict[str, dict[int, str]]:
    """warm-up label -> {epoch: checkpoint directory} of every warm-up trial that finished."""
    out: dict[str, dict[int, str]] = {}
    for result in results:
        if result.error is None:
            out[TrialSettings.of(result.config).label] = {int(m["epoch"]): ckpt.path
                                                          for ckpt, m in result.best_checkpoints}
    return out


def spread(resources: dict[str, float], trials: int) -> dict[str, float]:
    """CPU-only phases with fewer trials than the cluster has cores give each trial the idle cores; GPU trials
    keep their request. The trial reads its share back from Tune (torch threads = its CPUs)."""
    import ray

    if resources.get("gpu", 0) > 0 or trials < 1:
        return resources
    return {**resources, "cpu": max(resources["cpu"], float(int(ray.cluster_resources().get("CPU", 1) // trials)))}


# ---- running a phase -------------------------------------------------------------------------------------


def _trainable(config: dict) -> None:
    train_trial(TrialSettings.of(config))


def _trial_name(trial) -> str:
    return f"{TrialSettings.of(trial.config).label}_{trial.trial_id}"


class PhaseInterrupted(KeyboardInterrupt):
    """Tune stopped a phase before its trials finished (Ctrl+C): its state is saved, --resume continues it."""


def exists(path: str, name: str) -> bool:
    return tune.Tuner.can_restore(f"{path.rstrip('/')}/{name}")


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
    unfinished = [t.trial_id for t in tune.ExperimentAnalysis(full).trials if t.status not in TUNE_DONE]
    if unfinished:  # Tune catches Ctrl+C itself, saves its state and returns
        raise PhaseInterrupted(f"{name}: {len(unfinished)} trial(s) unfinished")
    return grid


def phase_trials(path: str, name: str) -> list[Any]:
    """The Tune Trial objects of a finished phase (status, config, last result), in the order Tune created
    them, and their per-epoch histories ({trial_id: DataFrame})."""
    analysis = tune.ExperimentAnalysis(f"{path.rstrip('/')}/{name}")
    return analysis.trials, analysis.trial_dataframes


class TrialLog(tune.Callback):
    """One log line per finished trial; records each trial's wall time (start to end, seen from the driver) on
    its MLflow run and closes the runs of trials that ASHA stopped early. Holds only plain values: Tune
    pickles its callbacks with the experiment and restores them on --resume."""

    def __init__(self, tracking_uri: str, mlflow_experiment: str, objectives: list[str],
                 total: int | None = None, phase: str = "") -> None:
        self.tracking_uri, self.mlflow_experiment = tracking_uri, mlflow_experiment
        self.objectives, self.total, self.phase = objectives, total, phase
        self.started: dict[str, float] = {}
        self.reported: set[str] = set()

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self.started.setdefault(trial.trial_id, time.time())

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        last = trial.last_result or {}
        self._finish(trials, trial, status(False, True, bool(last.get("final")), TrialSettings.of(trial.config).role),
                     last)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._finish(trials, trial, Status.FAILED, trial.last_result or {})

    def _finish(self, trials, trial, outcome: Status, last: dict) -> None:
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
            if outcome == Status.STOPPED_EARLY:
                tracker.set_tags(run_id, {"stopped_early": f"asha after epoch {int(last.get('epoch', 0))}"})
                tracker.end_run(run_id, "KILLED")
        done = sum(t.trial_id in self.reported for t in trials)
        values = "  ".join(f"{m.removeprefix('val/').removeprefix('test/')}={fmt(last[m], 3)}"
                           for m in self.objectives if m in last)
        settings = TrialSettings.of(trial.config)
        params = " ".join(f"{k.removeprefix('sns.').removeprefix('train.')}={fmt(v, 3)}"
                          for k, v in settings.overrides.items() if k != "train.seed")
        log.info("%s%d/%d %-8s %-13s %4.0fs  %s  %s", f"{self.phase} " if self.phase else "", done,
                 self.total or len(trials), settings.label, outcome, wall, values or "-", params)
