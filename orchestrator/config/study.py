"""The study config (configs/study/*.yaml): an experiment, a search space, two arms, a sequential
confirmation, and where results go.

    study = load_study("configs/study/quick.yaml", {"study.trials": 3})   # overrides get the YAML's checks
    for arm in study.arms(): ...                 # the baseline arm, then the method's arm

Search-space paths are dotted experiment fields (`sns.lam`, alias `sns.lambda`; `train.lr`). Two arms are
searched alike (same searcher, scheduler, trial count and maximum epochs): the baseline arm (the SNS base
method, or `baseline.method`) over the shared paths (every path outside `sns.*`: the training recipe), the
method's arm over all of them. Every combination of the space's edges and choices is validated before
anything trains. Metrics a study optimizes are validation metrics (`val/robust_acc`, ...): choosing on test
would report optimistic numbers.
"""

from __future__ import annotations

import difflib
import itertools
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from orchestrator.config.experiment import EvalAttack, ExperimentConfig, smoke_experiment, threat_model_notes
from orchestrator.config.loader import ConfigError, Strict, apply_overrides, canonical_path, config_kind, load_config
from orchestrator.results import count

VAL_METRICS = ("val/robust_acc", "val/clean_acc", "val/sensitivity_all", "val/sensitivity_selected",
               "val/relative_sensitivity_all")  # reported by every epoch of every trial
MAX_COMBINATIONS = 256  # edge combinations checked at load time (a seeded sample beyond this)


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

    def edges(self) -> list:
        """The values that test a combination: a categorical's choices, the bounds of a number."""
        return list(self.choices) if self.type == "categorical" else [self.decode(self.low), self.decode(self.high)]


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
    trials: int = Field(ge=1)  # search trials per arm
    concurrency: int = Field(1, ge=1)
    objectives: list[StudyMetric] = Field(min_length=1)  # the first is the primary one (ASHA, confirmation)
    sampler: Literal["tpe", "nsga2"] = "tpe"
    population_size: int | None = Field(None, ge=2)  # nsga2; None: 2 x concurrency (at least 4)
    scheduler: Literal["asha", "none"] = "none"  # asha: multi-fidelity on the primary objective, per arm
    grace_period: int = Field(1, ge=1)  # asha: epochs every trial gets before it can be stopped
    reduction_factor: float = Field(2.0, gt=1)
    resources: Resources = Field(default_factory=Resources)
    seed: int = 0  # the searchers' (each arm's Optuna sampler)
    max_failures: int = Field(1, ge=0)  # retries of a trial whose worker failed (Ray FailureConfig)
    points_to_evaluate: list[dict[str, Any]] = Field(default_factory=list)  # the method's arm runs these first
    share_warmup: bool = True  # SNS trials fork from one shared warm-up of their base method where they can

    @field_validator("objectives")
    @classmethod
    def _unique(cls, objectives: list[StudyMetric]) -> list[StudyMetric]:
        metrics = [o.metric for o in objectives]
        if len(set(metrics)) != len(metrics):
            raise ValueError(f"each metric may appear once (got {metrics})")
        return objectives


class BaselineBlock(Strict):
    """The reference arm: another method (default: the SNS base) searched like the method's arm."""

    method: str | None = None  # None: the SNS base method (e.g. pgd_at)
    tune: bool = True  # false: one untuned trial with the experiment's recipe (verdicts say so)
    trials: int | Literal["same"] = "same"  # searched trials: "same" as study.trials (an equal budget)

    @field_validator("trials")
    @classmethod
    def _positive(cls, trials: int | str) -> int | str:
        if isinstance(trials, int) and trials < 1:
            raise ValueError(f"must be >= 1 or 'same' (got {trials})")
        return trials


class ConfirmBlock(Strict):
    """Each arm's best retrained on fresh seeds, judged on the test split, seeds added until decided."""

    top_k: int = Field(1, ge=1)  # the method arm's best configurations by the primary objective on validation
    pareto: bool = False  # confirm the method arm's whole Pareto front instead of the top_k
    seeds: list[int] | int = 3  # the first seeds: a count (search seed + 1, + 2, ...) or a list
    max_seeds: int = Field(10, ge=1)  # stop there undecided
    margin: float = Field(1.0, gt=0)  # equivalence margin, in accuracy points
    attacks: list[EvalAttack] | None = Field(None, min_length=1)  # None: the experiment's final suite; an attack
    # that leaves out eps and norm attacks at the training attack's (orchestrator/config/experiment.py)
    examples: int | None = Field(None, ge=1)  # None: the whole test split


class TrackingConfig(Strict):
    uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db
    experiment: str = "nslab"


class StorageConfig(Strict):
    ray: str | None = None  # Ray Tune results and trial checkpoints; None: <cwd>/ray_results
    optuna: str | None = None  # e.g. sqlite:///optuna.db; None: in memory, saved in Tune's searcher state


@dataclass(frozen=True)
class Arm:
    """One side of the comparison: a method, the paths it searches and its trial count (`tuned` False: one
    fixed trial of the experiment's recipe)."""

    name: str  # "baseline", or the study's method ("sns")
    method: str
    experiment: ExperimentConfig
    space: dict[str, ParamSpec]
    trials: int
    tuned: bool

    def describe(self) -> str:
        """'SNS, tuned over 16 trials' / 'an untuned PGD-AT baseline'."""
        name = self.method.upper().replace("_", "-")
        return f"{name}, tuned over {count(self.trials, 'trial')}" if self.tuned else f"an untuned {name} baseline"


@config_kind("a study config", "python -m pipelines.study")
class StudyFile(Strict):
    # a search_space key is an experiment path: --set search_space.sns.lambda.high=1 changes the entry sns.lam
    mapping_keys: ClassVar[dict[str, Callable[[str], str]]] = {
        "search_space": lambda path: canonical_path(ExperimentConfig, path)}

    study: StudyBlock
    experiment: ExperimentConfig
    search_space: dict[str, ParamSpec] = Field(min_length=1)
    baseline: BaselineBlock | None = Field(default_factory=BaselineBlock)  # null: no baseline arm
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
                _check_override(self.experiment, {full: value}, f"search_space.{path}")
            canonical[full] = spec
        self.search_space = canonical
        self.study.points_to_evaluate = [self._point(i, p) for i, p in enumerate(self.study.points_to_evaluate)]
        if self.study.scheduler == "asha" and self.study.grace_period >= self.max_epochs():
            raise ValueError(f"study.grace_period: must be < the maximum epochs ({self.max_epochs()}) for ASHA to "
                             f"have a rung (got {self.study.grace_period})")
        for arm in self.arms():  # every combination of edges and choices builds, before anything trains
            check_combinations(arm.experiment, arm.space, f"the {arm.name} arm's search space")
        if self.confirm is not None:
            seeds = self.confirm_seeds()
            if self.experiment.train.seed in seeds or len(set(seeds)) != len(seeds):
                raise ValueError(f"confirm.seeds: {seeds} must be distinct and fresh (not the search seed "
                                 f"{self.experiment.train.seed})")
            if len(seeds) > self.confirm.max_seeds:
                raise ValueError(f"confirm.max_seeds ({self.confirm.max_seeds}) must be >= the first seeds "
                                 f"({len(seeds)})")
            for i, spec in enumerate(self.confirm.attacks or []):
                try:
                    spec.resolve(self.experiment.attack)
                except ValueError as err:
                    raise ValueError(f"confirm.attacks.{i}: {err}") from None
        return self

    def threat_model_notes(self) -> list[str]:
        """The experiment's evaluation attacks and the confirmation's whose eps or norm the config sets apart from
        the training attack's, one line each; empty when all follow the study's threat model."""
        attacks = self.confirm.attacks if self.confirm is not None else None
        return self.experiment.threat_model_notes("experiment.") + threat_model_notes(self.experiment.attack, [
            ("confirmation attack", f"confirm.attacks[{i}]", a) for i, a in enumerate(attacks or [])])

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
        _check_override(self.experiment, point, where)
        return point

    def baseline_method(self) -> str | None:
        if self.baseline is None:
            return None
        return self.baseline.method or self.experiment.base_method

    def baseline_experiment(self) -> ExperimentConfig:
        """The study's experiment with the baseline's method (same data, recipe and training attack)."""
        return apply_overrides(self.experiment, {"method": self.baseline_method(),
                                                 "name": f"{self.experiment.name}-baseline"})

    def arms(self) -> list[Arm]:
        """The baseline arm (when there is a baseline), then the method's arm."""
        arms = []
        if self.baseline is not None:
            shared = {p: s for p, s in self.search_space.items() if not p.startswith("sns.")}
            tuned = self.baseline.tune and bool(shared)
            trials = self.study.trials if self.baseline.trials == "same" else self.baseline.trials
            arms.append(Arm("baseline", self.baseline_method(), self.baseline_experiment(),
                            shared if tuned else {}, trials if tuned else 1, tuned))
        arms.append(Arm(self.experiment.method, self.experiment.method, self.experiment, dict(self.search_space),
                        self.study.trials, True))
        return arms

    def max_epochs(self) -> int:
        """The most epochs any trial of either arm trains (ASHA's max_t; the arms' shared budget)."""
        spec = self.search_space.get("train.epochs")
        return int(max(spec.values())) if spec is not None else self.experiment.train.epochs

    def confirm_seeds(self, count: int | None = None) -> list[int]:
        """The first `count` confirmation seeds (default: the initial ones): the listed seeds, then fresh ones
        counting up from the search seed."""
        if self.confirm is None:
            return []
        given = list(self.confirm.seeds) if isinstance(self.confirm.seeds, list) else []
        count = count if count is not None else (len(given) or int(self.confirm.seeds))
        seeds, candidate = given[:count], self.experiment.train.seed + 1
        while len(seeds) < count:
            if candidate not in seeds and candidate != self.experiment.train.seed:
                seeds.append(candidate)
            candidate += 1
        return seeds


def check_combinations(experiment: ExperimentConfig, space: dict[str, ParamSpec], where: str) -> int:
    """Validate the experiment at every combination of the space's edges (float and int bounds, every
    categorical choice); beyond MAX_COMBINATIONS a seeded sample of them. Returns how many were checked."""
    paths = list(space)
    grid = [space[p].edges() for p in paths]
    total = 1
    for values in grid:
        total *= len(values)
    combos = itertools.product(*grid)
    if total > MAX_COMBINATIONS:
        rng = random.Random(0)
        combos = [tuple(rng.choice(values) for values in grid) for _ in range(MAX_COMBINATIONS)]
    checked = 0
    for combo in combos:
        _check_override(experiment, dict(zip(paths, combo, strict=True)), where)
        checked += 1
    return checked


def _check_override(experiment: ExperimentConfig, values: dict[str, Any], where: str) -> None:
    try:
        apply_overrides(experiment, values)
    except ConfigError as err:
        shown = ", ".join(f"{p}={v!r}" for p, v in values.items())
        raise ValueError(f"{where}: {shown} is not valid: {str(err).removeprefix('config error: ')}") from None


def load_study(path: str | Path, overrides: dict[str, Any] | None = None,
               origins: dict[str, str] | None = None) -> StudyFile:
    """Read and validate a study YAML with `overrides` ({dotted path: value}, e.g. from command-line flags; their
    `origins` name the flag in an error) on top; tracking and storage locations come back absolute."""
    return resolve_locations(load_config(path, StudyFile, overrides, origins))


def resolve_locations(study: StudyFile, base: Path | None = None) -> StudyFile:
    """Absolute tracking URI and storage paths (Ray runs each trial in its own working directory)."""
    from orchestrator.record.tracking import absolute_uri, resolve_tracking_uri

    base = (base or Path.cwd()).resolve()
    study.tracking.uri = resolve_tracking_uri(None, study.tracking.uri, base)
    ray_path = study.storage.ray or str(base / "ray_results")
    study.storage.ray = ray_path if "://" in ray_path else str((base / Path(ray_path).expanduser()).resolve())
    if study.storage.optuna:
        study.storage.optuna = absolute_uri(study.storage.optuna, base)
    return study


def smoke_study(study: StudyFile) -> StudyFile:
    """Two tiny search trials per arm two at a time, no early stopping, and a 2-seed confirmation."""
    smoke = study.model_copy(deep=True)
    smoke.experiment = smoke_experiment(study.experiment)
    smoke.study.trials, smoke.study.concurrency, smoke.study.scheduler = 2, 2, "none"
    smoke.study.points_to_evaluate = smoke.study.points_to_evaluate[:2]
    space = dict(smoke.search_space)
    for path in ("train.epochs", "train.eps_ramp_epochs", "sns.warmup_epochs", "sns.warmup_share"):
        space.pop(path, None)  # the smoke budget fixes epochs (2) and warm-up (1)
    smoke.search_space = space or {"sns.lam": ParamSpec(type="float", low=0.01, high=1.0, log=True)}
    smoke.study.points_to_evaluate = [{p: v for p, v in point.items() if p in space}
                                      for point in smoke.study.points_to_evaluate] if space else []
    if smoke.confirm is not None:
        seed = smoke.experiment.train.seed
        smoke.confirm = smoke.confirm.model_copy(update={"seeds": [seed + 1, seed + 2], "attacks": None,
                                                         "examples": 64, "top_k": 1, "pareto": False,
                                                         "max_seeds": 2})
    return StudyFile.model_validate(smoke.model_dump(mode="json"))
