"""Benchmark, one PGD-AT epoch: nslab's Trainer against the loop a researcher writes by hand, side by side.

    python -m bench --only epoch --quick

Variants, interleaved, each on its own copy of one initial model, the same data, PGD-10 at the same eps,
batch 64 (CPU) or 128 (CUDA), Adam:
- nslab: `Trainer.train_epoch` (batches drawn by index from tensors on the device, the measured memory
  format, bf16 autocast and a fused optimizer on CUDA);
- plain: a DataLoader over a TensorDataset and torchattacks' PGD, NCHW, fp32;
- plain_channels_last: the same loop with model and inputs in channels_last (a one-line change).
Cases: LeNet-5 on the embedded mnist5k digits, the CIFAR ResNet-18 on CIFAR-shaped images at a small batch.
Targets: nslab/plain <= 0.65 on CPU, <= 0.5 on a GPU.
"""

from __future__ import annotations

import copy
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from bench.harness import Context, interleave, make_case, result
from ns_core.attacks import Attack
from ns_core.data import DatasetSplits, Split, load_dataset
from ns_core.models import create_model
from ns_core.objectives import create_objective
from ns_core.training import TrainConfig, Trainer

NAME = "epoch"
STEPS = 10


def cases(ctx: Context) -> list[dict]:
    lenet = {"name": "lenet5 mnist5k", "model": "lenet5", "eps": 0.2, "images": ctx.pick(256, 1024, 3500),
             "batch": 128 if ctx.cuda else 64}
    resnet = {"name": "resnet18 cifar-shaped", "model": "resnet18", "eps": 8 / 255,
              "images": ctx.pick(16, 32, 64) if not ctx.cuda else ctx.pick(256, 2048, 10000),
              "batch": 128 if ctx.cuda else 16}
    return [lenet, resnet]


def _data(case: dict) -> DatasetSplits:
    if case["model"] == "lenet5":
        data = load_dataset("mnist5k", train_limit=case["images"])
        return DatasetSplits("mnist5k", data.train, data.val, data.test, 10)
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(case["images"] + 64, 3, 32, 32, generator=generator)
    y = torch.randint(0, 10, (len(x),), generator=generator)
    split = Split(x[:case["images"]], y[:case["images"]])
    return DatasetSplits("cifar-shaped", split, Split(x[-64:], y[-64:]), Split(x[-64:], y[-64:]), 10)


def nslab_epoch(model, data: DatasetSplits, case: dict, device: torch.device, amp: bool = True):
    attack = Attack("pgd", case["eps"], steps=STEPS)
    config = TrainConfig(epochs=1, batch_size=case["batch"], optimizer="adam", lr=1e-3, weight_decay=0.0,
                         device=str(device), amp=amp, val_attack=attack, progress=False)
    trainer = Trainer(model, create_objective("pgd_at", attack=attack), data, config)
    return lambda: trainer.train_epoch()


def plain_epoch(model, data: DatasetSplits, case: dict, device: torch.device, channels_last: bool):
    """The hand-written loop of a PyTorch user: DataLoader + torchattacks PGD + Adam."""
    import torchattacks  # the peer; imported here so the rest of bench runs without it

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(device, memory_format=fmt)
    x, y = data.train.take()
    loader = DataLoader(TensorDataset(x, y), batch_size=case["batch"], shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    attack = torchattacks.PGD(model, eps=case["eps"], alpha=2.5 * case["eps"] / STEPS, steps=STEPS, random_start=True)

    def epoch() -> None:
        model.train()
        for xb, yb in loader:
            xb, yb = xb.to(device, memory_format=fmt), yb.to(device)
            x_adv = attack(xb, yb)
            model.train()
            loss = F.cross_entropy(model(x_adv), yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    return epoch


def run(ctx: Context) -> dict:
    start = time.perf_counter()
    out = []
    for case in cases(ctx):
        data = _data(case)
        torch.manual_seed(0)
        base = create_model(case["model"], data.input_shape, 10)
        variants = {"nslab": nslab_epoch(copy.deepcopy(base), data, case, ctx.device),
                    "plain": plain_epoch(copy.deepcopy(base), data, case, ctx.device, channels_last=False),
                    "plain_channels_last": plain_epoch(copy.deepcopy(base), data, case, ctx.device,
                                                       channels_last=True)}
        times = interleave(variants, ctx.reps, ctx.warmup, ctx.device)
        target = 0.5 if ctx.cuda else 0.65
        out.append(make_case(case["name"], times,
                             ratios={"nslab/plain": ("nslab", "plain", target),
                                     "plain_channels_last/plain": ("plain_channels_last", "plain", None),
                                     "nslab/plain_channels_last": ("nslab", "plain_channels_last", None)},
                             params={**case, "steps": STEPS, "optimizer": "adam(lr=1e-3)"}))
    notes = ["one PGD-AT epoch (PGD-10) per call; plain = DataLoader(TensorDataset) + torchattacks.PGD + Adam",
             "nslab picks its memory format per model and device (ns_core/performance.py) and draws batches by "
             "index from tensors already on the device; on CUDA it also uses bf16 autocast and fused Adam"]
    return result(ctx, NAME, "one PGD-AT epoch: nslab vs the plain loop vs the plain loop in channels_last", out,
                  notes, time.perf_counter() - start)
