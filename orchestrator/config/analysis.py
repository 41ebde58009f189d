"""Typed YAML for `analyze methods` (claim 3), built from the experiment's own blocks.

    config = load_methods_config("configs/analysis/methods_quick.yaml")
    experiment = config.experiment_for(config.methods[3], seed=1)    # an ExperimentConfig

The shared budget is one `experiment:` block (an experiment YAML, usually `base:` one in configs/experiment/);
each method names its `method` and, where it differs, its own `attack`, `sns` or `trades` block. Everything
goes through orchestrator.config.loader, so a typo is one line naming the field and the closest valid key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from ns_core.attacks import Attack
from orchestrator.config.experiment import EvalAttack, ExperimentConfig, SNSBlock, TradesBlock, smoke_experiment
from orchestrator.config.loader import Strict, config_kind, load_config, validate
from orchestrator.config.study import Resources, TrackingConfig


class MethodEntry(Strict):
    label: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    method: str
    attack: Attack | None = None  # None: the experiment's training attack
    sns: SNSBlock | None = None
    trades: TradesBlock | None = None


class SensitivityBlock(Strict):
    """Each final model's sensitivity on the first `examples` test images against its own attack."""

    examples: int = Field(500, ge=1)
    attack: EvalAttack | None = None  # None: PGD-10 at the training attack's norm and eps (so is a left-out eps)


@config_kind("a methods-analysis config", "python -m pipelines.analyze methods")
class MethodsConfig(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    experiment: ExperimentConfig
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    methods: list[MethodEntry] = Field(min_length=1)
    paired: list[tuple[str, str]] = Field(default_factory=lambda: [("sns", "pgd_at")])
    margin: float = Field(1.0, gt=0)  # equivalence margin of the paired verdicts, in accuracy points
    sensitivity: SensitivityBlock = Field(default_factory=SensitivityBlock)
    resources: Resources = Field(default_factory=Resources)
    max_failures: int = Field(1, ge=0)
    share_warmup: bool = True  # SNS forks from the same seed's base-method run after its warm-up
    tracking: TrackingConfig = Field(default_factory=lambda: TrackingConfig(experiment="nslab-analysis"))
    storage: str | None = None  # Ray Tune results; None: <cwd>/ray_results
    checkpoint_dir: str = "runs/analysis"  # final models for `compare` / `stabilize`

    @model_validator(mode="after")
    def _check(self) -> MethodsConfig:
        labels = [m.label for m in self.methods]
        if len(set(labels)) != len(labels):
            raise ValueError(f"method labels must be unique, got {labels}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be unique, got {self.seeds}")
        for a, b in self.paired:
            if a not in labels or b not in labels:
                raise ValueError(f"paired ({a}, {b}) names a label that is not a method; labels: {labels}")
        for entry in self.methods:
            self.experiment_for(entry, self.seeds[0])  # every method builds, before anything trains
        return self

    def experiment_for(self, entry: MethodEntry, seed: int) -> ExperimentConfig:
        """The shared experiment with this method, its own blocks where it has them, and `seed`."""
        data = self.experiment.model_dump(mode="json")
        data.update(method=entry.method, name=entry.label)
        data["train"]["seed"] = seed
        for block in ("attack", "sns", "trades"):
            value = getattr(entry, block)
            if value is not None:
                data[block] = value.to_dict() if isinstance(value, Attack) else value.model_dump()
        return validate(ExperimentConfig, data, source=f"methods.{entry.label}")

    def sensitivity_attack(self) -> Attack:
        if self.sensitivity.attack is None:
            return self.experiment.val_attack()
        return self.sensitivity.attack.resolve(self.experiment.attack)

    def smoke(self) -> MethodsConfig:
        """The same comparison at a seconds-long budget (the tests run it): two seeds, the smoke experiment."""
        methods = [m.model_copy(update={"sns": m.sns.model_copy(update={"warmup_epochs": min(m.sns.warmup_epochs, 1)})})
                   if m.sns is not None else m for m in self.methods]
        return self.model_copy(update={
            "name": f"{self.name}-smoke", "seeds": self.seeds[:2], "methods": methods,
            "experiment": smoke_experiment(self.experiment),
            "sensitivity": self.sensitivity.model_copy(update={"examples": 64})})


def load_methods_config(path: str | Path, overrides: dict[str, Any] | None = None,
                        origins: dict[str, str] | None = None) -> MethodsConfig:
    """Read and validate a methods YAML (with `overrides` on top, named by their `origins` in an error, as
    loader.load_config); every problem is a one-line ConfigError."""
    return load_config(path, MethodsConfig, overrides, origins)
