"""Typed configs: YAML -> pydantic models that forbid unknown keys -> ns_core's plain ExperimentSpec.

Two kinds of files (see configs/ and docs/studies.md):

    experiment = load_experiment("configs/experiment/quick.yaml")   # one training run
    study = load_study("configs/study/quick.yaml")                  # study + experiment + search space + ...
    spec = experiment.to_spec()                                      # ns_core.experiment.ExperimentSpec

A file may start from another one with `base: other.yaml` (a path relative to it; its keys are
deep-merged under the file's own); a study's `experiment:` block may do the same. Every mistake is
a `ConfigError`, a ValueError whose message is one line naming the field path and the fix, e.g.
`config error: study.trials: must be >= 1 (got -3)`. Search-space paths are dotted field paths of
the experiment (`sns.lam`, alias `sns.lambda`; `train.lr`; `trades.beta`) and are checked here.
"""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ns_core.attacks import ATTACKS
from ns_core.data import DATASETS
from ns_core.evaluation import AttackSpec
from ns_core.experiment import ExperimentSpec
from ns_core.models import MODELS
from ns_core.objectives import OBJECTIVES
from ns_core.training import TrainConfig
from orchestrator.tracking import default_tracking_uri

_TC = TrainConfig()
EPOCH_METRICS = ("robust_acc", "clean_acc", "sensitivity_all", "sensitivity_selected", "relative_sensitivity_all",
                 "train_loss")  # reported by every epoch of every trial: the metrics a study may optimize


class ConfigError(ValueError):
    """A config mistake; str() is one line starting with 'config error:'."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_by_name=True, validate_by_alias=True)


def _registered(registry, name: str) -> str:
    if name not in registry:
        raise ValueError(registry.unknown_message(name))
    return name


class AttackBlock(Strict):
    """The training attack (PGD on cross-entropy; TRADES uses its eps/steps/alpha for its KL attack)."""

    eps: float = Field(0.3, ge=0)
    steps: int = Field(10, ge=1)
    alpha: float | None = Field(None, gt=0)
    norm: Literal["linf", "l2"] = "linf"


class SNSBlock(Strict):
    lam: float = Field(0.1, ge=0, alias="lambda")
    fraction: float = Field(0.1, gt=0, le=1)
    layers: list[str] | None = None  # None: the model's default layers
    distance: Literal["l1", "l2", "cosine", "relative"] = "l1"
    warmup_epochs: int = Field(1, ge=0)
    reselect_every: int = Field(1, ge=1)
    base: Literal["pgd_at", "trades"] = "pgd_at"


class TradesBlock(Strict):
    beta: float = Field(6.0, ge=0)


class TrainBlock(Strict):
    """ns_core.training.TrainConfig's fields, with its defaults."""

    epochs: int = Field(_TC.epochs, ge=1)
    batch_size: int = Field(_TC.batch_size, ge=1)
    optimizer: Literal["sgd", "adam"] = _TC.optimizer
    lr: float = Field(_TC.lr, gt=0)
    momentum: float = Field(_TC.momentum, ge=0)
    weight_decay: float = Field(_TC.weight_decay, ge=0)
    schedule: Literal["constant", "piecewise", "cosine"] = _TC.schedule
    milestones: list[float] = Field(default_factory=lambda: list(_TC.milestones))
    gamma: float = Field(_TC.gamma, gt=0)
    seed: int = _TC.seed
    device: str = Field(_TC.device, pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$")
    amp: bool = _TC.amp
    val_size: int = Field(_TC.val_size, ge=1)
    val_eps: float = Field(_TC.val_eps, ge=0)
    val_steps: int = Field(_TC.val_steps, ge=1)
    probe_size: int = Field(_TC.probe_size, ge=1)
    sensitivity_fraction: float = Field(_TC.sensitivity_fraction, gt=0, le=1)
    collapse_patience: int = Field(_TC.collapse_patience, ge=1)
    progress: bool | None = False


class EvalAttack(Strict):
    name: str
    eps: float = Field(ge=0)
    norm: str = "linf"
    steps: int = Field(0, ge=0)  # 0: the attack's default
    alpha: float | None = Field(None, gt=0)
    restarts: int = Field(1, ge=1)

    @field_validator("name")
    @classmethod
    def _known_attack(cls, name: str) -> str:
        return _registered(ATTACKS, name)

    @model_validator(mode="after")
    def _check(self) -> EvalAttack:
        self.spec()  # ns_core's own checks (norms, steps, restarts per attack)
        return self

    def spec(self) -> AttackSpec:
        return AttackSpec(**self.model_dump())


class EvalBlock(Strict):
    """The final evaluation on the test split."""

    attacks: list[EvalAttack] = Field(default_factory=lambda: [EvalAttack(name="fgsm", eps=0.3),
                                                               EvalAttack(name="pgd", eps=0.3, steps=20)])
    examples: int | None = Field(None, ge=1)  # None: the whole test split


class DataBlock(Strict):
    root: str | None = None
    download: bool = False
    train_limit: int | None = Field(None, ge=1)
    test_limit: int | None = Field(None, ge=1)


class ExperimentConfig(Strict):
    name: str = Field("experiment", pattern=r"^[A-Za-z0-9_.-]+$")
    dataset: str = "mnist5k"
    model: str = "lenet5"
    method: str = "sns"
    attack: AttackBlock = Field(default_factory=AttackBlock)
    sns: SNSBlock = Field(default_factory=SNSBlock)
    trades: TradesBlock = Field(default_factory=TradesBlock)
    train: TrainBlock = Field(default_factory=TrainBlock)
    eval: EvalBlock = Field(default_factory=EvalBlock)
    data: DataBlock = Field(default_factory=DataBlock)

    @field_validator("dataset", "model", "method")
    @classmethod
    def _registered_name(cls, name: str, info) -> str:
        return _registered({"dataset": DATASETS, "model": MODELS, "method": OBJECTIVES}[info.field_name], name)

    @model_validator(mode="after")
    def _trades_is_linf(self) -> ExperimentConfig:
        uses_trades = self.method == "trades" or (self.method == "sns" and self.sns.base == "trades")
        if uses_trades and self.attack.norm != "linf":
            raise ValueError("attack.norm: TRADES attacks in Linf only; set attack.norm: linf")
        return self

    def method_params(self) -> dict[str, Any]:
        """Keyword arguments of ns_core.objectives.create_objective(self.method, ...)."""
        attack = self.attack.model_dump()
        if self.method == "standard":
            return {}
        if self.method == "pgd_at":
            return attack
        if self.method == "trades":
            return {**{k: attack[k] for k in ("eps", "steps", "alpha")}, "beta": self.trades.beta}
        if self.method == "sns":
            return {**attack, **self.sns.model_dump(), "beta": self.trades.beta}
        raise ValueError(f"method {self.method!r} has no parameter mapping in orchestrator.config")

    def to_spec(self) -> ExperimentSpec:
        return ExperimentSpec(
            dataset=self.dataset, model=self.model, method=self.method, method_params=self.method_params(),
            train=TrainConfig(**self.train.model_dump()), data_root=self.data.root, download=self.data.download,
            train_limit=self.data.train_limit, test_limit=self.data.test_limit,
            eval_attacks=[a.spec() for a in self.eval.attacks], eval_examples=self.eval.examples)


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
        return [json.dumps(c) if isinstance(c, list | dict) else c for c in self.choices or []]

    def decode(self, value: Any) -> Any:
        """An Optuna value back to the config value (a JSON-encoded choice back to its list)."""
        if self.type == "categorical":
            encoded = self.optuna_choices()
            return self.choices[encoded.index(value)] if value in encoded else value
        return int(value) if self.type == "int" else float(value)

    def edge_values(self) -> list:
        return list(self.choices) if self.type == "categorical" else [self.low, self.high]


class Objective(Strict):
    metric: str
    mode: Literal["max", "min"] = "max"

    @field_validator("metric")
    @classmethod
    def _known(cls, metric: str) -> str:
        if metric not in EPOCH_METRICS:
            raise ValueError(f"unknown metric {metric!r}; choose one of: {', '.join(EPOCH_METRICS)}")
        return metric


class Resources(Strict):
    cpu: float = Field(1.0, gt=0)
    gpu: float = Field(0.0, ge=0)  # fractions (e.g. 0.5) share one GPU between trials

    @field_validator("gpu")
    @classmethod
    def _whole_above_one(cls, gpu: float) -> float:
        if gpu > 1 and not float(gpu).is_integer():
            raise ValueError(f"more than one GPU must be a whole number (got {gpu})")
        return gpu


class StudyConfig(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    trials: int = Field(ge=1)
    concurrency: int = Field(1, ge=1)
    objectives: list[Objective] = Field(min_length=1)
    sampler: Literal["tpe", "nsga2"] = "tpe"
    population_size: int | None = Field(None, ge=2)  # nsga2; None: 2 x concurrency (at least 4)
    scheduler: Literal["asha", "none"] = "none"
    grace_period: int = Field(1, ge=1)  # asha: epochs every trial gets before it can be stopped
    reduction_factor: float = Field(2.0, gt=1)
    resources: Resources = Field(default_factory=Resources)
    seed: int = 0
    max_failures: int = Field(1, ge=0)  # retries of a trial whose worker failed (Ray FailureConfig)
    points_to_evaluate: list[dict[str, Any]] = Field(default_factory=list)  # Optuna runs these first

    @field_validator("objectives")
    @classmethod
    def _unique(cls, objectives: list[Objective]) -> list[Objective]:
        metrics = [o.metric for o in objectives]
        if len(set(metrics)) != len(metrics):
            raise ValueError(f"each metric may appear once (got {metrics})")
        return objectives


class TrackingConfig(Strict):
    uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db
    experiment: str = "nslab"


class StorageConfig(Strict):
    ray: str | None = None  # Ray Tune results and trial checkpoints; None: <cwd>/ray_results
    optuna: str | None = None  # e.g. sqlite:///optuna.db; None: in memory, saved in Tune's searcher state


class StudyFile(Strict):
    study: StudyConfig
    experiment: ExperimentConfig
    search_space: dict[str, ParamSpec] = Field(min_length=1)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)

    @model_validator(mode="after")
    def _check_space(self) -> StudyFile:
        canonical = {}
        for path, spec in self.search_space.items():
            try:
                full = canonical_path(path)
            except ValueError as err:
                raise ValueError(f"search_space.{path}: {err}") from None
            for value in spec.edge_values():
                _check_override(self.experiment, full, value, f"search_space.{path}")
            canonical[full] = spec
        self.search_space = canonical
        points = []
        for i, point in enumerate(self.study.points_to_evaluate):
            where = f"study.points_to_evaluate.{i}"
            point = {canonical_path(p): v for p, v in point.items()}
            if set(point) != set(canonical):
                raise ValueError(f"{where}: give a value for each searched path: {', '.join(canonical)}")
            for path, value in point.items():
                spec = canonical[path]
                if spec.type == "categorical" and value not in spec.choices:
                    raise ValueError(f"{where}.{path}: {value!r} is not one of the choices {spec.choices}")
                if spec.type != "categorical" and not spec.low <= value <= spec.high:
                    raise ValueError(f"{where}.{path}: {value!r} is outside [{spec.low}, {spec.high}]")
                _check_override(self.experiment, path, value, where)
            points.append(point)
        self.study.points_to_evaluate = points
        if self.study.scheduler == "asha" and self.study.grace_period > self.experiment.train.epochs:
            raise ValueError(f"study.grace_period: must be <= experiment.train.epochs "
                             f"({self.experiment.train.epochs}) (got {self.study.grace_period})")
        return self



# ---- paths and overrides -------------------------------------------------------------------------

def canonical_path(path: str) -> str:
    """'sns.lambda' -> 'sns.lam'; a path that names no experiment leaf field raises naming the valid ones."""
    cls: type[BaseModel] = ExperimentConfig
    parts = []
    segments = path.split(".")
    for i, segment in enumerate(segments):
        fields = cls.model_fields
        name = next((n for n, f in fields.items() if segment in (n, f.alias)), None)
        if name is None:
            where = ".".join(parts) or "the experiment"
            names = [f"{n} (alias {f.alias})" if f.alias else n for n, f in fields.items()]
            raise ValueError(f"{path!r} is not an experiment field; {where} has: {', '.join(names)}")
        parts.append(name)
        annotation = fields[name].annotation
        is_block = isinstance(annotation, type) and issubclass(annotation, BaseModel)
        if is_block and i == len(segments) - 1:
            raise ValueError(f"{path!r} is a block; search one of its fields: "
                             f"{', '.join(f'{path}.{f}' for f in annotation.model_fields)}")
        if not is_block and i < len(segments) - 1:
            raise ValueError(f"{'.'.join(parts)} has no sub-fields (path {path!r})")
        if is_block:
            cls = annotation
    return ".".join(parts)


def apply_overrides(experiment: ExperimentConfig, overrides: dict[str, Any]) -> ExperimentConfig:
    """A copy of `experiment` with dotted-path fields set to new values (validated again)."""
    data = experiment.model_dump()
    for path, value in overrides.items():
        *blocks, leaf = canonical_path(path).split(".")
        target = data
        for block in blocks:
            target = target[block]
        target[leaf] = value
    return ExperimentConfig.model_validate(data)


def _check_override(experiment: ExperimentConfig, path: str, value: Any, where: str) -> None:
    try:
        apply_overrides(experiment, {path: value})
    except ValidationError as err:
        raise ValueError(f"{where}: value {value!r} is not valid for {path}: "
                         f"{_format_errors(err, ExperimentConfig)}") from None


# ---- loading and one-line errors -----------------------------------------------------------------

def load_experiment(path: str | Path, overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    """Read and validate an experiment YAML; `overrides` ({dotted path: value}) are applied on top."""
    data = _read_yaml(Path(path))
    try:
        experiment = ExperimentConfig.model_validate(data)
        return apply_overrides(experiment, overrides) if overrides else experiment
    except ValidationError as err:
        raise ConfigError(f"config error: {_format_errors(err, ExperimentConfig)} (in {path})") from None
    except ValueError as err:
        raise ConfigError(f"config error: {err} (in {path})") from None


def load_study(path: str | Path) -> StudyFile:
    """Read and validate a study YAML; tracking and storage locations come back absolute."""
    path = Path(path)
    data = _read_yaml(path)
    if isinstance(data.get("experiment"), dict) and "base" in data["experiment"]:
        data["experiment"] = _with_base(data["experiment"], path.parent)
    try:
        study = StudyFile.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"config error: {_format_errors(err, StudyFile)} (in {path})") from None
    return resolve_locations(study)


def resolve_locations(study: StudyFile, base: Path | None = None) -> StudyFile:
    """Absolute tracking URI and storage paths (Ray runs each trial in its own working directory)."""
    base = (base or Path.cwd()).resolve()
    uri = study.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(base)
    study.tracking.uri = absolute_uri(uri, base)
    ray_path = study.storage.ray or str(base / "ray_results")
    study.storage.ray = ray_path if "://" in ray_path else str((base / Path(ray_path).expanduser()).resolve())
    if study.storage.optuna:
        study.storage.optuna = absolute_uri(study.storage.optuna, base)
    return study


def absolute_uri(uri: str, base: Path) -> str:
    """sqlite:///relative.db -> sqlite:////abs/relative.db; http(s) and other URIs are kept; a bare path
    is refused (MLflow 3 no longer reads a ./mlruns file store)."""
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///")).expanduser()
        return f"sqlite:///{(base / db).resolve()}"
    if "://" not in uri:
        raise ConfigError(f"config error: tracking.uri: {uri!r} is not a URI; use sqlite:///{uri}/mlflow.db "
                          "or http://host:5000 (MLflow 3 has no ./mlruns file store)")
    return uri


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist; see configs/ for examples")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"config error: {path}: YAML syntax error{where}: {problem}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config error: {path}: the top level must be a mapping of keys, got {type(data).__name__}")
    nested = data.get("experiment")
    if isinstance(nested, dict) and "base" in nested:  # relative to the file that says it
        data["experiment"] = {**nested, "base": str((path.parent / str(nested["base"])).resolve())}
    return _with_base(data, path.parent) if "base" in data else data


def _with_base(data: dict, directory: Path) -> dict:
    """Deep-merge `data` over the file named by its `base` key (relative to `directory`)."""
    data = dict(data)
    base = _read_yaml((directory / str(data.pop("base"))).resolve())
    return _deep_merge(base, data)


def _deep_merge(base: dict, top: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in top.items():
        merged[key] = _deep_merge(merged[key], value) if isinstance(value, dict) and isinstance(
            merged.get(key), dict) else value
    return merged


def _format_errors(err: ValidationError, root: type[BaseModel]) -> str:
    """pydantic's errors as one line: 'study.trials: must be >= 1 (got -3); ...'."""
    return "; ".join(_format_error(e, root) for e in err.errors())


def _format_error(e: dict, root: type[BaseModel]) -> str:
    loc = ".".join(str(part) for part in e["loc"])
    kind, ctx, given = e["type"], e.get("ctx", {}), e.get("input")
    bounds = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}
    if kind == "extra_forbidden":
        valid = _fields_at(root, e["loc"][:-1])
        return f"{loc}: unknown key {e['loc'][-1]!r}; valid keys: {', '.join(valid)}"
    if kind in bounds:
        limit = next(iter(ctx.values()))
        return f"{loc}: must be {bounds[kind]} {limit} (got {given!r})"
    if kind == "literal_error":
        return f"{loc}: must be one of: {ctx.get('expected')} (got {given!r})"
    if kind == "missing":
        return f"{loc}: required field is missing; add it"
    if kind == "string_pattern_mismatch":
        return f"{loc}: {given!r} must match {ctx.get('pattern')}"
    message = re.sub(r"^(Value error|Assertion failed), ", "", e["msg"])
    message = message.replace("Input should be", "must be")
    shown = "" if kind in ("value_error", "assertion_error") else f" (got {given!r})"
    return f"{loc}: {message}{shown}" if loc else f"{message}{shown}"


def _fields_at(root: type[BaseModel], loc: tuple) -> list[str]:
    """The valid keys of the model found by walking `loc` from `root` (skipping list/dict indexes)."""
    cls = root
    for part in loc:
        field = cls.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            continue
        annotation = field.annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        nested = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        if nested:
            cls = nested[0]
    return [f.alias or name for name, f in cls.model_fields.items()]


# ---- budgets and settings -----------------------------------------------------------------------

def smoke_experiment(experiment: ExperimentConfig) -> ExperimentConfig:
    """The same experiment at a seconds-long budget (the pipelines' --smoke-test)."""
    return apply_overrides(experiment, {
        "train.epochs": min(experiment.train.epochs, 1 if experiment.sns.warmup_epochs == 0 else 2),
        "train.val_size": 64, "train.val_steps": 2, "train.probe_size": 64, "attack.steps": 2,
        "data.train_limit": min(experiment.data.train_limit or 256, 256),
        "data.test_limit": min(experiment.data.test_limit or 128, 128), "eval.examples": 64,
        "eval.attacks": [{**a.model_dump(), "steps": min(a.steps, 3) if a.steps else 0, "restarts": 1}
                         for a in experiment.eval.attacks[:2]],
        "sns.warmup_epochs": min(experiment.sns.warmup_epochs, 1),
    })


def smoke_study(study: StudyFile) -> StudyFile:
    """Two one-or-two-epoch trials, two at a time, no early stopping."""
    smoke = study.model_copy(deep=True)
    smoke.experiment = smoke_experiment(study.experiment)
    smoke.study.trials, smoke.study.concurrency, smoke.study.scheduler = 2, 2, "none"
    smoke.study.points_to_evaluate = smoke.study.points_to_evaluate[:2]
    return smoke


def settings_text(model: BaseModel) -> str:
    """The resolved settings as YAML (for --dry-run and the MLflow parent run)."""
    return yaml.safe_dump(model.model_dump(mode="json"), sort_keys=False, width=120)
