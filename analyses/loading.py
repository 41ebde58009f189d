"""Loading the checkpoints an analysis compares: models, their metadata, their data and their attack.

    models = load_checkpoints(["runs/analysis/.../standard-seed0.pt", ".../pgd_at-seed0.pt"])
    same_data(models); data = dataset_of(models[0], data_root=None)

Labels default to the training method (plus the seed when methods repeat). Every problem with a file is
one line (ns_core.checkpoint.CheckpointError), before anything is attacked.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ns_core.attacks import Attack
from ns_core.checkpoint import load_model
from ns_core.data import DatasetSplits
from ns_core.sensitivity import resolve_layers
from orchestrator.config import apply_overrides, validate
from orchestrator.experiment_config import ExperimentConfig
from orchestrator.run import load_data


@dataclass
class Loaded:
    label: str
    path: Path
    model: nn.Module
    metadata: dict

    @property
    def experiment(self) -> ExperimentConfig:
        return validate(ExperimentConfig, self.metadata["config"], source=str(self.path))

    def attack(self, eps: float | None = None, steps: int = 10) -> Attack:
        """PGD-`steps` at `eps` (default: the checkpoint's training eps) in its training norm."""
        trained = self.experiment.attack
        return Attack("pgd", trained.eps if eps is None else eps, norm=trained.norm, steps=steps)


def load_checkpoints(paths: Sequence[str | Path], labels: Sequence[str] | None = None,
                     device: str = "auto") -> list[Loaded]:
    """Load nslab checkpoints; labels default to the training method (plus the seed when methods repeat)."""
    if labels is not None and len(labels) != len(paths):
        raise ValueError(f"--labels needs one label per checkpoint: {len(paths)} checkpoints, {len(labels)} labels")
    loaded = []
    for path in paths:
        path = Path(path).expanduser().resolve()
        model, meta = load_model(path, device)
        loaded.append(Loaded("", path, model, meta))
    methods = [m.metadata.get("method", m.path.stem) for m in loaded]
    for i, item in enumerate(loaded):
        seed = item.metadata["config"]["train"]["seed"]
        default = methods[i] if methods.count(methods[i]) == 1 else f"{methods[i]}-s{seed}"
        item.label = labels[i] if labels is not None else default
    names = [m.label for m in loaded]
    if len(set(names)) != len(names):
        for i, item in enumerate(loaded):
            item.label = f"{names[i]}-{i}"
    return loaded


def same_data(models: Sequence[Loaded]) -> None:
    """All models must read the same inputs: one dataset and input shape."""
    first = models[0].metadata
    for other in models[1:]:
        meta = other.metadata
        if (meta["dataset"], list(meta["input_shape"])) != (first["dataset"], list(first["input_shape"])):
            raise ValueError(f"{other.label} was trained on {meta['dataset']} {meta['input_shape']}, "
                             f"{models[0].label} on {first['dataset']} {first['input_shape']}; "
                             "analyze models of one dataset together")


def dataset_of(item: Loaded, data_root: str | None) -> DatasetSplits:
    """The splits the checkpoint was trained with (same validation carve-out and limits); `data_root` moves them."""
    experiment = item.experiment
    if data_root is not None:
        experiment = apply_overrides(experiment, {"data.root": data_root})
    data = load_data(experiment)
    if tuple(data.input_shape) != tuple(item.metadata["input_shape"]):
        raise ValueError(f"{item.path} expects inputs {tuple(item.metadata['input_shape'])} but {experiment.dataset} "
                         f"gives {tuple(data.input_shape)}; point --data-root at the data it was trained on")
    return data


def check_layers(model: nn.Module, layers: Sequence[str] | None) -> list[str]:
    """The layers to analyze (default: the model's default_layers); unknown names raise listing the valid."""
    layers = list(layers or model.default_layers)
    resolve_layers(model, layers)
    return layers


def subtitle(item: Loaded, attack: Attack, n: int, extra: str = "") -> str:
    what = f"{attack.name.upper()}-{attack.steps_used} {attack.norm} eps {attack.eps:g}"
    return (f"{item.metadata['dataset']} test split ({n} images) / {item.metadata['model']}; {what}"
            + (f"; {extra}" if extra else ""))
