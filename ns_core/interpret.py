"""The analyses' science: activation patching ("stabilize") and sensitivity comparisons across models.

Claim 2, sensitive neurons carry the adversarial mistakes: `stabilize_curve` runs the adversarial
inputs through the model while an `ActivationPatch` overwrites k chosen neurons of one layer with the
values those neurons take on the paired benign input, and reports accuracy for the k most sensitive
neurons against k random ones (drawn from all neurons and from the alive ones, several draws).

    with ActivationCapture(model, ["relu3"]) as capture:
        model(x)
        benign = capture.pop()                                   # {"relu3": (B, 120)}
    with ActivationPatch(model, {"relu3": top_k}, benign):
        logits = model(x_adv)                                    # relu3's top_k neurons as on x

Claim 1, adversarial training lowers neuron sensitivity: `compare_models` measures every model on
the same benign inputs, each attacked by its own attack run (and, optionally, all by one shared source
model's, which fixes the input perturbation), and summarizes each layer's distribution in both
the absolute and the relative variant: a model that merely scales its activations down looks less
sensitive in absolute terms only (docs/design.md, "Low sensitivity is not robustness").
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import pyarrow as pa
import torch
from torch import nn

from ns_core.attacks import Attack
from ns_core.sensitivity import (
    ActivationCapture,
    ForwardHooks,
    SensitivityMap,
    measure_sensitivity,
    resolve_layers,
)
from ns_core.utils import eval_mode, make_generator

SELECTIONS = ("sensitive", "random_all", "random_alive")
DEFAULT_FRACTIONS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)
VARIANTS = ("absolute", "relative")


class ActivationPatch(ForwardHooks):
    """Scoped forward hooks that replace the chosen neurons (dim 1) of named layers with given values.

    `neurons`: layer -> LongTensor of neuron indices; `values`: layer -> a tensor shaped like that
    layer's output (usually its output on the benign twins). Every other neuron, and every other
    layer, is left exactly as computed. Assign `patch.values` between forwards to reuse the hooks.
    """

    def __init__(self, model: nn.Module, neurons: Mapping[str, torch.Tensor],
                 values: Mapping[str, torch.Tensor]) -> None:
        super().__init__(model, neurons)
        self.neurons = dict(neurons)
        self.values = dict(values)

    def _hook(self, name: str):
        def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            source = self.values[name]
            if source.shape != output.shape:
                raise ValueError(f"patch values for {name!r} have shape {tuple(source.shape)}, the layer "
                                 f"outputs {tuple(output.shape)}; capture them from a forward of the paired batch")
            index = self.neurons[name].to(output.device)
            return output.index_copy(1, index, source.to(output.dtype).index_select(1, index))

        return hook


def _chunks(n: int, batch_size: int) -> Iterable[slice]:
    return (slice(start, min(start + batch_size, n)) for start in range(0, n, batch_size))


def attack_batches(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: Attack, *, seed: int = 0,
                   batch_size: int = 256) -> torch.Tensor:
    """Adversarial twins of (x, y) against `model` under `attack`, computed in batches on the model's device."""
    device = next(model.parameters()).device
    generator = make_generator(seed, device)
    return torch.cat([attack(model, x[s].to(device), y[s].to(device), generator) for s in _chunks(len(x), batch_size)])


def _random_subset(pool: torch.Tensor, k: int, generator: torch.Generator | None) -> torch.Tensor:
    return pool[torch.randperm(len(pool), generator=generator)[:k]]


def patch_selections(smap: SensitivityMap, layer: str, fractions: Sequence[float], random_draws: int,
                     generator: torch.Generator | None = None,
                     selections: Sequence[str] = SELECTIONS) -> list[tuple[str, float, int, int, torch.Tensor]]:
    """(selection, fraction, k, draw, neuron indices) for every patch `stabilize_curve` evaluates.

    k = ceil(fraction x layer width), at least 1. `random_alive` draws from neurons with a non-zero mean
    benign activation; when k exceeds their number it takes them all and fills up with random dead ones,
    so every selection patches the same k. Draws use `generator` (CPU) in a fixed order: seeded, repeatable.
    """
    unknown = sorted(set(selections) - set(SELECTIONS))
    if unknown:
        raise ValueError(f"unknown selection(s) {unknown}; choose from: {', '.join(SELECTIONS)}")
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(f"stabilize draws need a CPU generator, got one on {generator.device}")
    sigma = smap.absolute[layer]
    width = sigma.numel()
    order = torch.argsort(sigma, descending=True, stable=True)
    alive_mask = smap.benign_activation[layer] > 0
    alive, dead = alive_mask.nonzero().flatten(), (~alive_mask).nonzero().flatten()
    out = []
    for fraction in fractions:
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"fractions must lie in (0, 1], got {fraction}")
        k = max(1, math.ceil(fraction * width))
        if "sensitive" in selections:
            out.append(("sensitive", fraction, k, 0, order[:k]))
        for draw in range(random_draws):
            if "random_all" in selections:
                out.append(("random_all", fraction, k, draw, _random_subset(torch.arange(width), k, generator)))
            if "random_alive" in selections:
                index = _random_subset(alive, k, generator)
                if k > len(alive):
                    index = torch.cat([index, _random_subset(dead, k - len(alive), generator)])
                out.append(("random_alive", fraction, k, draw, index))
    return out


@torch.no_grad()
def stabilize_curve(model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor, layer: str,
                    fractions: Sequence[float], smap: SensitivityMap, random_draws: int = 5,
                    generator: torch.Generator | None = None, selections: Sequence[str] = SELECTIONS,
                    batch_size: int = 512) -> list[dict]:
    """Accuracy on x_adv when k neurons of `layer` take their values from the paired benign x.

    `smap` ranks the neurons and says which are alive; measure it on other examples than (x, x_adv)
    (e.g. a training probe), or the top-k choice is fitted to the very examples it is scored on.
    Returns one row per (selection, fraction, draw) with the clean and unpatched adversarial accuracy
    beside it; `recovered` = (accuracy - adversarial) / (clean - adversarial).
    """
    if layer not in smap.absolute:
        raise ValueError(f"layer {layer!r} is not in the sensitivity map; it has: {', '.join(smap.layers)}")
    resolve_layers(model, [layer])
    patches = patch_selections(smap, layer, fractions, random_draws, generator, selections)
    device = next(model.parameters()).device
    correct = torch.zeros(len(patches) + 2, dtype=torch.long, device=device)  # patches, clean, adversarial
    with eval_mode(model), ActivationCapture(model, [layer]) as capture:
        for s in _chunks(len(x), batch_size):
            xb, xb_adv, yb = x[s].to(device), x_adv[s].to(device), y[s].to(device)
            correct[-2] += (model(xb).argmax(1) == yb).sum()
            benign = capture.pop()                                   # {layer: (B, C, ...)}
            correct[-1] += (model(xb_adv).argmax(1) == yb).sum()
            with ActivationPatch(model, {layer: patches[0][4]}, benign) as patch:
                for i, (*_, index) in enumerate(patches):
                    patch.neurons[layer] = index
                    correct[i] += (model(xb_adv).argmax(1) == yb).sum()
            capture.pop()
    accuracy = (correct.double() / len(x)).tolist()
    clean, adversarial = accuracy[-2], accuracy[-1]
    gap = clean - adversarial
    sigma = smap.absolute[layer]
    alive = int((smap.benign_activation[layer] > 0).sum())
    return [{"layer": layer, "neurons": sigma.numel(), "alive": alive, "selection": selection,
             "fraction": float(fraction), "k": k, "draw": draw, "accuracy": accuracy[i],
             "clean_accuracy": clean, "adversarial_accuracy": adversarial,
             "recovered": (accuracy[i] - adversarial) / gap if gap > 0 else float("nan"),
             "patched_sensitivity": float(sigma[index].mean())}
            for i, (selection, fraction, k, draw, index) in enumerate(patches)]


@dataclass
class Comparison:
    """Sensitivity maps of several models on the same inputs; source "own" (each model's own PGD) and
    "shared" (one source model's PGD for all) -> label -> map, and each model's accuracies."""

    labels: list[str]
    layers: list[str]
    maps: dict[str, dict[str, SensitivityMap]]
    accuracy: dict[str, dict[str, float]]
    attack: Attack
    num_examples: int

    def stats_table(self) -> pa.Table:
        """Per (source, model, layer, variant): neurons, alive fraction, mean, std, quartiles, max.
        Layer "(all)" pools every neuron of every layer."""
        rows = []
        for source, maps in self.maps.items():
            for label in self.labels:
                smap = maps[label]
                for variant in VARIANTS:
                    values = smap.values(relative=variant == "relative")
                    alive = smap.alive()
                    for layer in [*self.layers, "(all)"]:
                        v = torch.cat(list(values.values())) if layer == "(all)" else values[layer]
                        a = torch.cat(list(alive.values())) if layer == "(all)" else alive[layer]
                        q = torch.quantile(v, torch.tensor([0.25, 0.5, 0.75], dtype=v.dtype)).tolist()
                        rows.append({"source": source, "model": label, "layer": layer, "variant": variant,
                                     "neurons": v.numel(), "alive_fraction": float(a.double().mean()),
                                     "mean": float(v.mean()), "std": float(v.std()) if v.numel() > 1 else 0.0,
                                     "q25": q[0], "median": q[1], "q75": q[2], "max": float(v.max())})
        return pa.Table.from_pylist(rows)

    def verdict_table(self, reference: str | None = None) -> pa.Table:
        """Per (source, layer, model): mean sensitivity against the reference model's (default: the first
        label), absolute and relative, the model's rank among all (0 = lowest), and a one-word verdict."""
        reference = reference or self.labels[0]
        if reference not in self.labels:
            raise ValueError(f"reference {reference!r} is not a compared model; choose one of {self.labels}")
        stats = self.stats_table().to_pylist()
        mean = {(r["source"], r["model"], r["layer"], r["variant"]): r["mean"] for r in stats}
        rows = []
        for source in self.maps:
            for layer in [*self.layers, "(all)"]:
                ranks = {v: sorted(self.labels, key=lambda m, v=v: mean[source, m, layer, v]) for v in VARIANTS}
                for label in self.labels:
                    row = {"source": source, "layer": layer, "model": label, "reference": reference}
                    lower = {}
                    for v in VARIANTS:
                        ours, ref = mean[source, label, layer, v], mean[source, reference, layer, v]
                        row[f"{v}_mean"], row[f"{v}_ratio"] = ours, ours / ref if ref > 0 else float("nan")
                        row[f"{v}_rank"] = ranks[v].index(label)
                        lower[v] = ours < ref
                    row["verdict"] = ("reference" if label == reference else
                                      "lower" if all(lower.values()) else
                                      "lower_absolute_only" if lower["absolute"] else
                                      "lower_relative_only" if lower["relative"] else "not_lower")
                    rows.append(row)
        return pa.Table.from_pylist(rows)

    def accuracy_table(self) -> pa.Table:
        return pa.Table.from_pylist([{"model": label, **self.accuracy[label]} for label in self.labels])

    def neurons_table(self) -> pa.Table:
        """Every neuron's row (SENSITIVITY_SCHEMA columns) with its source and model: the plots' input."""
        parts = []
        for source, maps in self.maps.items():
            for label in self.labels:
                table = maps[label].to_arrow().replace_schema_metadata(None)
                parts.append(table.append_column("source", pa.array([source] * len(table)))
                             .append_column("model", pa.array([label] * len(table))))
        return pa.concat_tables(parts)


def check_same_architecture(models: Mapping[str, nn.Module]) -> None:
    """Raise ValueError unless every model has the first one's class and parameter shapes."""
    items = list(models.items())
    first_label, first = items[0]
    shapes = {k: tuple(v.shape) for k, v in first.state_dict().items()}
    for label, model in items[1:]:
        other = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        if type(model) is not type(first) or other != shapes:
            differ = sorted(k for k in set(shapes) | set(other) if shapes.get(k) != other.get(k))[:3]
            raise ValueError(f"compare needs models of one architecture: {label!r} ({type(model).__name__}) "
                             f"differs from {first_label!r} ({type(first).__name__}) in {differ or 'class'}; "
                             "compare checkpoints of the same model")


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> float:
    device = next(model.parameters()).device
    with eval_mode(model):
        correct = sum(int((model(x[s].to(device)).argmax(1) == y[s].to(device)).sum())
                      for s in _chunks(len(x), batch_size))
    return correct / len(x)


def compare_models(models: Mapping[str, nn.Module], x: torch.Tensor, y: torch.Tensor, attack: Attack, *,
                   layers: Sequence[str] | None = None, shared_source: nn.Module | None = None,
                   seed: int = 0, batch_size: int = 256) -> Comparison:
    """Measure each model's neuron sensitivity on the same benign (x, y): against its own adversarial twins
    under `attack` (source "own") and, when `shared_source` is given, against that model's twins (source
    "shared").
    Models must share an architecture; `layers` defaults to the first model's `default_layers`."""
    if not models:
        raise ValueError("compare_models needs at least one model")
    check_same_architecture(models)
    first = next(iter(models.values()))
    layers = list(layers or first.default_layers)
    for model in models.values():
        resolve_layers(model, layers)
    shared_adv = (attack_batches(shared_source, x, y, attack, seed=seed, batch_size=batch_size)
                  if shared_source is not None else None)
    maps: dict[str, dict[str, SensitivityMap]] = {"own": {}}
    if shared_adv is not None:
        maps["shared"] = {}
    accuracy = {}
    for label, model in models.items():
        device = next(model.parameters()).device
        own_adv = attack_batches(model, x, y, attack, seed=seed, batch_size=batch_size)
        sources = {"own": own_adv} if shared_adv is None else {"own": own_adv, "shared": shared_adv}
        accuracy[label] = {"clean": _accuracy(model, x, y, batch_size)}
        for source, x_adv in sources.items():
            pairs = ((x[s].to(device), x_adv[s].to(device)) for s in _chunks(len(x), batch_size))
            maps[source][label] = measure_sensitivity(model, pairs, layers, metadata={"model_label": label,
                                                                                     "source": source})
            accuracy[label][f"adversarial_{source}"] = _accuracy(model, x_adv, y, batch_size)
    return Comparison(list(models), layers, maps, accuracy, attack, len(x))
