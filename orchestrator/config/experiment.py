"""The experiment config: one training run as typed YAML blocks (configs/experiment/*.yaml).

    experiment = load_config("configs/experiment/quick.yaml", ExperimentConfig)
    objective = experiment.objective()          # ns_core objective from `method` and the blocks it takes
    train = experiment.train_config()           # ns_core TrainConfig
    suite = experiment.final_suite()            # the final evaluation's attacks (ns_core Attack)
    experiment.threat_model_notes()             # evaluation attacks that set another eps or norm on purpose

Blocks: `attack` (the training attack, an ns_core Attack), `sns`, `trades`, `mart`, `cas`, `train`, `eval`,
`data`. A method takes what its factory asks for (`attack`, `beta` from `trades`, the `sns` fields), and the
method's own block (`mart`, `cas`) before the shared ones, so no block is mapped by hand per method. Studies
and analyses are built from these same blocks.

The training attack is the experiment's threat model. An evaluation attack (`train.val_attack`, each of
`eval.attacks`, a study's `confirm.attacks`) that leaves out `eps` and `norm` attacks at the training
attack's, so `--set attack.eps=8/255` moves all of them; one that sets another eps or norm keeps it, and
`threat_model_notes` says so in a line the pipelines print first (in --dry-run too).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from ns_core.attacks import Attack, attack_parameters
from ns_core.data import DATASETS
from ns_core.models import MODELS
from ns_core.objectives import OBJECTIVES, Objective, create_objective, objective_arguments
from ns_core.sns import SNS_BASES
from ns_core.training import TrainConfig
from orchestrator.config.loader import Strict, apply_overrides, config_kind, registered

_TC = TrainConfig()
_TRAIN_FIELDS = inspect.signature(TrainConfig).parameters


class SNSBlock(Strict):
    lam: float = Field(0.1, ge=0, alias="lambda")
    fraction: float = Field(0.1, gt=0, le=1)
    layers: list[str] | None = None  # None: the model's default layers
    distance: Literal["l1", "l2", "cosine", "relative"] = "l1"
    warmup_epochs: int = Field(1, ge=0)  # plain base-loss epochs first (SNS collapses from epoch 1: docs/design.md)
    warmup_share: float | None = Field(None, ge=0, lt=1)  # set: warmup_epochs = round(share x train.epochs)
    reselect_every: int = Field(1, ge=1)
    base: Literal[SNS_BASES] = "pgd_at"
    collapse_patience: int = Field(2, ge=1)


class TradesBlock(Strict):
    beta: float = Field(6.0, ge=0)


class MartBlock(Strict):
    beta: float = Field(6.0, ge=0)  # weight of the misclassification-weighted KL term (Wang et al. 2020)


class CASBlock(Strict):
    beta: float = Field(2.0, ge=0)  # weight of the channel heads' cross-entropy (Bai et al. 2021)
    layers: list[str] | None = Field(None, min_length=1)  # None: the last of the model's studied layers


@dataclass(frozen=True)
class EvalAttack:
    """An evaluation attack as YAML writes it: an ns_core Attack whose `eps` and `norm`, when left out, are the
    training attack's (`resolve`); an attack that takes no norm attacks in linf. A leaf value like Attack, so
    `--set train.val_attack={name: pgd, steps: 20}` sets it whole."""

    name: str
    eps: float | None = None  # None: the training attack's
    norm: str | None = None  # None: the training attack's
    steps: int | None = None
    alpha: float | None = None
    restarts: int = 1
    layers: tuple[str, ...] | None = None

    # pydantic validates it from YAML: unknown keys and non-finite numbers are errors
    __pydantic_config__ = {"extra": "forbid", "allow_inf_nan": False}

    def __post_init__(self) -> None:
        """The attack's own checks (name, steps, alpha, ...) that need no training attack; the threat model's
        (an eps above 1 in linf, ...) run when it is resolved against one."""
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(self.layers))
        if self.eps is not None and self.eps < 0:
            raise ValueError(f"attack {self.name!r}: eps must be >= 0 (or left out for the training attack's), "
                             f"got {self.eps}")
        self._attack(self.eps if self.eps is not None and self.norm is not None else 0.0, self.norm or "linf")

    @classmethod
    def of(cls, attack: Attack) -> EvalAttack:
        """The same attack with its eps and norm set."""
        return cls(**{f.name: getattr(attack, f.name) for f in fields(attack)})

    def _attack(self, eps: float, norm: str) -> Attack:
        return Attack(self.name, eps, norm=norm, steps=self.steps, alpha=self.alpha, restarts=self.restarts,
                      layers=self.layers)

    def resolve(self, training: Attack) -> Attack:
        """The ns_core Attack at `training`'s eps and norm wherever this one sets none of its own."""
        norm = self.norm or (training.norm if "norm" in attack_parameters(self.name) else "linf")
        if self.eps is None and norm != training.norm:
            raise ValueError(f"{self.name} attacks in {norm} only, the training attack in {training.norm}: give it "
                             f"its own eps (and norm: {norm}) or leave it out")
        return self._attack(training.eps if self.eps is None else self.eps, norm)


def threat_model_notes(training: Attack, attacks: Sequence[tuple[str, str, EvalAttack | None]]) -> list[str]:
    """One line per (what, config path, attack) whose eps or norm, set in the config, differs from the training
    attack's, e.g. "validation attack pgd at eps 0.1 differs from the training attack's eps 0.2 (set on purpose
    in train.val_attack)". Attacks that leave eps and norm out follow the training attack: no line."""
    notes = []
    for what, path, spec in attacks:
        if spec is None or (spec.eps is None and spec.norm is None):
            continue
        attack = spec.resolve(training)
        same_eps = math.isclose(attack.eps, training.eps, rel_tol=1e-4, abs_tol=1e-9)
        if same_eps and attack.norm == training.norm:
            continue
        norms = attack.norm != training.norm
        mine = f"{attack.norm} eps {attack.eps:.4g}" if norms else f"eps {attack.eps:.4g}"
        theirs = f"{training.norm} eps {training.eps:.4g}" if norms else f"eps {training.eps:.4g}"
        notes.append(f"{what} {attack.name} at {mine} differs from the training attack's {theirs} (set on purpose "
                     f"in {path})")
    return notes


class TrainBlock(Strict):
    """ns_core.training.TrainConfig's fields, with its defaults; val_attack None: PGD-10 at the training
    attack's norm and eps (as is any val_attack that leaves them out)."""

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
    val_attack: EvalAttack | None = None
    eps_ramp_epochs: int = Field(0, ge=0)  # the training attack's eps grows over these first epochs
    val_batch_size: int = Field(_TC.val_batch_size, ge=1)
    probe_size: int = Field(_TC.probe_size, ge=1)
    sensitivity_fraction: float = Field(_TC.sensitivity_fraction, gt=0, le=1)
    progress: bool | None = False


class EvalBlock(Strict):
    """The final evaluation on the test split. attacks None: FGSM, PGD-20, feature_pgd (SNS models), cas_pgd (CAS
    models) and AutoAttack at the training attack's norm and eps (as is any listed attack that leaves them out)."""

    attacks: list[EvalAttack] | None = Field(None, min_length=1)
    examples: int | None = Field(None, ge=1)  # None: the whole test split
    cascade: bool = True  # each attack only on the examples still standing (as AutoAttack runs)
    check_examples: int = Field(200, ge=1)  # examples the gradient-masking checks use
    sensitivity_examples: int = Field(500, ge=1)  # test images of the final sensitivity map


class DataBlock(Strict):
    root: str | None = None
    download: bool = False
    val_size: int | None = Field(None, ge=1)  # None: the dataset's own (mnist5k: 500 of its 4,000)
    data_seed: int = 0  # picks the validation split; stays fixed when train.seed changes
    train_limit: int | None = Field(None, ge=1)
    test_limit: int | None = Field(None, ge=1)


@config_kind("an experiment config", "python -m pipelines.train")
class ExperimentConfig(Strict):
    name: str = Field("experiment", pattern=r"^[A-Za-z0-9_.-]+$")
    dataset: str = "mnist5k"
    model: str = "lenet5"
    method: str = "sns"
    attack: Attack = Field(default_factory=lambda: Attack("pgd", 0.3, steps=10))
    sns: SNSBlock = Field(default_factory=SNSBlock)
    trades: TradesBlock = Field(default_factory=TradesBlock)
    mart: MartBlock = Field(default_factory=MartBlock)
    cas: CASBlock = Field(default_factory=CASBlock)
    train: TrainBlock = Field(default_factory=TrainBlock)
    eval: EvalBlock = Field(default_factory=EvalBlock)
    data: DataBlock = Field(default_factory=DataBlock)

    @field_validator("dataset")
    @classmethod
    def _dataset(cls, name: str) -> str:
        return registered(DATASETS, name)

    @field_validator("model")
    @classmethod
    def _model(cls, name: str) -> str:
        return registered(MODELS, name)

    @field_validator("method")
    @classmethod
    def _method(cls, name: str) -> str:
        return registered(OBJECTIVES, name)

    @model_validator(mode="after")
    def _builds(self) -> ExperimentConfig:
        epochs = self.train.epochs
        if self.sns.warmup_share is not None:  # a share keeps its meaning when the epochs are searched
            self.sns.warmup_epochs = int(self.sns.warmup_share * epochs + 0.5)
        if self.train.eps_ramp_epochs and self.train.eps_ramp_epochs >= epochs:
            raise ValueError(f"train.eps_ramp_epochs ({self.train.eps_ramp_epochs}) must be < train.epochs ({epochs}): "
                             "the model would never train at the full eps")
        if self.method == "sns" and self.sns.lam > 0 and self.sns.warmup_epochs >= epochs:
            raise ValueError(f"sns.warmup_epochs ({self.sns.warmup_epochs}) must be < train.epochs ({epochs}): the SNS "
                             "regularizer would never switch on")
        self.objective()  # the objective's own checks, before anything runs
        for i, spec in enumerate([self.train.val_attack, *(self.eval.attacks or [])]):
            if spec is not None:
                try:
                    spec.resolve(self.attack)
                except ValueError as err:
                    where = "train.val_attack" if i == 0 else f"eval.attacks.{i - 1}"
                    raise ValueError(f"{where}: {err}") from None
        return self

    def objective_params(self) -> dict[str, Any]:
        """The keyword arguments of the method's factory, taken from the blocks by name (the method's own block
        first: `cas.layers`, not `sns.layers`, are CAS's)."""
        own = {"mart": self.mart, "cas": self.cas}.get(self.method)
        available = {"attack": self.attack, "beta": self.trades.beta, "eps_ramp_epochs": self.train.eps_ramp_epochs,
                     **self.sns.model_dump(), **(own.model_dump() if own is not None else {})}
        return {name: available[name] for name in objective_arguments(self.method) if name in available}

    def objective(self) -> Objective:
        return create_objective(self.method, **self.objective_params())

    @property
    def base_method(self) -> str:
        """The method an SNS run stands on (its warm-up and its natural baseline); the method itself otherwise."""
        return self.sns.base if self.method == "sns" else self.method

    def val_attack(self) -> Attack:
        """The attack every epoch's validation runs (what the search and ASHA choose by). A CAS model is validated
        with its adaptive attack: plain PGD cannot follow its argmax masks and would pick the most masked trial
        (docs/evaluation.md, "CAS")."""
        attack = (self.train.val_attack or EvalAttack("pgd", steps=10)).resolve(self.attack)
        if self.method == "cas" and attack.name == "pgd":
            attack = dataclasses.replace(attack, name="cas_pgd")
        return attack

    def attacks_text(self) -> str:
        """'training pgd-linf-eps0.2-s10-r1; validation pgd-...; final suite fgsm-..., ...': every attack at the
        eps and norm it will run at (--dry-run prints it; the YAML leaves the inherited ones out)."""
        return (f"training {self.attack.label}; validation {self.val_attack().label}; final suite "
                f"{', '.join(a.label for a in self.final_suite())}")

    def threat_model_notes(self, where: str = "") -> list[str]:
        """The evaluation attacks whose eps or norm the config sets apart from the training attack's, one line
        each (module docstring); empty when every attack follows the experiment's threat model. `where` prefixes
        the config paths (a study's "experiment.")."""
        return threat_model_notes(self.attack, [
            ("validation attack", f"{where}train.val_attack", self.train.val_attack),
            *[("final-suite attack", f"{where}eval.attacks[{i}]", a) for i, a in enumerate(self.eval.attacks or [])]])

    def train_config(self) -> TrainConfig:
        values = self.train.model_dump(exclude={"val_attack", "eps_ramp_epochs"})
        return TrainConfig(**{k: v for k, v in values.items() if k in _TRAIN_FIELDS}, val_attack=self.val_attack())

    def final_suite(self) -> list[Attack]:
        if self.eval.attacks is not None:
            return [spec.resolve(self.attack) for spec in self.eval.attacks]
        eps, norm = self.attack.eps, self.attack.norm
        suite = [Attack("fgsm", eps)] if norm == "linf" else []
        suite.append(Attack("pgd", eps, norm=norm, steps=20))
        if self.method == "sns":  # its layers: the watched ones, chosen by orchestrator.run.final_suite
            suite.append(Attack("feature_pgd", eps, norm=norm, steps=20))
        if self.method == "cas":  # its argmax masks hide the cross-entropy's gradient (docs/evaluation.md)
            suite.append(Attack("cas_pgd", eps, norm=norm, steps=20))
        return [*suite, Attack("autoattack", eps, norm=norm)]


def smoke_experiment(experiment: ExperimentConfig) -> ExperimentConfig:
    """The same experiment at a seconds-long budget (every pipeline's --smoke-test; the tests run it): two
    epochs (one of warm-up) on 256 training images, 2-step attacks, the first two final attacks at 3 steps
    (AutoAttack swapped for its APGD-CE stage) on 64 test images."""
    suite = []
    for attack in experiment.final_suite()[:2]:
        if attack.name == "autoattack":
            attack = Attack("apgd_ce", attack.eps, norm=attack.norm)
        takes_steps = attack.steps_used > 1
        suite.append(attack.replace(steps=min(attack.steps_used, 3) if takes_steps else attack.steps, restarts=1))
    epochs = min(experiment.train.epochs, 1 if experiment.sns.warmup_epochs == 0 else 2)
    return apply_overrides(experiment, {
        "train.epochs": epochs, "train.eps_ramp_epochs": min(experiment.train.eps_ramp_epochs, epochs - 1),
        "sns.warmup_share": None,
        "train.probe_size": 64,
        "train.val_attack": replace(experiment.train.val_attack or EvalAttack("pgd"), steps=2),
        "attack.steps": min(experiment.attack.steps_used, 2) if experiment.attack.steps_used > 1 else None,
        "data.val_size": 64, "data.train_limit": min(experiment.data.train_limit or 256, 256),
        "data.test_limit": min(experiment.data.test_limit or 128, 128), "eval.examples": 64,
        "eval.check_examples": 32, "eval.sensitivity_examples": 64, "eval.attacks": [EvalAttack.of(a) for a in suite],
        "sns.warmup_epochs": min(experiment.sns.warmup_epochs, 1),
    })
