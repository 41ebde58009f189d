"""What a study tries next, as Ray Tune search algorithms and a scheduler (the other half of Ray Tune's API in
nslab; orchestrator/execution/phases.py runs the phases):

    samplers = [arm_sampler(study, arm, template) for arm, template in ...]   # Optuna per arm, same settings
    searcher = make_searcher(study, [samplers])    # one Search per replicate, both arms taking turns in each
    scheduler = PerArm(study)                      # ASHA per arm on progress: arms never stop each other's trials
    searcher = Rounds(plan)                        # fixed trials in rounds (the sequential confirmation)

Every suggestion is a TrialSettings (execution/trial_settings.py): a searched trial's values decoded to config
values on the driver, numbered in the order its arm created it and placed in its search's `sequence`. A
reproducible study (the default) suggests and judges trial n from trials 1..n-concurrency only, told back in
sequence order (Ray's guide: "if two trials finish at the same time, the convergence of the search algorithm
might be influenced by which trial result is processed first"), so a rerun repeats its trials exactly. Tune
saves these searchers with the experiment (their `save`/`restore`), so the numbers, Optuna's studies and the
rounds so far survive a resume.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from ray.tune.schedulers import FIFOScheduler
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from orchestrator.config.arms import Arm
from orchestrator.config.search_space import ParamSpec
from orchestrator.config.study import StudyFile
from orchestrator.execution.trial_outcome import PROGRESS, TrialOutcome
from orchestrator.execution.trial_settings import Role, TrialSettings

EPSILON = 1e-9  # progress is epoch / epochs: two schedules at the same share may differ in the last bit


def trial_label(arm: str, number: int | None, replicate: int | None) -> str:
    """'sns-03'; in a replicated study 'r2-sns-03' (so the MLflow UI sorts a replicate's runs together). An untuned
    arm's one trial is the arm's name ('baseline', 'r2-baseline')."""
    name = f"{arm}-{number:02d}" if number is not None else arm
    return f"r{replicate}-{name}" if replicate is not None else name


@dataclass
class ArmSampler:
    """One arm's trials as TrialSettings: its Optuna searcher's sample, decoded to config values, in a copy of
    `template` labelled `<arm>-NN` in the order the arm's trials were created. Optuna knows each trial by its
    label, so what it was told does not depend on Tune's (random) trial ids."""

    optuna: Searcher | None  # None: an untuned arm, its one trial as the template has it
    template: TrialSettings
    space: dict[str, ParamSpec]
    trials: int
    created: int = 0

    def suggest(self, sequence: int) -> TrialSettings | None:
        number = self.created + 1
        if self.optuna is None:
            settings = self.template.with_(number=number, sequence=sequence)
        else:
            label = trial_label(self.template.arm, number, self.template.replicate)
            sample = self.optuna.suggest(label)
            if not isinstance(sample, dict):
                return None
            overrides = {path: spec.decode(sample[path]) for path, spec in self.space.items() if path in sample}
            settings = self.template.with_(label=label, number=number, sequence=sequence, overrides=overrides)
        self.created = number
        return settings

    def on_trial_result(self, label: str, result: dict) -> None:
        if self.optuna is not None:
            self.optuna.on_trial_result(label, result)

    def tell(self, label: str, result: dict | None, error: bool) -> None:
        if self.optuna is not None:
            self.optuna.on_trial_complete(label, result=result, error=error)


@dataclass
class Search:
    """One whole search (both arms, one replicate): suggestions take turns between the arms until each has its
    trial count, and each result goes back to the sampler of the arm that suggested it (never across arms).

    Reproducible (`study.reproducible`): trial n (its `sequence`) is suggested only once trials 1..n-c have ended
    (c = `concurrency`), after their results were told to the arms' Optuna studies in sequence order; so every
    suggestion is made from the same results, whatever order the trials finished in (Optuna's FAQ: batched
    ask-and-tell). Asynchronous: up to c trials at a time, each result told the moment its trial ends."""

    samplers: list[ArmSampler]
    concurrency: int
    reproducible: bool
    metrics: list[str]  # what Optuna is told of a result
    turn: int = 0
    created: int = 0
    issued: dict[str, tuple[int, str, int]] = field(default_factory=dict)  # trial id -> (arm, label, sequence)
    # sequence -> (trial id, its objectives, whether it failed), and the sequences already told to Optuna
    ended: dict[int, tuple[str, dict | None, bool]] = field(default_factory=dict)
    told: set[int] = field(default_factory=set)

    def done(self) -> bool:
        """Every arm has created its trials."""
        return all(s.created >= s.trials for s in self.samplers)

    def suggest(self, trial_id: str) -> TrialSettings | None:
        if self.done():
            return None
        sequence = self.created + 1
        if self.reproducible:
            settled = range(1, sequence - self.concurrency + 1)
            if any(s not in self.ended for s in settled):
                return None
            self._tell(settled)
        elif len(self.issued) - len(self.ended) >= self.concurrency:
            return None
        for _ in range(len(self.samplers)):
            index = self.turn % len(self.samplers)
            self.turn += 1
            sampler = self.samplers[index]
            if sampler.created < sampler.trials:
                settings = sampler.suggest(sequence)
                if settings is not None:
                    self.created = sequence
                    self.issued[trial_id] = (index, settings.label, sequence)
                    return settings
        return None

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        index, label, _ = self.issued[trial_id]
        self.samplers[index].on_trial_result(label, result)

    def on_trial_complete(self, trial_id: str, result: dict | None, error: bool) -> None:
        sequence = self.issued[trial_id][2]
        kept = {m: result[m] for m in self.metrics if m in result} if result else None
        self.ended[sequence] = (trial_id, kept, error)
        if not self.reproducible:
            self._tell([sequence])
        elif self.done() and len(self.ended) == len(self.issued):  # the last results, for the record
            self._tell(sorted(self.ended))

    def _tell(self, sequences) -> None:
        for sequence in sequences:
            if sequence not in self.told:
                trial_id, result, error = self.ended[sequence]
                index, label, _ = self.issued[trial_id]
                self.samplers[index].tell(label, result, error)
                self.told.add(sequence)


class SavedWhole(Searcher):
    """A searcher Tune checkpoints whole (its state is plain Python and the Optuna objects it holds)."""

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as file:
            pickle.dump(self.__dict__, file)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as file:
            self.__dict__.update(pickle.load(file))


class SearchesSearcher(SavedWhole):
    """Every search of a study (one per replicate) from one Tune experiment, side by side: Tune's requests for a
    trial go round the searches, each of which suggests when its own rule allows (Search). One experiment keeps
    its workers warm for every arm and fills the cluster to the end. Tune saves it with `save` (the samplers,
    their Optuna studies, the trial numbers and the results not yet told survive a resume)."""

    def __init__(self, searches: list[Search], metric, mode) -> None:
        super().__init__(metric=metric, mode=mode)
        self.searches = searches
        self.owner: dict[str, int] = {}
        self.turn = 0

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return all(s.optuna.set_search_properties(metric, mode, config, **spec)
                   for search in self.searches for s in search.samplers if s.optuna)

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        return True  # each search limits itself to study.concurrency trials at a time

    def suggest(self, trial_id: str):
        for _ in range(len(self.searches)):
            index = self.turn % len(self.searches)
            self.turn += 1
            settings = self.searches[index].suggest(trial_id)
            if settings is not None:
                self.owner[trial_id] = index
                return settings.tune_config()
        return Searcher.FINISHED if all(s.done() for s in self.searches) else None

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self.searches[self.owner[trial_id]].on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self.searches[self.owner[trial_id]].on_trial_complete(trial_id, result, error)


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
    seeded (study.seed, plus the replicate's index - 1), over the arm's own space; the method's
    points_to_evaluate (the baseline arm: their shared part)."""
    import optuna

    if not arm.tuned:
        return ArmSampler(None, template, {}, 1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    s = study.study
    seed = s.seed + (template.replicate or 1) - 1
    if s.sampler == "nsga2":
        sampler = optuna.samplers.NSGAIISampler(seed=seed, population_size=s.population_size or max(
            4, 2 * s.concurrency))
    else:
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(2, min(10, arm.trials // 2)))
    metrics, modes = [o.metric for o in s.objectives], [o.mode for o in s.objectives]
    points = [{p: arm.space[p].encode(v) for p, v in point.items() if p in arm.space}
              for point in s.points_to_evaluate]
    points = [p for i, p in enumerate(points) if p and p not in points[:i]]
    storage = optuna.storages.RDBStorage(study.storage.optuna) if study.storage.optuna else None
    name = f"{template.record.study}-{arm.name}" + (f"-r{template.replicate}" if template.replicate else "")
    searcher = OptunaSearch(
        space={path: distribution(spec) for path, spec in arm.space.items()},
        metric=metrics if len(metrics) > 1 else metrics[0], mode=modes if len(modes) > 1 else modes[0],
        sampler=sampler, storage=storage, study_name=name, points_to_evaluate=points or None)
    return ArmSampler(searcher, template, arm.space, arm.trials)


def make_searcher(study: StudyFile, searches: list[list[ArmSampler]]) -> SearchesSearcher:
    """One Search per replicate (its arms' samplers), under one Tune searcher."""
    s = study.study
    metrics, modes = [o.metric for o in s.objectives], [o.mode for o in s.objectives]
    return SearchesSearcher([Search(samplers, s.concurrency, s.reproducible, metrics) for samplers in searches],
                            metrics if len(metrics) > 1 else metrics[0], modes if len(modes) > 1 else modes[0])


# ---- early stopping -----------------------------------------------------------------------------------------


def rungs(study: StudyFile) -> list[float]:
    """Where ASHA compares trials, as shares of each trial's own schedule (its `progress`, epoch / its epochs):
    grace x reduction_factor^k below 1, the grace being study.grace_period epochs of the longest schedule (or
    that share, when below 1). A searched train.epochs thus compares a short schedule and a long one at the same
    point of each, not at the same epoch (where the short one has annealed and the long one has not)."""
    s = study.study
    if s.scheduler != "asha":
        return []
    out, milestone = [], s.grace_period if s.grace_period < 1 else s.grace_period / study.max_epochs()
    while milestone < 1 - EPSILON:
        out.append(milestone)
        milestone *= s.reduction_factor
    return out


def rung_epoch(milestone: float, epochs: int) -> int:
    """The epoch at which a trial of `epochs` epochs reaches the rung (the first whose progress is at least it)."""
    return math.ceil(milestone * epochs - EPSILON)


class PerArm(FIFOScheduler):
    """Asynchronous successive halving (ASHA, Li et al. 2020) with one ladder of rungs per search and arm: an
    arm's trial is stopped against its own arm's trials only, never the other arm's (whose early epochs may run
    another schedule) nor another replicate's. At a rung, a trial whose primary objective falls below the
    (1 - 1/reduction_factor) quantile of the values recorded there stops (Ray's ASHAScheduler's rule, on
    `progress`). Reproducible: trial n is compared only with trials 1..n-c of its search, which had all ended
    before it started (Search), so the decision does not depend on which trial reached the rung first.
    Asynchronous: with every value recorded so far. Tune does not checkpoint schedulers: after a --resume the
    rungs hold the trials since."""

    def __init__(self, study: StudyFile) -> None:
        super().__init__()
        s = study.study
        self.primary, self.sign = s.objectives[0].metric, 1.0 if s.objectives[0].mode == "max" else -1.0
        self.milestones, self.quantile = rungs(study), (1 - 1 / s.reduction_factor) * 100
        self.window = s.concurrency if s.reproducible else None
        self.ladders: dict[tuple, dict[float, dict[int, float]]] = {}  # (replicate, arm) -> rung -> {sequence: value}
        self.stopped = 0

    def set_search_properties(self, metric, mode, **spec) -> bool:
        return True  # each ladder has the study's primary objective

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        settings = TrialSettings.of(trial.config)
        if settings.role != Role.SEARCH or PROGRESS not in result or self.primary not in result:
            return self.CONTINUE
        ladder = self.ladders.setdefault((settings.replicate, settings.arm), {m: {} for m in self.milestones})
        action = self.decide(ladder, settings.sequence, result[PROGRESS], self.sign * result[self.primary])
        self.stopped += action == self.STOP
        return action

    def decide(self, ladder: dict[float, dict[int, float]], sequence: int, progress: float, value: float) -> str:
        """Record the trial's value at the highest rung it reached and has not passed yet; STOP when it is below
        the cut-off of the values it may be compared with."""
        for milestone in reversed(self.milestones):
            recorded = ladder[milestone]
            if progress < milestone - EPSILON or sequence in recorded:
                continue
            peers = [v for s, v in recorded.items() if self.window is None or s <= sequence - self.window]
            recorded[sequence] = value
            peers = [v for v in peers if not math.isnan(v)]
            if peers and value < float(np.percentile(peers, self.quantile)) and progress < 1 - EPSILON:
                return self.STOP  # (a rung a short schedule reaches at its last epoch only records its value)
            break
        return self.CONTINUE

    def debug_string(self) -> str:
        return f"successive halving per arm at {', '.join(f'{m:.3g}' for m in self.milestones)}: {self.stopped} stopped"


# ---- trials in rounds ------------------------------------------------------------------------------------


class Rounds(SavedWhole):
    """Fixed trials in rounds from one Tune experiment: `plan(outcomes)` gives the next round's trials from the
    TrialOutcome of every finished trial ([] when there is nothing left to run); a round starts when the last
    one has finished. The sequential confirmation adds seeds this way, in warm workers, and a resumed driver
    continues the round it was in: Tune saves this searcher (the trials issued, their outcomes, the plan) with
    the experiment.

    At most `concurrency` trials run at once (None: as the cluster allows). Beyond the study's concurrency, Tune
    started a worker for a round's next trial while the running one was about to free its own, then threw the new
    worker away, and kept only one worker between rounds: a worker start (torch, Tune, MLflow: 3.5-5 CPU-seconds)
    lost per round."""

    concurrency: int | None = None  # a class default: a searcher saved without it (older nslab) resumes uncapped

    def __init__(self, plan: Callable[[list[TrialOutcome]], list[TrialSettings]],
                 concurrency: int | None = None) -> None:
        super().__init__()
        self.plan, self.concurrency = plan, concurrency
        self.queue = list(plan([]))
        self.issued: dict[str, TrialSettings] = {}
        self.rows: dict[str, TrialOutcome] = {}
        self.rounds = 1 if self.queue else 0

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True

    def suggest(self, trial_id: str):
        if self.concurrency is not None and len(self.issued) - len(self.rows) >= self.concurrency:
            return None
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
