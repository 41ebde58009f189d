"""Typed YAML for `analyze methods`: which methods, seeds, budget, attack suite, and Ray resources.

    config = load_methods_config("configs/analysis/methods_quick.yaml")   # ValueError on a bad key
    specs = config.specs()                  # (label, seed) -> ns_core ExperimentSpec

Every model forbids unknown keys; `train` is checked against ns_core's TrainConfig fields and each
method's params against its objective's signature, so a typo fails before any training starts.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ns_core.data import dataset_names
from ns_core.experiment import ExperimentSpec
from ns_core.models import model_names
from ns_core.objectives import create_objective
from ns_core.training import TrainConfig
from orchestrator.config import EvalAttack


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MethodEntry(Strict):
    label: str
    method: str
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _builds(self) -> MethodEntry:
        create_objective(self.method, **self.params)  # ValueError naming the method's parameters
        return self


class EvalSection(Strict):
    attacks: list[EvalAttack] = Field(min_length=1)
    examples: int | None = None  # None: the whole test split


class SensitivitySection(Strict):
    """Each final model's sensitivity: its own PGD on the first `examples` test images."""

    examples: int = Field(500, ge=1)
    eps: float | None = None  # None: the first eval attack's eps
    steps: int = Field(10, ge=1)
    layers: list[str] | None = None  # None: the model's default_layers


class RaySection(Strict):
    address: str | None = None  # None: a private local Ray; "auto" or "ray://host:10001": a cluster
    num_cpus: int | None = None  # local Ray only; None: all cores
    cpus_per_task: int = Field(1, ge=1)
    gpus_per_task: float = Field(0, ge=0)


class MethodsConfig(Strict):
    name: str
    dataset: str = "mnist5k"
    model: str = "lenet5"
    data_root: str | None = None
    download: bool = False
    train_limit: int | None = None
    test_limit: int | None = None
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    train: dict[str, Any] = Field(default_factory=dict)
    methods: list[MethodEntry] = Field(min_length=1)
    paired: list[tuple[str, str]] = Field(default_factory=lambda: [("sns", "pgd_at")])
    eval: EvalSection
    sensitivity: SensitivitySection = Field(default_factory=SensitivitySection)
    ray: RaySection = Field(default_factory=RaySection)
    checkpoint_dir: str = "runs/analysis"  # relative paths resolve against the working directory

    @field_validator("dataset")
    @classmethod
    def _dataset(cls, name: str) -> str:
        if name not in dataset_names():
            raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(dataset_names())}")
        return name

    @field_validator("model")
    @classmethod
    def _model(cls, name: str) -> str:
        if name not in model_names():
            raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(model_names())}")
        return name

    @field_validator("train")
    @classmethod
    def _train(cls, train: dict[str, Any]) -> dict[str, Any]:
        valid = [f.name for f in dataclasses.fields(TrainConfig)]
        unknown = sorted(set(train) - set(valid))
        if unknown:
            raise ValueError(f"unknown train key(s) {', '.join(unknown)}; valid: {', '.join(valid)}")
        TrainConfig(**train)
        return train

    @model_validator(mode="after")
    def _labels(self) -> MethodsConfig:
        labels = [m.label for m in self.methods]
        if len(set(labels)) != len(labels):
            raise ValueError(f"method labels must be unique, got {labels}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be unique, got {self.seeds}")
        for a, b in self.paired:
            if a not in labels or b not in labels:
                raise ValueError(f"paired ({a}, {b}) names a label that is not a method; labels: {labels}")
        return self

    def spec(self, entry: MethodEntry, seed: int) -> ExperimentSpec:
        return ExperimentSpec(
            dataset=self.dataset, model=self.model, method=entry.method, method_params=dict(entry.params),
            train=TrainConfig(**{**self.train, "seed": seed}), data_root=self.data_root, download=self.download,
            train_limit=self.train_limit, test_limit=self.test_limit,
            eval_attacks=[a.spec() for a in self.eval.attacks], eval_examples=self.eval.examples)

    def sensitivity_eps(self) -> float:
        return self.sensitivity.eps if self.sensitivity.eps is not None else self.eval.attacks[0].eps

    def smoke(self) -> MethodsConfig:
        """The same comparison on a seconds-sized budget (the tests run it): 2 seeds, 2 epochs of 256
        digits with PGD-2, a PGD-3 evaluation on 64 test digits."""
        def shrink(entry: MethodEntry) -> MethodEntry:
            params = dict(entry.params)
            if "steps" in params or entry.method != "standard":
                params["steps"] = 2
            if "warmup_epochs" in params:
                params["warmup_epochs"] = 1
            return MethodEntry(label=entry.label, method=entry.method, params=params)

        eps = self.eval.attacks[0].eps
        train = {**self.train, "epochs": 2, "val_size": 64, "val_steps": 2, "probe_size": 64, "progress": False}
        return self.model_copy(update={
            "name": f"{self.name}-smoke", "seeds": self.seeds[:2], "train": train, "train_limit": 256,
            "test_limit": 128, "methods": [shrink(m) for m in self.methods],
            "eval": EvalSection(attacks=[EvalAttack(name="pgd", eps=eps, steps=3)], examples=64),
            "sensitivity": self.sensitivity.model_copy(update={"examples": 64, "steps": 2}),
            "ray": self.ray.model_copy(update={"num_cpus": self.ray.num_cpus or 2}),
        })


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The config model that holds the key at `loc` (walks nested models and lists of them)."""
    model: type[BaseModel] = MethodsConfig
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        found = [t for t in (field.annotation, *typing.get_args(field.annotation))
                 if isinstance(t, type) and issubclass(t, BaseModel)]
        if not found:
            return None
        model = found[0]
    return model


def config_error(err: ValidationError, path: str | Path) -> str:
    """A pydantic error as one line: where, what, and the valid keys when a key was unknown."""
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "(top level)"
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        model = _model_at(first["loc"])
        message = "unknown key" + (f"; valid keys here: {', '.join(model.model_fields)}" if model else "")
    more = f" (+{len(err.errors()) - 1} more problem(s))" if len(err.errors()) > 1 else ""
    return f"{path}: {where}: {message}{more}"


def load_methods_config(path: str | Path) -> MethodsConfig:
    """Read and validate a methods YAML; every problem is a one-line ValueError."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config {path} does not exist; try configs/analysis/methods_quick.yaml")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must hold a mapping of keys (name, methods, seeds, ...)")
    try:
        return MethodsConfig(**raw)
    except ValidationError as err:
        raise ValueError(config_error(err, path)) from None
