"""One experiment, end to end: data -> model -> objective -> Trainer -> final robust evaluation.

`ExperimentSpec` holds plain values (the orchestrator turns validated YAML into one); `build_trainer`
wires the registries; `run_experiment` trains and evaluates on the test split. Checkpoints carry
the spec, so `load_model` rebuilds the model from a checkpoint file alone.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ns_core.data import DatasetSplits, load_dataset, make_loader
from ns_core.evaluation import AttackSpec, RobustnessReport, evaluate_robustness
from ns_core.models import create_model
from ns_core.objectives import create_objective
from ns_core.training import EpochCallback, TrainConfig, Trainer
from ns_core.utils import pick_device, seed_everything

log = logging.getLogger(__name__)


@dataclass
class ExperimentSpec:
    """Everything one training run needs, as plain values."""

    dataset: str = "mnist5k"
    model: str = "lenet5"
    method: str = "sns"
    method_params: dict = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    data_root: str | None = None
    download: bool = False
    train_limit: int | None = None
    test_limit: int | None = None
    eval_attacks: list[AttackSpec] = field(default_factory=list)
    eval_examples: int | None = None  # None: the whole test split

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ExperimentSpec:
        d = dict(d)
        d["train"] = TrainConfig(**d.get("train", {}))
        d["eval_attacks"] = [AttackSpec(**a) for a in d.get("eval_attacks", [])]
        return cls(**d)


@dataclass
class ExperimentResult:
    history: list[dict]
    report: RobustnessReport | None
    trainer: Trainer


def load_data(spec: ExperimentSpec) -> DatasetSplits:
    return load_dataset(spec.dataset, root=spec.data_root, download=spec.download,
                        train_limit=spec.train_limit, test_limit=spec.test_limit, seed=spec.train.seed)


def build_trainer(spec: ExperimentSpec, callbacks: Sequence[EpochCallback] = (),
                  data: DatasetSplits | None = None) -> Trainer:
    """Seed, load data, build the model and objective by name, and return a ready Trainer."""
    seed_everything(spec.train.seed)  # model initialization draws from the global RNG
    data = data or load_data(spec)
    model = create_model(spec.model, input_shape=data.input_shape, num_classes=data.num_classes)
    objective = create_objective(spec.method, **spec.method_params)
    metadata = {"model": spec.model, "dataset": spec.dataset, "method": spec.method,
                "input_shape": list(data.input_shape), "num_classes": data.num_classes, "spec": _jsonable(spec)}
    return Trainer(model, objective, data.train, data.test, spec.train, callbacks, metadata)


def run_experiment(spec: ExperimentSpec, callbacks: Sequence[EpochCallback] = (),
                   checkpoint: str | Path | None = None, data: DatasetSplits | None = None) -> ExperimentResult:
    """Train (resuming from `checkpoint` when the file exists) and evaluate on the test split."""
    data = data or load_data(spec)
    trainer = build_trainer(spec, callbacks, data)
    if checkpoint is not None and Path(checkpoint).exists():
        trainer.load_checkpoint(checkpoint)
        log.info("resumed from %s at epoch %d", checkpoint, trainer.epoch)
    history = trainer.fit()
    report = evaluate(trainer.model, data, spec) if spec.eval_attacks else None
    return ExperimentResult(history, report, trainer)


def evaluate(model: nn.Module, data: DatasetSplits, spec: ExperimentSpec,
             progress: bool = False) -> RobustnessReport:
    loader = make_loader(data.test, batch_size=max(spec.train.batch_size, 256), shuffle=False)
    device = next(model.parameters()).device
    return evaluate_robustness(model, loader, spec.eval_attacks, device, seed=spec.train.seed,
                               max_examples=spec.eval_examples, progress=progress)


def load_model(path: str | Path, device: str = "auto") -> tuple[nn.Module, dict]:
    """Rebuild the model saved in a Trainer checkpoint; returns (model in eval mode, metadata)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; pass the .pt file a training run saved")
    target = pick_device(device)
    state = torch.load(path, map_location=target, weights_only=True)
    if "metadata" not in state or "model" not in state:
        raise ValueError(f"{path} is not an nslab checkpoint (no 'model'/'metadata' entries)")
    meta = state["metadata"]
    model = create_model(meta["model"], input_shape=tuple(meta["input_shape"]), num_classes=meta["num_classes"])
    model.load_state_dict(state["model"])
    return model.to(target).eval(), meta


def _jsonable(spec: ExperimentSpec) -> dict:
    """The spec as plain JSON types (tuples -> lists), safe inside a weights_only checkpoint."""
    def convert(v):
        if isinstance(v, dict):
            return {k: convert(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [convert(x) for x in v]
        return v
    return convert(spec.to_dict())
