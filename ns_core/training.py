"""The Trainer: epochs of an objective (standard, PGD-AT, TRADES, SNS) with validation each epoch.

Each epoch it reports clean and PGD robust accuracy on a fixed validation subset, the loss terms,
the mean neuron sensitivity (all neurons and the selected ones) measured on the same validation
pairs the robust accuracy used (one extra forward, no extra attack), and the epoch's seconds.
Callbacks receive those metrics after every epoch: the orchestrator reports and checkpoints there.

    trainer = Trainer(model, create_objective("sns", lam=0.1), train_set, val_set, TrainConfig(epochs=5))
    history = trainer.fit()
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from ns_core.attacks import pgd
from ns_core.objectives import SNS, Objective, TrainingCollapsed
from ns_core.sensitivity import SensitivityMap, measure_sensitivity
from ns_core.utils import eval_mode, make_generator, pick_device

log = logging.getLogger(__name__)
EpochCallback = Callable[[dict, "Trainer"], None]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


@dataclass
class TrainConfig:
    """How to train: optimization, schedule, validation and safety checks."""

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
    val_size: int = 500
    val_eps: float = 0.3
    val_steps: int = 10
    probe_size: int = 256  # SNS re-selection subset of the training set
    sensitivity_fraction: float = 0.1  # "selected" for methods that select nothing themselves
    collapse_patience: int = 2
    progress: bool | None = None  # None: a bar when stderr is a terminal

    def __post_init__(self) -> None:
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose sgd or adam")
        if self.schedule not in ("constant", "piecewise", "cosine"):
            raise ValueError(f"unknown schedule {self.schedule!r}; choose constant, piecewise or cosine")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("epochs and batch_size must be >= 1 and lr > 0")


def first_examples(dataset: Dataset, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n examples of a dataset as two tensors (x, y)."""
    if isinstance(dataset, TensorDataset):
        x, y = dataset.tensors[:2]
        return x[:n], y[:n]
    n = min(n, len(dataset))
    items = [dataset[i] for i in range(n)]
    return torch.stack([item[0] for item in items]), torch.tensor([int(item[1]) for item in items])


def iterate_batches(dataset: Dataset, batch_size: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled batches in a seeded order; in-memory tensors are sliced directly (no collate cost)."""
    generator = torch.Generator().manual_seed(seed)
    if isinstance(dataset, TensorDataset):
        x, y = dataset.tensors[:2]
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch_size):
            index = order[start:start + batch_size]
            yield x[index], y[index]
        return
    yield from DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator,
                          pin_memory=torch.cuda.is_available())


class Trainer:
    def __init__(
        self,
        model: nn.Module,
        objective: Objective,
        train_set: Dataset,
        val_set: Dataset,
        config: TrainConfig,
        callbacks: Sequence[EpochCallback] = (),
        metadata: dict | None = None,
    ) -> None:
        self.config = config
        self.device = pick_device(config.device)
        self.model = model.to(self.device)
        self.objective = objective
        self.train_set = train_set
        self.callbacks = list(callbacks)
        self.metadata = dict(metadata or {})
        self.num_classes = int(self.metadata.get("num_classes", 10))
        self.layers = objective.chosen_layers(model) if isinstance(objective, SNS) else list(model.default_layers)
        self.val = tuple(t.to(self.device) for t in first_examples(val_set, config.val_size))
        self.probe = tuple(t.to(self.device) for t in first_examples(train_set, config.probe_size))
        self.generator = make_generator(config.seed, self.device)
        self.optimizer = self._make_optimizer()
        steps_per_epoch = math.ceil(len(train_set) / config.batch_size)
        self.scheduler = self._make_scheduler(steps_per_epoch * config.epochs)
        self.amp = config.amp and self.device.type == "cuda"
        self.epoch = 0  # epochs completed
        self.history: list[dict] = []
        self.last_sensitivity: SensitivityMap | None = None
        self._epochs_at_chance = 0

    def _make_optimizer(self) -> torch.optim.Optimizer:
        c = self.config
        if c.optimizer == "adam":
            return torch.optim.Adam(self.model.parameters(), lr=c.lr, weight_decay=c.weight_decay)
        return torch.optim.SGD(self.model.parameters(), lr=c.lr, momentum=c.momentum,
                               weight_decay=c.weight_decay, nesterov=c.momentum > 0)

    def _make_scheduler(self, total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
        c = self.config
        if c.schedule == "cosine":
            return torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=max(total_steps, 1))
        if c.schedule == "piecewise":
            milestones = sorted(int(m * total_steps) for m in c.milestones)
            return torch.optim.lr_scheduler.MultiStepLR(self.optimizer, milestones, gamma=c.gamma)
        return torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda _: 1.0)

    def fit(self) -> list[dict]:
        """Train from the current epoch to config.epochs; returns the per-epoch metrics."""
        while self.epoch < self.config.epochs:
            metrics = self.train_epoch()
            metrics.update(self.validate())
            self.epoch += 1
            self.history.append(metrics)
            log.info("epoch %d/%d  %s", self.epoch, self.config.epochs,
                     "  ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k != "epoch"))
            self._check_collapse(metrics)
            for callback in self.callbacks:
                callback(metrics, self)
        return self.history

    def train_epoch(self) -> dict:
        start = time.perf_counter()
        info = self.objective.on_epoch_start(self.model, self.epoch, self.probe, self.generator)
        self.model.train()
        totals: dict[str, torch.Tensor] = {}
        batches = iterate_batches(self.train_set, self.config.batch_size, self.config.seed + self.epoch)
        num_batches = math.ceil(len(self.train_set) / self.config.batch_size)
        for step, (x, y) in enumerate(self._progress(batches, num_batches)):
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
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
        means = {f"train_{k}": float(v) / num_batches for k, v in totals.items()}
        if not math.isfinite(means["train_loss"]):
            raise TrainingDiverged(f"loss became {means['train_loss']} in epoch {self.epoch + 1}; "
                                   f"lower the learning rate (lr={self.config.lr}) or the loss weights")
        return {"epoch": self.epoch + 1, **means, **info, "lr": self.scheduler.get_last_lr()[0],
                "epoch_seconds": time.perf_counter() - start}

    def validate(self) -> dict:
        """Clean and PGD accuracy on the validation subset, and sensitivity on the same pairs."""
        x, y = self.val
        with eval_mode(self.model):
            x_adv = pgd(self.model, x, y, eps=self.config.val_eps, steps=self.config.val_steps,
                        generator=make_generator(self.config.seed, self.device))
            with torch.no_grad():
                clean = (self.model(x).argmax(1) == y).float().mean()
                robust = (self.model(x_adv).argmax(1) == y).float().mean()
        smap = measure_sensitivity(self.model, [(x, x_adv)], self.layers, metadata=self.metadata)
        self.last_sensitivity = smap
        return {"clean_acc": float(clean), "robust_acc": float(robust),
                "sensitivity_all": smap.mean(), "sensitivity_selected": smap.mean(selected=self.selected()),
                "relative_sensitivity_all": smap.mean(relative=True)}

    def selected(self) -> dict[str, torch.Tensor]:
        """SNS's current sensitive set, or the top fraction of the last validation map otherwise."""
        if isinstance(self.objective, SNS) and self.objective.selected:
            return self.objective.selected
        assert self.last_sensitivity is not None
        return self.last_sensitivity.top(self.config.sensitivity_fraction)

    def _check_collapse(self, metrics: dict) -> None:
        sns_on = isinstance(self.objective, SNS) and self.objective.active
        at_chance = metrics["clean_acc"] <= 1.0 / self.num_classes + 0.05
        self._epochs_at_chance = self._epochs_at_chance + 1 if sns_on and at_chance else 0
        if self._epochs_at_chance >= self.config.collapse_patience:
            raise TrainingCollapsed(
                f"clean accuracy {metrics['clean_acc']:.3f} sat at chance for {self._epochs_at_chance} epochs "
                f"with the SNS regularizer on (sensitivity {metrics['sensitivity_all']:.3g}); "
                "lower sns.lambda or raise sns.warmup_epochs")

    def _progress(self, batches, total: int):
        show = self.config.progress if self.config.progress is not None else sys.stderr.isatty()
        if not show:
            return batches
        from tqdm import tqdm

        return tqdm(batches, total=total, desc=f"epoch {self.epoch + 1}/{self.config.epochs}", leave=False)

    # ---- checkpoints: state_dicts + JSON-able metadata, loadable with weights_only=True ----
    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "objective": self.objective.state_dict(),
                "epoch": self.epoch, "history": self.history, "metadata": self.metadata,
                "generator": self.generator.get_state() if self.generator is not None else None,
                "config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self.config).items()}}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.objective.load_state_dict(state["objective"])
        if isinstance(self.objective, SNS):
            self.objective.selected = {k: v.to(self.device) for k, v in self.objective.selected.items()}
        if self.generator is not None and state.get("generator") is not None:
            self.generator.set_state(state["generator"].cpu())
        self.epoch = int(state["epoch"])
        self.history = list(state["history"])

    def save_checkpoint(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        torch.save(self.state_dict(), tmp)
        tmp.replace(path)  # atomic: a crash never leaves a half-written checkpoint
        return path

    def load_checkpoint(self, path: str | Path) -> None:
        self.load_state_dict(torch.load(path, map_location=self.device, weights_only=True))

