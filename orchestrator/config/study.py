"""The study config (configs/study/*.yaml): an experiment, a search space, the arms, a sequential
confirmation, and where results go.

    study = load_study("configs/study/quick.yaml", {"study.trials": 3})   # overrides get the YAML's checks
    for arm in study.arm_list(): ...             # the baseline arm, then the method's arm (or the `arms:` list)
    study.control                                # the arm every other is compared with ("baseline")

Two arms: `baseline:` and the experiment's method. Several (a shootout): `arms:` names each arm's method (SNS
with its `base`), `control:` the arm the others are compared with, `compare: all` every pair too. Every arm is
searched alike; a path of a method's own block (`sns.*`, `trades.*`, `mart.*`, `cas.*`) belongs to the arms
whose method reads that block (SNS on TRADES reads `trades.beta`), every other path (the recipe) to all.

Search-space paths are dotted experiment fields (`sns.lam`, alias `sns.lambda`; `train.lr`), each a `ParamSpec`
(orchestrator/config/search_space.py); every combination of the space's edges is validated before anything
trains; the arms are described in orchestrator/config/arms.py. Metrics a study optimizes are validation metrics
(`val/robust_acc`, ...): choosing on test would report optimistic numbers.
"""

from __future__ import annotations

import difflib
import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from orchestrator.config import ConfigError
from orchestrator.config.arms import Arm, ArmSpec
from orchestrator.config.experiment import EvalAttack, ExperimentConfig, smoke_experiment, threat_model_notes
from orchestrator.config.loader import Strict, apply_overrides, config_kind, load_config
from orchestrator.config.paths import canonical_path
from orchestrator.config.search_space import ParamSpec, check_combinations, check_override, reads_path
from orchestrator.results import count

VAL_METRICS = ("val/robust_acc", "val/clean_acc", "val/sensitivity_all", "val/sensitivity_selected",
               "val/relative_sensitivity_all")  # reported by every epoch of every trial


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
    # asha: epochs of the longest schedule every trial gets before it can be stopped (a shorter schedule: the same
    # share of its own epochs), or that share itself (< 1); rungs are shares of each trial's own schedule
    grace_period: float = Field(1, gt=0)
    reduction_factor: float = Field(2.0, gt=1)
    # true: the same study file and seeds run the same trials, stop them at the same rungs and choose the same
    # configurations (trial n is suggested from, and judged against, only the trials up to n - concurrency);
    # false: each suggestion and rung decision uses whatever has finished (may be faster; not repeatable)
    reproducible: bool = True
    replicates: int = Field(1, ge=1)  # whole two-arm searches side by side, each with its own searcher seed
    replicate_data: bool = False  # each replicate also draws its own validation split (data.data_seed + r - 1)
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
    boundary: Literal["obrien_fleming", "pocock"] = "obrien_fleming"  # the sequential boundary over the looks
    # (orchestrator/study/design.py; docs/studies.md says why O'Brien-Fleming-type spending is the default)
    assumed_spread: float = Field(1.2, gt=0)  # points: the seed-to-seed spread of a paired difference that the
    # study's start line and `nslab power` assume before any seed ran
    baseline_seed_offset: int = Field(0, ge=0)  # the baseline's runs train on seed + this (paired by seed all the
    # same): an A/A study (both arms alike) sets it so the arms differ in training randomness, not bit for bit


class TrackingConfig(Strict):
    uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db
    experiment: str = "nslab"


class StorageConfig(Strict):
    ray: str | None = None  # Ray Tune results and trial checkpoints; None: <cwd>/ray_results
    optuna: str | None = None  # e.g. sqlite:///optuna.db; None: in memory, saved in Tune's searcher state


@config_kind("a study config", "python -m pipelines.study")
class StudyFile(Strict):
    # a search_space key is an experiment path: --set search_space.sns.lambda.high=1 changes the entry sns.lam
    mapping_keys: ClassVar[dict[str, Callable[[str], str]]] = {
        "search_space": lambda path: canonical_path(ExperimentConfig, path)}

    study: StudyBlock
    experiment: ExperimentConfig
    search_space: dict[str, ParamSpec] = Field(min_length=1)
    baseline: BaselineBlock | None = Field(default_factory=BaselineBlock)  # null: no baseline arm
    arms: list[ArmSpec] | None = Field(None, min_length=2)  # a shootout (replaces `baseline`)
    control: str | None = None  # `arms:` only: the arm the others are compared with (default: the first)
    compare: Literal["control", "all"] = "control"  # all: every pair of arms, Holm over the whole family
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
                check_override(self.experiment, {full: value}, f"search_space.{path}")
            canonical[full] = spec
        self.search_space = canonical
        self.study.points_to_evaluate = [self._point(i, p) for i, p in enumerate(self.study.points_to_evaluate)]
        self._check_arms()
        grace = self.study.grace_period
        if self.study.scheduler == "asha" and (grace >= self.max_epochs() or (grace > 1 and not grace.is_integer())):
            raise ValueError(f"study.grace_period: must be whole epochs below the maximum ({self.max_epochs()}), or a "
                             f"share of each trial's epochs below 1, for ASHA to have a rung (got {grace:g})")
        for arm in self.arm_list():  # every combination of edges and choices builds, before anything trains
            check_combinations(arm.experiment, arm.space, f"the {arm.name} arm's search space")
        if self.confirm is not None:
            seeds = self.confirm_seeds()
            if self.experiment.train.seed in seeds or len(set(seeds)) != len(seeds):
                raise ValueError(f"confirm.seeds: {seeds} must be distinct and fresh (not the search seed "
                                 f"{self.experiment.train.seed})")
            if len(seeds) > self.confirm.max_seeds:
                raise ValueError(f"confirm.max_seeds ({self.confirm.max_seeds}) must be >= the first seeds "
                                 f"({len(seeds)})")
            every, offset = self.confirm_seeds(self.confirm.max_seeds), self.confirm.baseline_seed_offset
            if offset and {s + offset for s in every} & {*every, self.experiment.train.seed}:
                raise ValueError(f"confirm.baseline_seed_offset: {offset} moves the baseline onto seeds the "
                                 f"method or the search trains ({every}); use at least {max(every)}")
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
        check_override(self.experiment, point, where)
        return point

    def _check_arms(self) -> None:
        if self.arms is None:
            if self.control is not None or self.compare != "control":
                raise ValueError("control and compare: only with an `arms:` list (a two-arm study compares its "
                                 "method with `baseline:`)")
            return
        if "baseline" in self.model_fields_set and self.baseline is not None:
            raise ValueError("arms: a study names its arms either with `arms:` (and `control:`) or with `baseline:`, "
                             "not both; move the baseline into `arms:`")
        self.baseline = None
        names = [a.name for a in self.arms]
        if len(set(names)) != len(names):
            raise ValueError(f"arms: each name may appear once (got {names})")
        for i, spec in enumerate(self.arms):
            if spec.base is not None and spec.method != "sns":
                raise ValueError(f"arms.{i}.base: only an sns arm has a base (the {spec.name} arm's method is "
                                 f"{spec.method}); remove it")
            try:
                self.arm_experiment(spec)
            except ConfigError as err:
                raise ValueError(f"arms.{i} ({spec.name}): {str(err).removeprefix('config error: ')}") from None
        experiments = [self.arm_experiment(spec) for spec in self.arms]
        unread = [p for p in self.search_space if not any(reads_path(e, p) for e in experiments)]
        if unread:
            raise ValueError(f"search_space.{unread[0]}: no arm's method reads it (arms: "
                             f"{', '.join(f'{a.name} ({a.method})' for a in self.arms)}); remove it or add an arm")
        if self.control is None:
            self.control = names[0]
        elif self.control not in names:
            close = difflib.get_close_matches(self.control, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"control: {self.control!r} is not an arm (arms: {', '.join(names)}){hint}")

    def arm_experiment(self, spec: ArmSpec) -> ExperimentConfig:
        """The study's experiment trained by an `arms:` entry's method (and SNS base)."""
        values: dict[str, Any] = {"method": spec.method, "name": f"{self.experiment.name}-{spec.name}"}
        if spec.base is not None:
            values["sns.base"] = spec.base
        return apply_overrides(self.experiment, values)

    @property
    def control_arm(self) -> str | None:
        """The name of the arm every other arm is compared with: `control:` (or the first of `arms:`), else the
        two-arm study's "baseline"; None without one."""
        if self.arms is not None:
            return self.control
        return "baseline" if self.baseline is not None else None

    def comparisons(self) -> list[tuple[str, str]]:
        """(arm, reference) pairs the confirmation judges, one family under Holm: every arm against the control;
        each SNS arm against the arm of its own base method where there is one (the paper's claim, per base);
        with `compare: all`, every other pair too."""
        control, arms = self.control_arm, self.arm_list()
        if control is None:
            return []
        pairs = [(a.name, control) for a in arms if a.name != control]
        for arm in arms:
            if arm.method == "sns":
                own = [b.name for b in arms if b.method == arm.experiment.sns.base]
                if own and (arm.name, own[0]) not in pairs and own[0] != arm.name:
                    pairs.append((arm.name, own[0]))
        if self.compare == "all":
            for a, b in itertools.combinations([a.name for a in arms], 2):
                if (a, b) not in pairs and (b, a) not in pairs:
                    pairs.append((a, b))
        return pairs

    def design_lines(self) -> list[str]:
        """What the study compares, for --dry-run: each arm with the paths it searches, then the comparisons the
        confirmation judges (one family)."""
        lines = [f"arm {arm.name}: {arm.describe()}; searches "
                 f"{', '.join(arm.space) if arm.space else 'nothing (the experiment recipe as it is)'}"
                 for arm in self.arm_list()]
        pairs = self.comparisons()
        if pairs and self.confirm is not None:
            family = f", Holm over {count(len(pairs), 'comparison')}" if len(pairs) > 1 else ""
            lines.append(f"comparisons ({self.control_arm} is the control{family}): "
                         + "; ".join(f"{a} vs {b}" for a, b in pairs))
        return lines

    def baseline_method(self) -> str | None:
        if self.baseline is None:
            return None
        return self.baseline.method or self.experiment.base_method

    def baseline_experiment(self) -> ExperimentConfig:
        """The study's experiment with the baseline's method (same data, recipe and training attack)."""
        return apply_overrides(self.experiment, {"method": self.baseline_method(),
                                                 "name": f"{self.experiment.name}-baseline"})

    def arm_list(self, replicate: int | None = None) -> list[Arm]:
        """The baseline arm (when there is a baseline), then the method's arm; or the `arms:` list, in its order.
        Every tuned arm searches the paths its method reads (`reads_path`) with the same trial count. Those of
        search `replicate` (1, 2, ...) draw its own validation split with study.replicate_data."""
        if self.arms is not None:
            out = []
            for spec in self.arms:
                experiment = self._replicate(self.arm_experiment(spec), replicate)
                space = {p: s for p, s in self.search_space.items() if reads_path(experiment, p)}
                tuned = spec.tune and bool(space)
                out.append(Arm(spec.name, spec.method, experiment, space if tuned else {},
                               self.study.trials if tuned else 1, tuned, name_base=True))
            return out
        arms = []
        if self.baseline is not None:
            shared = {p: s for p, s in self.search_space.items() if not p.startswith("sns.")}
            tuned = self.baseline.tune and bool(shared)
            trials = self.study.trials if self.baseline.trials == "same" else self.baseline.trials
            arms.append(Arm("baseline", self.baseline_method(), self._replicate(self.baseline_experiment(), replicate),
                            shared if tuned else {}, trials if tuned else 1, tuned))
        arms.append(Arm(self.experiment.method, self.experiment.method, self._replicate(self.experiment, replicate),
                        dict(self.search_space), self.study.trials, True))
        return arms

    def _replicate(self, experiment: ExperimentConfig, replicate: int | None) -> ExperimentConfig:
        """The experiment of search `replicate`: its own validation split (data.data_seed + replicate - 1) with
        study.replicate_data, else the same."""
        if not (replicate and replicate > 1 and self.study.replicate_data):
            return experiment
        return apply_overrides(experiment, {"data.data_seed": experiment.data.data_seed + replicate - 1})

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
