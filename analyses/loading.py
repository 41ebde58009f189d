"""Loading the models an analysis studies: nslab checkpoints, or any model's plain state_dict; their metadata,
their data and their attack.

    models = load_checkpoints(["runs/analysis/.../standard-seed0.pt", ".../pgd_at-seed0.pt"])
    same_data(models); data = dataset_of(models[0], data_root=None)
    model = load_external("torchvision.models:resnet18", "weights.pt", "cifar10", eps=8 / 255, adapt=["cifar_stem"])

A checkpoint is analysed with exactly the model that was trained (its recorded adaptation replayed); a plain
state_dict with the model as its factory builds it, plus only the adaptations asked for (`ADAPT_CHOICES`).
Labels default to the training method (plus the seed when methods repeat). Every problem with a file is
one line (ns_core.checkpoint.CheckpointError), before anything is attacked.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from torch import nn

from ns_core.adapters import Adaptation, bare_adaptation, factory_contract, nslab_adaptation
from ns_core.attacks import Attack
from ns_core.checkpoint import load_model, load_weights
from ns_core.data import DatasetSplits
from ns_core.models import MODELS, create_model, normalization_for, studied_layers
from ns_core.utils import pick_device
from orchestrator.config.experiment import ExperimentConfig
from orchestrator.config.loader import apply_overrides, validate
from orchestrator.run import load_data


@dataclass
class Loaded:
    label: str
    path: Path
    model: nn.Module
    metadata: dict

    @property
    def built(self) -> str:
        """How the model was built (its adaptation, replayed or asked for): 'built as its factory builds it',
        'built with the normalization in front and the small-input stem'."""
        if "adaptation" not in self.metadata:  # a checkpoint from before the record: nslab's decisions
            return "built as nslab training builds it"
        recorded = self.metadata["adaptation"]
        return "built " + (Adaptation.from_dict(recorded).describe() if recorded else "as its factory builds it")

    @property
    def experiment(self) -> ExperimentConfig:
        return validate(ExperimentConfig, self.metadata["config"], source=str(self.path))

    def attack(self, eps: float | None = None, steps: int = 10) -> Attack:
        """PGD-`steps` at `eps` (default: the checkpoint's training eps) in its training norm."""
        trained = self.experiment.attack
        if eps is None and self.metadata.get("external"):
            raise ValueError(f"{self.path} was not trained by nslab, so its threat model is unknown: pass --eps "
                             "(e.g. 8/255 for CIFAR-10, 0.3 for MNIST)")
        return Attack("pgd", trained.eps if eps is None else eps, norm=trained.norm, steps=steps)


def load_checkpoints(paths: Sequence[str | Path], labels: Sequence[str] | None = None,
                     device: str = "auto", download: bool = False) -> list[Loaded]:
    """Load nslab checkpoints; labels default to the training method (plus the seed when methods repeat).
    `download`: each one's dataset may be downloaded where its files are missing (--download)."""
    if labels is not None and len(labels) != len(paths):
        raise ValueError(f"--labels needs one label per checkpoint: {len(paths)} checkpoints, {len(labels)} labels")
    loaded = []
    for path in paths:
        path = Path(path).expanduser().resolve()
        model, meta = load_model(path, device)
        if download:
            meta["config"] = {**meta["config"], "data": {**meta["config"].get("data", {}), "download": True}}
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
    """The layers to analyze: those given, else the model's default_layers, else proposed by nslab; unknown
    names, or modules that run more than once per forward, are one-line errors (ns_core.models.studied_layers)."""
    return studied_layers(model, list(layers) if layers else None)


Adapt = Literal["all", "normalize", "cifar_stem"]
ADAPT_CHOICES: dict[str, str] = {  # what a plain state_dict's model may be built with, and what each adds
    "all": "as nslab training builds it: the data's normalization in front, the first convolution for its "
           "channels, the small-input (CIFAR) stem under 64 pixels",
    "normalize": "the data's normalization in front (the model was trained on normalized inputs)",
    "cifar_stem": "the small-input (CIFAR) stem: the first convolution 3x3 at stride 1, the max-pool after it gone",
}


def external_adaptation(input_shape: tuple[int, int, int], adapt: Collection[Adapt] = ()) -> Adaptation:
    """How a plain classifier whose weights were trained outside nslab is built for (C, H, W) inputs: as its
    factory builds it (ns_core.adapters.bare_adaptation), plus the decisions in `adapt` (ADAPT_CHOICES)."""
    unknown = sorted(set(adapt) - set(ADAPT_CHOICES))
    if unknown:
        raise ValueError(f"unknown adaptation {unknown}; choose from {', '.join(ADAPT_CHOICES)}")
    mean, std = normalization_for(input_shape[0])
    if "all" in adapt:
        return nslab_adaptation(input_shape, mean, std)
    normalized = "normalize" in adapt
    return bare_adaptation(input_shape, mean=mean if normalized else None, std=std if normalized else None,
                           small_stem="cifar_stem" in adapt)


def load_external(model: str, state_dict: str | Path, dataset: str, data_root: str | None = None,
                  device: str = "auto", eps: float | None = None, label: str | None = None,
                  adapt: Collection[Adapt] = (), download: bool = False) -> Loaded:
    """A model nslab did not train: its factory (a registered name or an import path, built for `dataset`'s
    inputs and classes) with the weights of a plain state_dict file (weights_only=True). A plain classifier
    (a factory that takes num_classes alone) is built as its factory builds it, plus only the adaptations in
    `adapt` (`external_adaptation`): nothing changes the inputs it sees unless asked. Its metadata is what an
    nslab checkpoint would carry, with the training attack unknown: `eps` names the threat model the analysis
    attacks at. `download`: the dataset may be downloaded where its files are missing (--download)."""
    experiment = validate(ExperimentConfig, {"name": "external", "dataset": dataset, "model": model,
                                             "method": "standard", "data": {"root": data_root, "download": download},
                                             "attack": {"name": "pgd", "eps": eps if eps is not None else 0.0}},
                          source=f"--model {model} --dataset {dataset}")
    data = load_data(experiment)
    plain = factory_contract(MODELS.get(model)) == "classifier"
    adaptation = external_adaptation(tuple(data.input_shape), adapt) if plain or adapt else None
    network = create_model(model, input_shape=data.input_shape, num_classes=data.num_classes, adaptation=adaptation)
    path = Path(state_dict).expanduser().resolve()
    network = load_weights(network, path, pick_device(device))
    metadata = {"model": model, "dataset": dataset, "method": "external", "input_shape": list(data.input_shape),
                "num_classes": data.num_classes, "config": experiment.model_dump(mode="json"), "external": True,
                "adaptation": adaptation.to_dict() if adaptation is not None else None}
    return Loaded(label or path.stem, path, network, metadata)


def subtitle(item: Loaded, attack: Attack, n: int, extra: str = "") -> str:
    what = f"{attack.name.upper()}-{attack.steps_used} {attack.norm} eps {attack.eps:g}"
    return (f"{item.metadata['dataset']} test split ({n} images) / {item.metadata['model']}; {what}"
            + (f"; {extra}" if extra else ""))
