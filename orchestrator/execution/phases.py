"""Ray Tune runs a study's phases here: the search (both arms in one experiment), trials in rounds (the sequential
confirmation), fixed trials with shared warm-ups, and the one function that runs or resumes a phase. What each
phase tries next (Optuna per arm, ASHA per arm, rounds) is orchestrator/execution/search.py: nslab's Ray Tune code is
those two modules and the trainable (orchestrator/execution/trainable.py).

    results = run_search(study, samplers, path, resources, callbacks=[TrialLog(...)])
    results = run_rounds(plan, path, "confirm", resources, limit=20)     # plan(rows) -> the next round's trials
    results = run_fixed(trials, path, "methods", resources, record=record)   # shared warm-ups first

Every trial runs orchestrator.execution.trainable.train_trial with the same shape of config,
`{"trial": TrialSettings}`. A phase whose Tune experiment exists is restored (finished trials stay finished,
interrupted ones resume from their checkpoints, the searchers' state comes back from Tune's searcher checkpoint).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ray import tune

from orchestrator.config.study import StudyFile
from orchestrator.execution import warmup
from orchestrator.execution.search import ArmSampler, PerArm, Rounds, make_searcher
from orchestrator.execution.trainable import train_trial
from orchestrator.execution.trial_outcome import TrialOutcome
from orchestrator.execution.trial_settings import CONFIG_KEY, Record, TrialSettings
from orchestrator.results import Status, fmt

log = logging.getLogger(__name__)
TUNE_DONE = ("TERMINATED", "ERROR")


def run_search(study: StudyFile, searches: list[list[ArmSampler]], path: str, resources: dict[str, float],
               callbacks: Sequence[tune.Callback] = ()) -> tune.ResultGrid:
    """The search phase: every search's (replicate's) arms in one Tune experiment, side by side, the arms of a
    search taking turns, each arm stopped early by its own ASHA (when the study asks for it)."""
    return _fit(path, "search", resources, param_space={}, tune_config=tune.TuneConfig(
        search_alg=make_searcher(study, searches), scheduler=PerArm(study) if study.study.scheduler == "asha" else None,
        num_samples=sum(s.trials for samplers in searches for s in samplers), trial_dirname_creator=_trial_name,
        trial_name_creator=_trial_name,
        # a warm worker keeps torch, MLflow and the decoded data loaded across trials (bench/orchestration)
        reuse_actors=True), max_failures=study.study.max_failures, callbacks=callbacks, keep=2)


def run_rounds(plan: Callable[[list[dict]], list[TrialSettings]], path: str, name: str, resources: dict[str, float],
               *, limit: int, concurrency: int | None = None, max_failures: int = 1,
               callbacks: Sequence[tune.Callback] = ()) -> tune.ResultGrid:
    """Trials in rounds (Rounds) as the Tune experiment <path>/<name>; `limit`: the most trials it may run;
    `concurrency`: the most at once (None: as the cluster allows)."""
    return _fit(path, name, resources, param_space={}, tune_config=tune.TuneConfig(
        search_alg=Rounds(plan, concurrency), num_samples=limit, trial_dirname_creator=_trial_name,
        trial_name_creator=_trial_name, reuse_actors=True), max_failures=max_failures, callbacks=callbacks, keep=2)


# ---- fixed trials ----------------------------------------------------------------------------------------


def run_fixed(trials: Sequence[TrialSettings], path: str, name: str, resources: dict[str, float], *,
              record: Record, max_failures: int = 1, callbacks: Sequence[tune.Callback] = (),
              share_warmup: bool = True, keep: int | None = 2) -> tune.ResultGrid:
    """Run `trials` as Tune trials (in parallel as resources allow); shared warm-ups first where trials share
    a trajectory (execution/warmup.py). `keep`: checkpoints kept per trial (None: all, as a warm-up needs)."""
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
                max_failures: int = 1, callbacks: Sequence[tune.Callback] = (), widen: bool = True) -> tune.ResultGrid:
    """Warm-up trials, each keeping every checkpoint; with fewer of them than the cluster has cores (CPU
    trials) and `widen`, each gets more cores (torch threads) instead of leaving them idle. A reproducible
    study does not widen: the thread count rounds a CPU's sums, and the cluster's size must not choose it."""
    wide = spread(resources, len(trials)) if widen else resources
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


def known_trial_ids(path: str) -> set[str]:
    """The ids of every trial Tune recorded in any phase under the study's directory `path`."""
    if not Path(path).is_dir():
        return set()
    return {t.trial_id for phase in sorted(Path(path).iterdir()) if tune.Tuner.can_restore(str(phase))
            for t in tune.ExperimentAnalysis(str(phase)).trials}


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
        self._finish(trials, trial, TrialOutcome.of(trial.config, trial.last_result, errored=False, ended=True))

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._finish(trials, trial, TrialOutcome.of(trial.config, trial.last_result, errored=True, ended=True))

    def _finish(self, trials, trial, outcome: TrialOutcome) -> None:
        from orchestrator.record import tags
        from orchestrator.record.tracking import Tracker

        if trial.trial_id in self.reported:  # a resumed driver replays finished trials
            return
        self.reported.add(trial.trial_id)
        started = self.started.pop(trial.trial_id, None)
        wall = time.time() - started if started is not None else float("nan")
        run_id, last = outcome.mlflow_run_id, outcome.metrics
        if run_id:
            tracker = Tracker(self.tracking_uri, self.mlflow_experiment)
            if started is not None:
                tracker.log_metrics(run_id, {"time/trial_wall_seconds": wall})
            tracker.set_tags(run_id, {tags.STATUS: outcome.status})
            if outcome.status == Status.STOPPED_EARLY:  # a normal end: FINISHED, with nslab's status in a tag
                tracker.set_tags(run_id, {tags.STOPPED_EARLY: f"asha after epoch {outcome.epoch}"})
                tracker.end_run(run_id, outcome.mlflow_status)
        done = sum(t.trial_id in self.reported for t in trials)
        values = "  ".join(f"{m.removeprefix('val/').removeprefix('test/')}={fmt(last[m], 3)}"
                           for m in self.objectives if m in last)
        settings = outcome.settings
        params = " ".join(f"{k.removeprefix('sns.').removeprefix('train.')}={fmt(v, 3)}"
                          for k, v in settings.overrides.items() if k != "train.seed")
        log.info("%s%d/%d %-8s %-13s %4.0fs  %s  %s", f"{self.phase} " if self.phase else "", done,
                 self.total or len(trials), settings.label, outcome.status, wall, values or "-", params)
