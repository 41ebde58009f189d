"""One shape for a trial: what the driver decides about it, typed, frozen, and read by attribute.

    settings = TrialSettings(role=Role.SEARCH, label="sns-03", arm="sns", experiment=study_experiment_json,
                             overrides={"sns.lam": 0.012, "train.lr": 0.003}, record=record, number=3)
    config = settings.tune_config()              # what crosses into Ray: {"trial": plain values}
    settings = TrialSettings.of(result.config)   # any reader, on either side, by attribute
    experiment = settings.experiment_config()    # validated here, once, where it is used

Searched and fixed trials have the same shape: a search trial's overrides are the values its arm's searcher
sampled, decoded to config values on the driver before Tune sees them; a confirmation trial's are the
chosen configuration plus its seed. The experiment travels as the study's validated JSON plus those
overrides and is validated once in the worker. A trial's CPU and GPU share is its Tune resource request
(the trainable reads it back from Tune), so it lives in one place.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from enum import StrEnum
from typing import Any

from ns_core.attacks import Attack
from orchestrator.config.experiment import ExperimentConfig
from orchestrator.config.loader import validate
from orchestrator.config.paths import canonical_path

CONFIG_KEY = "trial"  # the one key of a Tune trial config


class Role(StrEnum):
    SEARCH = "search"  # a searched trial of an arm
    BASELINE = "baseline"  # the single untuned baseline (baseline: {tune: false})
    WARMUP = "warmup"  # a shared warm-up: trains to `until`, keeping a checkpoint at each of `keep_epochs`
    CONFIRM = "confirm"  # a configuration retrained on a fresh seed, evaluated on the test split
    METHOD = "method"  # a fixed (method, seed) of `analyze methods`, evaluated on the test split


@dataclass(frozen=True)
class Record:
    """Where a trial records itself: the MLflow store, experiment and parent run, and the study's name."""

    tracking_uri: str
    mlflow_experiment: str
    parent_run_id: str
    study: str


@dataclass(frozen=True, repr=False)
class TrialSettings:
    role: Role
    label: str  # the MLflow run name: baseline, sns-03, confirm-sns-s2, warmup-pgd_at-s0
    experiment: Mapping[str, Any]  # the validated base experiment, as JSON
    record: Record
    overrides: Mapping[str, Any] = field(default_factory=dict)  # dotted path -> config value
    arm: str | None = None  # "sns" / "baseline" in a study; the method label in `analyze methods`
    number: int | None = None  # the order its phase created it in (1, 2, ...); per arm in a search
    sequence: int | None = None  # a search trial's place in its whole search, both arms taking turns (1, 2, ...)
    replicate: int | None = None  # which search of a replicated study it belongs to (1, 2, ...); None: the only one
    forks: Mapping[int, str] = field(default_factory=dict)  # shared warm-up: epoch -> checkpoint directory
    until: int | None = None  # warm-ups stop after this epoch
    keep_epochs: tuple[int, ...] = ()  # warm-ups keep a checkpoint after each of these
    evaluate: bool = False  # evaluate the final model on the test split
    final_suite: tuple[Attack, ...] | None = None  # None: the experiment's own
    examples: int | None = None  # test examples of the final evaluation; None: the experiment's
    configuration: str | None = None  # confirmation: the configuration it retrains ("baseline", "sns", "sns-2")
    objective: str | None = None  # the study's primary objective, also logged as objective/<name>

    def __repr__(self) -> str:  # Tune prints and tags trials with it: the label, not the experiment
        return f"TrialSettings({self.label})"

    @classmethod
    def of(cls, config: Mapping[str, Any]) -> TrialSettings:
        """The settings inside a Tune trial config (a trial's, a result's, a restored experiment's)."""
        plain = dict(config[CONFIG_KEY])
        plain["role"] = Role(plain["role"])
        plain["record"] = Record(**plain["record"])
        plain["forks"] = {int(epoch): path for epoch, path in plain["forks"].items()}
        plain["keep_epochs"] = tuple(plain["keep_epochs"])
        if plain["final_suite"] is not None:
            plain["final_suite"] = tuple(Attack.from_dict(a) for a in plain["final_suite"])
        return cls(**plain)

    def tune_config(self) -> dict[str, Any]:
        """What crosses into Ray: plain values only (Tune swaps other objects for placeholders it resolves late)."""
        plain = {f.name: getattr(self, f.name) for f in fields(self)}
        plain.update(role=str(self.role), record=asdict(self.record), experiment=copy.deepcopy(dict(self.experiment)),
                     overrides=dict(self.overrides), forks=dict(self.forks), keep_epochs=list(self.keep_epochs),
                     final_suite=[a.to_dict() for a in self.final_suite] if self.final_suite is not None else None)
        return {CONFIG_KEY: plain}

    def with_(self, **changes: Any) -> TrialSettings:
        return replace(self, **changes)

    def experiment_json(self) -> dict[str, Any]:
        """The experiment with the overrides applied, as JSON (not validated: the worker validates)."""
        data = copy.deepcopy(dict(self.experiment))
        for path, value in self.overrides.items():
            *blocks, leaf = canonical_path(ExperimentConfig, path).split(".")
            target = data
            for block in blocks:
                target = target.setdefault(block, {})
            target[leaf] = value
        return data

    def experiment_config(self) -> ExperimentConfig:
        """The trial's experiment, validated (once, where it is used)."""
        return validate(ExperimentConfig, self.experiment_json(), source=f"trial {self.label}")

    def run_params(self) -> dict[str, Any]:
        """The MLflow params of its run: what tells it apart from its siblings (its arm, its search in a replicated
        study, its searched values and seed, rounded to what they carry); the constant settings are on the parent
        run."""
        params: dict[str, Any] = {"arm": self.arm} if self.arm else {}
        if self.replicate is not None:
            params["replicate"] = self.replicate
        if self.role in (Role.CONFIRM, Role.METHOD):
            params["train.seed"] = self.seed
        for path, value in self.overrides.items():
            params[path] = f"{value:.4g}" if isinstance(value, float) else value
        return params

    @property
    def seed(self) -> int:
        return int(self.experiment_json()["train"]["seed"])

    @property
    def method(self) -> str:
        return str(self.experiment_json()["method"])
