"""What a study tries next, as Ray Tune search algorithms and a scheduler (the other half of Ray Tune's API in
nslab; orchestrator/execution/phases.py runs the phases):

    samplers = [arm_sampler(study, arm, template) for arm, template in ...]   # Optuna per arm, same settings
    searcher = make_searcher(study, samplers)      # both arms' trials from one experiment, taking turns
    scheduler = PerArm(study)                      # one ASHA per arm: arms never stop each other's trials
    searcher = Rounds(plan)                        # fixed trials in rounds (the sequential confirmation)

Every suggestion is a TrialSettings (execution/trial_settings.py): a searched trial's values decoded to config
values on the driver and numbered in the order its arm created it. Tune saves these searchers with the
experiment (their `save`/`restore`), so the numbers, Optuna's studies and the rounds so far survive a resume.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from dataclasses import dataclass

from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import ConcurrencyLimiter, Searcher
from ray.tune.search.optuna import OptunaSearch

from orchestrator.config.study import Arm, ParamSpec, StudyFile
from orchestrator.execution.trial_outcome import TrialOutcome
from orchestrator.execution.trial_settings import TrialSettings


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


class SavedWhole(Searcher):
    """A searcher Tune checkpoints whole (its state is plain Python and the Optuna objects it holds)."""

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as file:
            pickle.dump(self.__dict__, file)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as file:
            self.__dict__.update(pickle.load(file))


class ArmsSearcher(SavedWhole):
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


# ---- trials in rounds ------------------------------------------------------------------------------------


class Rounds(SavedWhole):
    """Fixed trials in rounds from one Tune experiment: `plan(outcomes)` gives the next round's trials from the
    TrialOutcome of every finished trial ([] when there is nothing left to run); a round starts when the last
    one has finished. The sequential confirmation adds seeds this way, in warm workers, and a resumed driver
    continues the round it was in: Tune saves this searcher (the trials issued, their outcomes, the plan) with
    the experiment."""

    def __init__(self, plan: Callable[[list[TrialOutcome]], list[TrialSettings]]) -> None:
        super().__init__()
        self.plan = plan
        self.queue = list(plan([]))
        self.issued: dict[str, TrialSettings] = {}
        self.rows: dict[str, TrialOutcome] = {}
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
        self.rows[trial_id] = TrialOutcome.of(self.issued[trial_id], result, errored=error, ended=True,
                                              error="the trial failed" if error else None)
