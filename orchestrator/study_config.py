"""The study config (configs/study/*.yaml): an experiment, a search space, the study's settings, its
baseline, its confirmation stage, and where results go.

    study = load_study("configs/study/quick.yaml")       # tracking and storage locations come back absolute

Search-space paths are dotted experiment fields (`sns.lam`, alias `sns.lambda`; `sns.layers`; `train.lr`),
checked against the experiment at their edges. Metrics a study optimizes are validation metrics
(`val/robust_acc`, ...): choosing on test would report optimistic numbers.
"""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from ns_core.attacks import Attack
from orchestrator.config import ConfigError, Strict, apply_overrides, canonical_path, load_config
from orchestrator.experiment_config import ExperimentConfig, smoke_experiment

VAL_METRICS = ("val/robust_acc", "val/clean_acc", "val/sensitivity_all", "val/sensitivity_selected",
               "val/relative_sensitivity_all")  # reported by every epoch of every trial
SNS_ONLY = ("sns.lam", "sns.fraction", "sns.layers", "sns.distance", "sns.warmup_epochs", "sns.reselect_every",
            "sns.collapse_patience")  # what may differ between trials that share one warm-up


class ParamSpec(Strict):
    """One searched parameter: float/int in [low, high] (optionally log-scaled) or a categorical choice."""

    type: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = Field(None, gt=0)
    choices: list[Any] | None = None

    @model_validator(mode="after")
    def _check(self) -> ParamSpec:
        if self.type == "categorical":
            if not self.choices or self.low is not None or self.high is not None:
                raise ValueError("a categorical parameter needs a non-empty `choices` list and no low/high")
            return self
        if self.low is None or self.high is None or self.choices is not None:
            raise ValueError(f"a {self.type} parameter needs `low` and `high` (and no choices)")
        if not self.low < self.high:
            raise ValueError(f"low must be < high (got low={self.low}, high={self.high})")
        if self.log and (self.low <= 0 or self.step is not None):
            raise ValueError(f"log scale needs low > 0 and no step (got low={self.low})")
        if self.type == "int" and not (float(self.low).is_integer() and float(self.high).is_integer()):
            raise ValueError(f"an int parameter needs integer bounds (got {self.low}, {self.high})")
        return self

    def optuna_choices(self) -> list:
        """Choices as Optuna takes them (None/bool/int/float/str): lists and dicts become JSON strings."""
        return [self.encode(c) for c in self.choices or []]

    def encode(self, value: Any) -> Any:
        return json.dumps(value) if isinstance(value, list | dict) else value

    def decode(self, value: Any) -> Any:
        """An Optuna value back to the config value (a JSON-encoded choice back to its list)."""
        if self.type == "categorical":
            encoded = self.optuna_choices()
            return self.choices[encoded.index(value)] if value in encoded else value
        return int(value) if self.type == "int" else float(value)

    def values(self) -> list:
        """Every value an int or categorical parameter can take; the edges of a float one."""
        if self.type == "categorical":
            return list(self.choices)
        if self.type == "int":
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        return [self.low, self.high]


class StudyMetric(Strict):
    metric: str
    mode: Literal["max", "min"] = "max"

    @field_validator("metric")
    @classmethod
    def _known(cls, metric: str) -> str:
        if metric not in VAL_METRICS:
            close = difflib.get_close_matches(metric, VAL_METRICS, n=1) or difflib.get_close_matches(
                f"val/{metric}", VAL_METRICS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown metric {metric!r}; a study chooses on validation metrics: "
                             f"{', '.join(VAL_METRICS)}{hint}")
        return metric


class Resources(Strict):
    cpu: float = Field(1.0, gt=0)
    gpu: float = Field(0.0, ge=0)  # fractions (e.g. 0.25) share one GPU between trials

    @field_validator("gpu")
    @classmethod
    def _whole_above_one(cls, gpu: float) -> float:
        if gpu > 1 and not float(gpu).is_integer():
            raise ValueError(f"more than one GPU must be a whole number (got {gpu})")
        return gpu


class StudyBlock(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    trials: int = Field(ge=1)  # search trials (the baseline runs on top)
    concurrency: int = Field(1, ge=1)
    objectives: list[StudyMetric] = Field(min_length=1)  # the first is the primary one (ASHA, confirmation)
    sampler: Literal["tpe", "nsga2"] = "tpe"
    population_size: int | None = Field(None, ge=2)  # nsga2; None: 2 x concurrency (at least 4)
    scheduler: Literal["asha", "none"] = "none"
    grace_period: int = Field(1, ge=1)  # asha: epochs every trial gets before it can be stopped
    reduction_factor: float = Field(2.0, gt=1)
    resources: Resources = Field(default_factory=Resources)
    seed: int = 0  # Optuna's sampler
    max_failures: int = Field(1, ge=0)  # retries of a trial whose worker failed (Ray FailureConfig)
    points_to_evaluate: list[dict[str, Any]] = Field(default_factory=list)  # Optuna runs these first
    share_warmup: bool = True  # SNS trials fork from one shared warm-up of their base method

    @field_validator("objectives")
    @classmethod
    def _unique(cls, objectives: list[StudyMetric]) -> list[StudyMetric]:
        metrics = [o.metric for o in objectives]
        if len(set(metrics)) != len(metrics):
            raise ValueError(f"each metric may appear once (got {metrics})")
        return objectives


class BaselineBlock(Strict):
    """The reference every study reports against: the same budget and seed with another method."""

    method: str | None = None  # None: the SNS base method (e.g. pgd_at)


class ConfirmBlock(Strict):
    """After the search: the top configurations and the baseline retrained on fresh seeds, evaluated on test."""

    top_k: int = Field(1, ge=1)  # the best configurations by the primary objective on validation
    pareto: bool = False  # confirm the whole Pareto front instead of the top_k
    seeds: list[int] | int = 3  # fresh seeds: a count (search seed + 1, + 2, ...) or a list
    attacks: list[Attack] | None = Field(None, min_length=1)  # None: the experiment's final suite
    examples: int | None = Field(None, ge=1)  # None: the whole test split


class TrackingConfig(Strict):
    uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db
    experiment: str = "nslab"


class StorageConfig(Strict):
    ray: str | None = None  # Ray Tune results and trial checkpoints; None: <cwd>/ray_results
    optuna: str | None = None  # e.g. sqlite:///optuna.db; None: in memory, saved in Tune's searcher state


class StudyFile(Strict):
    study: StudyBlock
    experiment: ExperimentConfig
    search_space: dict[str, ParamSpec] = Field(min_length=1)
    baseline: BaselineBlock | None = Field(default_factory=BaselineBlock)  # null: no baseline
    confirm: ConfirmBlock | None = Field(default_factory=ConfirmBlock)  # null: no confirmation stage
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)

    @model_validator(mode="after")
    def _check(self) -> StudyFile:
        canonical = {}
        for path, spec in self.search_space.items():
            try:
                full = canonical_path(ExperimentConfig, path)
            except ConfigError as err:
                raise ValueError(f"search_space.{path}: {str(err).removeprefix('config error: ')}") from None
            for value in spec.values() if spec.type != "int" else [spec.low, spec.high]:
                _check_override(self.experiment, full, value, f"search_space.{path}")
            canonical[full] = spec
        self.search_space = canonical
        self.study.points_to_evaluate = [self._point(i, p) for i, p in enumerate(self.study.points_to_evaluate)]
        if self.study.scheduler == "asha" and self.study.grace_period > self.experiment.train.epochs:
            raise ValueError(f"study.grace_period: must be <= experiment.train.epochs "
                             f"({self.experiment.train.epochs}) (got {self.study.grace_period})")
        if self.baseline is not None:
            self.baseline_experiment()  # the baseline's method must exist and build
        if self.confirm is not None:
            seeds = self.confirm_seeds()
            if self.experiment.train.seed in seeds or len(set(seeds)) != len(seeds):
                raise ValueError(f"confirm.seeds: {seeds} must be distinct and fresh (not the search seed "
                                 f"{self.experiment.train.seed})")
        return self

    def _point(self, i: int, point: dict[str, Any]) -> dict[str, Any]:
        where = f"study.points_to_evaluate.{i}"
        point = {canonical_path(ExperimentConfig, p): v for p, v in point.items()}
        if set(point) != set(self.search_space):
            raise ValueError(f"{where}: give a value for each searched path: {', '.join(self.search_space)}")
        for path, value in point.items():
            spec = self.search_space[path]
            if spec.type == "categorical" and value not in spec.choices:
                raise ValueError(f"{where}.{path}: {value!r} is not one of the choices {spec.choices}")
            if spec.type != "categorical" and not spec.low <= value <= spec.high:
                raise ValueError(f"{where}.{path}: {value!r} is outside [{spec.low}, {spec.high}]")
            _check_override(self.experiment, path, value, where)
        return point

    def baseline_method(self) -> str | None:
        if self.baseline is None:
            return None
        return self.baseline.method or self.experiment.base_method

    def baseline_experiment(self, seed: int | None = None) -> ExperimentConfig:
        """The study's experiment with the baseline's method (same budget, data and training attack)."""
        overrides = {"method": self.baseline_method(), "name": f"{self.experiment.name}-baseline"}
        if seed is not None:
            overrides["train.seed"] = seed
        return apply_overrides(self.experiment, overrides)

    def confirm_seeds(self) -> list[int]:
        seeds = self.confirm.seeds if self.confirm is not None else []
        return list(seeds) if isinstance(seeds, list) else [self.experiment.train.seed + 1 + i for i in range(seeds)]

    def warmup_shareable(self) -> bool:
        """SNS trials can fork from one warm-up of their base method when nothing but SNS settings is searched
        and the baseline runs that very base method."""
        return (self.study.share_warmup and self.experiment.method == "sns" and self.baseline is not None
                and self.baseline_method() == self.experiment.sns.base and set(self.search_space) <= set(SNS_ONLY))

    def warmup_epochs(self) -> list[int]:
        """Every warm-up length a trial of this study may ask for."""
        spec = self.search_space.get("sns.warmup_epochs")
        values = spec.values() if spec is not None else [self.experiment.sns.warmup_epochs]
        return sorted({min(int(v), self.experiment.train.epochs) for v in values})


def _check_override(experiment: ExperimentConfig, path: str, value: Any, where: str) -> None:
    try:
        apply_overrides(experiment, {path: value})
    except ConfigError as err:
        raise ValueError(f"{where}: value {value!r} is not valid for {path}: "
                         f"{str(err).removeprefix('config error: ')}") from None


def load_study(path: str | Path) -> StudyFile:
    """Read and validate a study YAML; tracking and storage locations come back absolute."""
    return resolve_locations(load_config(path, StudyFile))


def resolve_locations(study: StudyFile, base: Path | None = None) -> StudyFile:
    """Absolute tracking URI and storage paths (Ray runs each trial in its own working directory)."""
    from orchestrator.tracking import absolute_uri, default_tracking_uri

    base = (base or Path.cwd()).resolve()
    uri = study.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(base)
    study.tracking.uri = absolute_uri(uri, base)
    ray_path = study.storage.ray or str(base / "ray_results")
    study.storage.ray = ray_path if "://" in ray_path else str((base / Path(ray_path).expanduser()).resolve())
    if study.storage.optuna:
        study.storage.optuna = absolute_uri(study.storage.optuna, base)
    return study


def smoke_study(study: StudyFile) -> StudyFile:
    """Two tiny search trials two at a time, no early stopping, the baseline, and a 2-seed confirmation."""
    smoke = study.model_copy(deep=True)
    smoke.experiment = smoke_experiment(study.experiment)
    smoke.study.trials, smoke.study.concurrency, smoke.study.scheduler = 2, 2, "none"
    smoke.study.points_to_evaluate = smoke.study.points_to_evaluate[:2]
    if "sns.warmup_epochs" in smoke.search_space:
        smoke.search_space["sns.warmup_epochs"] = ParamSpec(type="int", low=0, high=1)
    if smoke.confirm is not None:
        seed = smoke.experiment.train.seed
        smoke.confirm = smoke.confirm.model_copy(update={"seeds": [seed + 1, seed + 2], "attacks": None,
                                                         "examples": 64, "top_k": 1, "pareto": False})
    return smoke
