"""The Trainer: epochs of an objective (standard, PGD-AT, fast AT, TRADES, MART, CAS, SNS), validated every epoch.

Each epoch it reports, on the validation split (never the test split): clean and robust accuracy under
the validation attack, the mean neuron sensitivity measured on those same pairs (all neurons, the
selected ones, and the relative variant), the loss terms, the learning rate and the epoch's seconds.
"Selected" neurons are the objective's own (SNS), or for other methods the top fraction of a map
measured on the fixed training probe set, never on the pairs the number is reported on. Callbacks
receive the metrics after every epoch: the orchestrator logs, checkpoints and reports there.

    trainer = Trainer(model, create_objective("pgd_at", attack=Attack("pgd", 0.2)), load_dataset("mnist5k"),
                      TrainConfig(epochs=5))
    history = trainer.fit()

Batches are drawn by index from tensors that live on the training device (no DataLoader, no collate);
the model and its inputs use the faster memory format for the device (`performance.memory_format`); on
CUDA, bf16 autocast and fused optimizers. The training state (model, optimizer, schedule, the random
generator, the objective's state) is one `state_dict`, so a resumed or forked run continues bit for bit.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from ns_core.adapters import adaptation_of
from ns_core.attacks import Attack
from ns_core.checkpoint import save_checkpoint
from ns_core.data import DatasetSplits, Split, augment_batch
from ns_core.objectives import Objective
from ns_core.performance import memory_format
from ns_core.sensitivity import SensitivityMap, measure_sensitivity
from ns_core.utils import eval_mode, make_generator, pick_device

log = logging.getLogger(__name__)
EpochCallback = Callable[[dict, "Trainer"], None]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


@dataclass
class TrainConfig:
    """How to train: optimization, schedule, validation and the probe set."""

    epochs: int = 5
    batch_size: int = 128
    optimizer: str = "sgd"  # sgd | adam
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"  # constant | piecewise | cosine
    milestones: Sequence[float] = (0.5, 0.75)  # piecewise: fractions of training where lr *= gamma
    gamma: float = 0.1
    seed: int = 0
    device: str = "auto"
    amp: bool = True  # bf16 autocast, CUDA only
    val_attack: Attack = field(default_factory=lambda: Attack("pgd", 0.3, steps=10))
    val_batch_size: int = 500
    probe_size: int = 256  # SNS re-selection subset of the training set; "selected" for other methods
    sensitivity_fraction: float = 0.1  # "selected" for methods that select nothing themselves
    progress: bool | None = None  # None: a bar when stderr is a terminal

    def __post_init__(self) -> None:
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose sgd or adam")
        if self.schedule not in ("constant", "piecewise", "cosine"):
            raise ValueError(f"unknown schedule {self.schedule!r}; choose constant, piecewise or cosine")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("epochs and batch_size must be >= 1 and lr > 0")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["milestones"] = list(self.milestones)
        d["val_attack"] = {k: list(v) if isinstance(v, tuple) else v for k, v in d["val_attack"].items()}
        return d


class Trainer:
    def __init__(
        self,
        model: nn.Module,
        objective: Objective,
        data: DatasetSplits,
        config: TrainConfig,
        callbacks: Sequence[EpochCallback] = (),
        metadata: dict | None = None,
    ) -> None:
        self.config = config
        self.device = pick_device(config.device)
        self.memory_format = memory_format(model, data.input_shape, self.device)
        self.model = model.to(self.device, memory_format=self.memory_format)
        self.objective = objective
        self.train_split: Split = data.train.to(self.device)
        self.val: Split = data.val.to(self.device)
        self.augment = data.augment
        self.num_classes = data.num_classes
        self.callbacks = list(callbacks)
        self.metadata = dict(metadata or {})
        adaptation = adaptation_of(model)  # how a plain classifier was fitted: a loaded checkpoint replays it
        self.metadata["adaptation"] = adaptation.to_dict() if adaptation is not None else None
        # before the optimizer: what the objective adds to the model (CAS's heads) trains and is saved with it
        self.metadata.update(objective.prepare_model(self.model, tuple(data.input_shape), data.num_classes))
        self.layers = objective.watched_layers(self.model)
        self.probe = self.train_split.take(config.probe_size)
        self.generator = make_generator(config.seed, self.device)
        self.optimizer = self._make_optimizer()
        self.steps_per_epoch = math.ceil(len(self.train_split) / config.batch_size)
        self.scheduler = self._make_scheduler(self.steps_per_epoch * config.epochs)
        self.amp = config.amp and self.device.type == "cuda"
        self.epoch = 0  # epochs completed
        self.history: list[dict] = []
        self.last_sensitivity: SensitivityMap | None = None
        self.last_selection: dict[str, Tensor] | None = None

    def _make_optimizer(self) -> torch.optim.Optimizer:
        c = self.config
        fused = {"fused": True} if self.device.type == "cuda" else {}  # one kernel per step on a GPU
        if c.optimizer == "adam":
            return torch.optim.Adam(self.model.parameters(), lr=c.lr, weight_decay=c.weight_decay, **fused)
        return torch.optim.SGD(self.model.parameters(), lr=c.lr, momentum=c.momentum,
                               weight_decay=c.weight_decay, nesterov=c.momentum > 0, **fused)

    def _make_scheduler(self, total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
        c = self.config
        if c.schedule == "cosine":
            return torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=max(total_steps, 1))
        if c.schedule == "piecewise":
            milestones = sorted(int(m * total_steps) for m in c.milestones)
            return torch.optim.lr_scheduler.MultiStepLR(self.optimizer, milestones, gamma=c.gamma)
        return torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda _: 1.0)

    def fit(self, until: int | None = None) -> list[dict]:
        """Train from the current epoch to `until` (default: config.epochs); returns the per-epoch metrics.
        Stopping early keeps the full schedule, so the state after epoch k is the same whatever `until` is."""
        until = self.config.epochs if until is None else min(until, self.config.epochs)
        while self.epoch < until:
            metrics = self.train_epoch()
            metrics.update(self.validate())
            self.epoch += 1
            self.history.append(metrics)
            log.info("epoch %d/%d  %s", self.epoch, self.config.epochs,
                     "  ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k != "epoch"))
            self.objective.check(self.history, self.num_classes)
            for callback in self.callbacks:
                callback(metrics, self)
        return self.history

    def train_epoch(self) -> dict:
        start = time.perf_counter()
        info = self.objective.on_epoch_start(self.model, self.epoch, self.probe, self.generator)
        self.model.train()
        totals: dict[str, Tensor] = {}
        batches = self.train_split.batches(self.config.batch_size, seed=self.config.seed + self.epoch)
        for step, (x, y) in enumerate(self._progress(batches)):
            x = augment_batch(x, self.augment, self.generator).contiguous(memory_format=self.memory_format)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                x_adv = self.objective.craft(self.model, x, y, self.generator)
                loss, parts = self.objective.loss(self.model, x, y, x_adv)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.scheduler.step()
            for name, value in {"loss": loss.detach(), **parts}.items():
                totals[name] = totals.get(name, 0.0) + value.float()
            if step % 25 == 0 and not torch.isfinite(totals["loss"]):  # one sync per 25 steps
                break
        means = {f"train/{k}": float(v) / self.steps_per_epoch for k, v in totals.items()}
        if not math.isfinite(means["train/loss"]):
            raise TrainingDiverged(f"loss became {means['train/loss']} in epoch {self.epoch + 1}; "
                                   f"lower the learning rate (lr={self.config.lr}) or the loss weights")
        return {"epoch": self.epoch + 1, **means, **info, "train/lr": self.scheduler.get_last_lr()[0],
                "time/epoch_seconds": time.perf_counter() - start}

    def validate(self) -> dict:
        """Clean and robust accuracy on the validation split, and sensitivity on the same pairs."""
        start = time.perf_counter()
        attack, generator = self.config.val_attack, make_generator(self.config.seed, self.device)
        correct = torch.zeros(2, dtype=torch.long, device=self.device)
        pairs = []
        with eval_mode(self.model):
            for x, y in self.val.batches(self.config.val_batch_size):
                x = x.contiguous(memory_format=self.memory_format)
                x_adv = attack(self.model, x, y, generator)
                with torch.no_grad():
                    correct[0] += (self.model(x).argmax(1) == y).sum()
                    correct[1] += (self.model(x_adv).argmax(1) == y).sum()
                pairs.append((x, x_adv))
        smap = measure_sensitivity(self.model, pairs, self.layers, metadata=self.metadata_for_map())
        self.last_sensitivity, self.last_selection = smap, self.selection()
        clean, robust = (correct.double() / len(self.val)).tolist()
        return {"val/clean_acc": clean, "val/robust_acc": robust, "val/sensitivity_all": smap.mean(),
                "val/sensitivity_selected": smap.mean(selected=self.last_selection),
                "val/relative_sensitivity_all": smap.mean(relative=True),
                "time/val_seconds": time.perf_counter() - start}

    def selection(self) -> dict[str, Tensor]:
        """The objective's selected neurons, else the top fraction of a map measured on the training probe
        set under the validation attack (fixed seed: the choice never sees the validation pairs)."""
        selected = self.objective.selected_neurons()
        if selected:
            return selected
        x, y = self.probe
        x_adv = self.config.val_attack(self.model, x, y, make_generator(self.config.seed + 1, self.device))
        return measure_sensitivity(self.model, [(x, x_adv)], self.layers).top(self.config.sensitivity_fraction)

    def metadata_for_map(self) -> dict:
        attack = self.config.val_attack
        return {"model": self.metadata.get("model", ""), "dataset": self.metadata.get("dataset", ""),
                "attack": attack.name, "norm": attack.norm, "eps": attack.eps, "steps": attack.steps_used}

    def _progress(self, batches: Iterable) -> Iterable:
        show = self.config.progress if self.config.progress is not None else sys.stderr.isatty()
        if not show:
            return batches
        from tqdm import tqdm

        return tqdm(batches, total=self.steps_per_epoch, desc=f"epoch {self.epoch + 1}/{self.config.epochs}",
                    leave=False)

    # ---- checkpoints: state_dicts + JSON-able metadata, loadable with weights_only=True ----
    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "objective": self.objective.state_dict(),
                "epoch": self.epoch, "history": self.history, "metadata": self.metadata,
                "generator": self.generator.get_state() if self.generator is not None else None,
                "config": self.config.to_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.objective.load_state_dict(state["objective"], self.device)
        if self.generator is not None and state.get("generator") is not None:
            self.generator.set_state(state["generator"].cpu())
        self.epoch = int(state["epoch"])
        self.history = list(state["history"])

    def save_checkpoint(self, path) -> None:
        save_checkpoint(self.state_dict(), path)
