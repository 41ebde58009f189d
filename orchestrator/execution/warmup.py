"""Shared warm-ups: which trials may share one, the warm-up trials that serve them, and where each forks.

SNS trains `sns.warmup_epochs` of its plain base loss (PGD-AT, fast AT or TRADES) before the regularizer
switches on, so those epochs are the base method's. Trials whose base-method trajectories are identical up to
their warm-ups need them trained once: one warm-up trial of the base method trains to the longest warm-up its
group needs, keeping a checkpoint after each warm-up length; every SNS trial of the group forks from its own
length and a base-method trial of the group continues the longest. A fork ends with the same weights as a
run from scratch (tests/test_training.py checks it bit for bit on the CPU).

The one rule: trials share when their `trajectory_key` is equal. The key is everything that shapes the base
trajectory: data, model, seed, training attack, the base method and its parameters, and the whole training
recipe (learning rate, schedule, epochs — a cosine schedule's length changes every step —, eps ramp,
weight decay, ...). Only the SNS block, the final evaluation and the name are left out. A new knob that
shapes training is in the key by default; a searched continuous learning rate gives every trial its own key
(no sharing), a categorical one shares within each value.

    warmups = plan_warmups(trials, record)           # {key: warm-up TrialSettings} for a fixed set of trials
    trials = attach(trials, warmups, checkpoints)    # each trial learns the checkpoints it may fork from
    fork_point(experiment, trial.forks)              # (epoch, checkpoint dir) to start from, or None
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence

from ns_core.sns import SNS_BASES
from orchestrator.config.experiment import ExperimentConfig
from orchestrator.config.study import StudyFile
from orchestrator.execution.trial_settings import Record, Role, TrialSettings

log = logging.getLogger(__name__)

UNSHAPING = ("sns", "eval", "name")  # experiment blocks that do not shape a base-method trajectory


def trajectory_key(experiment: ExperimentConfig) -> str:
    """Equal keys <=> identical base-method epochs (same seed, data, attack, recipe and base method)."""
    data = experiment.model_dump(mode="json", exclude=set(UNSHAPING))
    data["method"] = experiment.base_method
    return json.dumps(data, sort_keys=True)


def shapes_trajectory(path: str) -> bool:
    """Whether a searched (dotted) path changes the trajectory key: anything outside sns.*, eval.* and name."""
    return path.split(".")[0] not in UNSHAPING


def warmup_length(experiment: ExperimentConfig) -> int:
    """The base-method epochs an SNS run trains before its regularizer is on (0: none to share)."""
    if experiment.method != "sns" or experiment.sns.lam == 0:
        return 0
    return min(experiment.sns.warmup_epochs, experiment.train.epochs)


def takes_part(experiment: ExperimentConfig) -> bool:
    """SNS with a warm-up forks from one; a run of an SNS base method may continue one."""
    return warmup_length(experiment) > 0 or experiment.method in SNS_BASES


def warmup_trial(experiment: ExperimentConfig, keep: Iterable[int], record: Record, label: str) -> TrialSettings:
    """The base method on `experiment`'s trajectory, to the longest of `keep`, a checkpoint after each."""
    keep = tuple(sorted(set(keep)))
    base = experiment.model_copy(update={"method": experiment.base_method, "name": f"{experiment.name}-warmup"})
    return TrialSettings(role=Role.WARMUP, label=label, experiment=base.model_dump(mode="json"), record=record,
                         until=max(keep), keep_epochs=keep)


def plan_warmups(trials: Sequence[TrialSettings], record: Record) -> dict[str, TrialSettings]:
    """{trajectory key: warm-up trial} for every group of fixed trials where sharing saves epochs: at least one
    SNS trial with a warm-up and at least one other trial on the same trajectory."""
    groups: dict[str, list[ExperimentConfig]] = {}
    for trial in trials:
        experiment = trial.experiment_config()
        if takes_part(experiment):
            groups.setdefault(trajectory_key(experiment), []).append(experiment)
    warmups = {}
    for key, members in groups.items():
        lengths = [warmup_length(e) for e in members if warmup_length(e) > 0]
        if not lengths or len(members) < 2:
            continue
        first = members[0]
        warmups[key] = warmup_trial(first, lengths, record, f"warmup-{first.base_method}-s{first.train.seed}")
    return warmups


def attach(trials: Sequence[TrialSettings], warmups: Mapping[str, TrialSettings],
           checkpoints: Mapping[str, Mapping[int, str]]) -> list[TrialSettings]:
    """Each trial with the checkpoints of its group's warm-up (`checkpoints`: warm-up label -> epoch -> dir)."""
    out = []
    for trial in trials:
        experiment = trial.experiment_config()
        warmup = warmups.get(trajectory_key(experiment)) if takes_part(experiment) else None
        forks = checkpoints.get(warmup.label, {}) if warmup is not None else {}
        out.append(trial.with_(forks=dict(forks)) if forks else trial)
    return out


def fork_point(experiment: ExperimentConfig, forks: Mapping[int, str]) -> tuple[int, str] | None:
    """(epoch, checkpoint dir) this run starts from: its own warm-up length for SNS, the longest kept epoch for
    the base method itself (its whole trajectory is the warm-up's); None when there is none to take."""
    if not forks or not takes_part(experiment):
        return None
    epoch = warmup_length(experiment) if experiment.method == "sns" else max(forks)
    if epoch == 0:
        return None
    if epoch not in forks:
        raise ValueError(f"no shared warm-up after epoch {epoch}; the warm-up kept {sorted(forks)}")
    return epoch, forks[epoch]


def epochs_saved(histories: Iterable[tuple[int, int]], warmup_epochs: int) -> tuple[int, int]:
    """(epochs trained, epochs the same trials would have trained without sharing) from each trial's
    (first epoch it trained itself, last epoch) and the warm-up epochs trained once for everyone."""
    trained, unshared = warmup_epochs, 0
    for first, last in histories:
        trained += last - first + 1
        unshared += last
    return trained, unshared


# ---- the search's shared warm-up -------------------------------------------------------------------


def search_warmup_plan(study: StudyFile) -> list[int] | None:
    """The warm-up lengths (epochs) one shared warm-up trial of the search keeps checkpoints at, when every trial
    of the method's arm would train the same base-method warm-up epochs; else None (and the log says why)."""
    if study.arms is not None:
        log.info("no shared warm-up in a study of several arms: each arm trains its own epochs")
        return None
    method = study.arm_list()[-1]
    lengths = sorted(search_warmup_lengths(study) - {0})
    if not (study.study.share_warmup and lengths and not any(shapes_trajectory(p) for p in method.space)
            and takes_part(method.experiment) and study.experiment.method == "sns"):
        if study.study.share_warmup and lengths:
            moved = [p for p in method.space if shapes_trajectory(p)]
            log.info("no shared warm-up in the search: its trials differ in %s, which shape the warm-up epochs",
                     ", ".join(moved))
        return None
    return lengths


def search_warmup_lengths(study: StudyFile) -> set[int]:
    """Every SNS warm-up length a trial of the method's arm may ask for."""
    epochs, space = study.experiment.train.epochs, study.search_space
    if "sns.warmup_epochs" in space:
        return {min(int(v), epochs) for v in space["sns.warmup_epochs"].values()}
    if "sns.warmup_share" in space:
        low, high = space["sns.warmup_share"].low, space["sns.warmup_share"].high
        return {int((low + (high - low) * i / 1000) * epochs + 0.5) for i in range(1001)}
    return {warmup_length(study.experiment)}
