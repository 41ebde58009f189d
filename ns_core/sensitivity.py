"""Neuron sensitivity: how much each neuron's activation moves between x and its adversarial twin x'.

    sigma_l^m = (1/N) sum_i (1/dim F_l^m(x_i)) * || F_l^m(x_i) - F_l^m(x'_i) ||_1

A neuron is one channel of a conv output (an H x W map) or one unit of a linear output (a scalar).
The relative variant divides by the neuron's benign mean |activation|: sigma_rel = sigma / mean_i
(1/dim)||F(x_i)||_1. Dividing each term instead (per example) explodes on ReLU neurons that are
silent on one benign input and fire on its twin, so we divide the means; a neuron silent on every
benign input is divided by a floor of 1e-3 x its layer's mean activation instead of by zero.

`measure_sensitivity` streams over (x, x_adv) batches and keeps two float64 accumulators per neuron
(|change|, benign magnitude): memory is O(neurons), never O(N). Each batch costs a forward pass of
x and one of x_adv in eval mode, with activations read by scoped forward hooks and reduced per map
in float32, over the batch in float64 (no float64 copies of the activations). Two forwards, not one
of the concatenation: on CPU a doubled batch falls out of cache and costs 1.2-1.6x (see bench/).
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import pyarrow as pa
import torch
from torch import nn

from ns_core.utils import eval_mode

SENSITIVITY_SCHEMA = pa.schema(
    [
        ("layer", pa.string()),
        ("layer_index", pa.int32()),
        ("neuron", pa.int32()),
        ("sensitivity", pa.float64()),
        ("relative_sensitivity", pa.float64()),
        ("benign_activation", pa.float64()),
        ("rank", pa.int32()),
        ("selected", pa.bool_()),
    ]
)
RELATIVE_FLOOR = 1e-3  # x the layer's mean benign activation, for neurons silent on all inputs


def resolve_layers(model: nn.Module, layers: Iterable[str]) -> dict[str, nn.Module]:
    """Map layer names to modules; an unknown name is a one-line ValueError with the closest valid name and
    all of them. (`ns_core.models.studied_layers` chooses the layers and checks they run once per forward.)"""
    modules = dict(model.named_modules())
    resolved = {}
    for name in layers:
        if name not in modules or name == "":
            valid = [n for n in modules if n]
            close = difflib.get_close_matches(str(name), valid, n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown layer {name!r}{hint}; layers of this model are: {', '.join(valid)}")
        resolved[name] = modules[name]
    if not resolved:
        raise ValueError("no layers given; pass module names from model.named_modules()")
    return resolved


class ForwardHooks:
    """Forward hooks on named layers, registered on `with` entry and removed on exit (STYLE #6).

    Subclasses define `_hook(name)`, which returns the hook for one layer.
    """

    def __init__(self, model: nn.Module, layers: Iterable[str]) -> None:
        self.modules = resolve_layers(model, layers)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _hook(self, name: str):
        raise NotImplementedError

    def __enter__(self):
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


class ActivationCapture(ForwardHooks):
    """Scoped forward hooks that keep the latest output of each named layer.

    With `channels` set (layer -> LongTensor of neuron indices), a hook keeps only those neurons
    (`index_select` on dim 1), so training holds just what the SNS regularizer needs. Outputs are
    kept with their autograd graph: a loss built on them trains the model.

        with ActivationCapture(model, ["relu1", "relu3"]) as capture:
            model(x)
            acts = capture.pop()   # {"relu1": (B, C, H, W), "relu3": (B, N)}
    """

    def __init__(
        self, model: nn.Module, layers: Iterable[str], channels: Mapping[str, torch.Tensor] | None = None
    ) -> None:
        super().__init__(model, layers)
        self.channels = dict(channels or {})
        self.outputs: dict[str, torch.Tensor] = {}

    def _hook(self, name: str):
        def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
            if not isinstance(output, torch.Tensor) or output.dim() < 2:
                raise TypeError(f"layer {name!r} must output a (batch, neurons, ...) tensor")
            index = self.channels.get(name)
            self.outputs[name] = output if index is None else output.index_select(1, index)

        return hook

    def pop(self) -> dict[str, torch.Tensor]:
        """The outputs captured since the last pop, and forget them."""
        outputs, self.outputs = self.outputs, {}
        return outputs

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        self.outputs.clear()


def neuron_sums(benign: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
    """(B, C, ...) twice -> (2, C) float64: per neuron, the batch sums of each neuron's mean |benign - adv|
    over its map and of its mean |benign|. Each map is summed in float32 (contiguous, fast), the batch
    in float64: no float64 copy of the activations (that copy cost more than the forward pass)."""
    b, c = benign.shape[:2]
    per_map = math.prod(benign.shape[2:])  # 1 for scalar neurons
    diff = (benign - adv).abs_().reshape(b, c, -1).sum(2).sum(0, dtype=torch.float64)  # (C,)
    magnitude = benign.abs().reshape(b, c, -1).sum(2).sum(0, dtype=torch.float64)  # (C,)
    return torch.stack([diff, magnitude]).div_(per_map)


@dataclass
class SensitivityMap:
    """Per-layer neuron sensitivities (float64 CPU tensors), in the order the layers were given."""

    absolute: dict[str, torch.Tensor]
    relative: dict[str, torch.Tensor]
    benign_activation: dict[str, torch.Tensor]
    num_pairs: int
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def layers(self) -> list[str]:
        return list(self.absolute)

    def values(self, relative: bool = False) -> dict[str, torch.Tensor]:
        return self.relative if relative else self.absolute

    def top(self, fraction: float, relative: bool = False) -> dict[str, torch.Tensor]:
        """Per layer, indices of the top `fraction` most sensitive neurons (at least one), most first."""
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        selected = {}
        for layer, sigma in self.values(relative).items():
            k = max(1, math.ceil(fraction * sigma.numel()))
            selected[layer] = torch.argsort(sigma, descending=True, stable=True)[:k]
        return selected

    def alive(self, threshold: float = 0.0) -> dict[str, torch.Tensor]:
        """Per layer, a bool mask of neurons whose mean benign |activation| exceeds `threshold`."""
        return {layer: act > threshold for layer, act in self.benign_activation.items()}

    def layer_means(self, relative: bool = False) -> dict[str, float]:
        return {layer: float(s.mean()) for layer, s in self.values(relative).items()}

    def mean(self, relative: bool = False, selected: Mapping[str, torch.Tensor] | None = None) -> float:
        """Mean sensitivity over all neurons of all layers, or over the `selected` neurons only."""
        values = self.values(relative)
        if selected is None:
            parts = list(values.values())
        else:
            parts = [values[layer][index.cpu()] for layer, index in selected.items()]
        return float(torch.cat(parts).mean()) if parts else float("nan")

    def to_arrow(self, selected: Mapping[str, torch.Tensor] | None = None) -> pa.Table:
        """One row per neuron (schema SENSITIVITY_SCHEMA); `selected` marks the chosen neurons."""
        columns: dict[str, list] = {name: [] for name in SENSITIVITY_SCHEMA.names}
        for layer_index, (layer, sigma) in enumerate(self.absolute.items()):
            n = sigma.numel()
            rank = torch.empty(n, dtype=torch.long)
            rank[torch.argsort(sigma, descending=True, stable=True)] = torch.arange(n)
            chosen = torch.zeros(n, dtype=torch.bool)
            if selected is not None and layer in selected:
                chosen[selected[layer].cpu()] = True
            columns["layer"] += [layer] * n
            columns["layer_index"] += [layer_index] * n
            columns["neuron"] += list(range(n))
            columns["sensitivity"] += sigma.tolist()
            columns["relative_sensitivity"] += self.relative[layer].tolist()
            columns["benign_activation"] += self.benign_activation[layer].tolist()
            columns["rank"] += rank.tolist()
            columns["selected"] += chosen.tolist()
        metadata = {**self.metadata, "num_pairs": str(self.num_pairs)}
        schema = SENSITIVITY_SCHEMA.with_metadata({k: str(v) for k, v in metadata.items()})
        return pa.Table.from_pydict(columns, schema=schema)

    @classmethod
    def from_arrow(cls, table: pa.Table) -> SensitivityMap:
        """Rebuild a map from `to_arrow`'s table (e.g. a Parquet artifact)."""
        meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
        rows = table.sort_by([("layer_index", "ascending"), ("neuron", "ascending")]).to_pydict()
        absolute: dict[str, list[float]] = {}
        relative: dict[str, list[float]] = {}
        benign: dict[str, list[float]] = {}
        for i, layer in enumerate(rows["layer"]):
            absolute.setdefault(layer, []).append(rows["sensitivity"][i])
            relative.setdefault(layer, []).append(rows["relative_sensitivity"][i])
            benign.setdefault(layer, []).append(rows["benign_activation"][i])
        as_tensors = lambda d: {k: torch.tensor(v, dtype=torch.float64) for k, v in d.items()}  # noqa: E731
        num_pairs = int(meta.pop("num_pairs", "0"))
        return cls(as_tensors(absolute), as_tensors(relative), as_tensors(benign), num_pairs, meta)

    def summary(self, k: int = 5) -> str:
        """A short text table: per layer, mean sensitivity and the k most sensitive neurons."""
        lines = [f"{'layer':<16}{'neurons':>8}{'mean sigma':>12}{'mean rel':>10}  top-{k} neurons (sigma)"]
        for layer, sigma in self.absolute.items():
            order = torch.argsort(sigma, descending=True, stable=True)[:k].tolist()
            top = ", ".join(f"{i} ({sigma[i]:.3f})" for i in order)
            lines.append(f"{layer:<16}{sigma.numel():>8}{sigma.mean():>12.4f}"
                         f"{self.relative[layer].mean():>10.3f}  {top}")
        return "\n".join(lines)


def relative_sensitivity(sigma: torch.Tensor, benign: torch.Tensor) -> torch.Tensor:
    """sigma / benign mean |activation|, floored per layer (see the module docstring)."""
    floor = max(RELATIVE_FLOOR * float(benign.mean()), 1e-12)
    return sigma / benign.clamp_min(floor)


@torch.no_grad()
def measure_sensitivity(
    model: nn.Module,
    pairs: Iterable[tuple[torch.Tensor, torch.Tensor]],
    layers: Iterable[str],
    metadata: Mapping[str, object] | None = None,
) -> SensitivityMap:
    """Stream `(x, x_adv)` batches through `model` and return each neuron's sensitivity.

    The model runs in eval mode (restored afterwards); x and x_adv must be on the model's device.
    """
    layer_names = list(layers)
    sums: dict[str, list[torch.Tensor]] = {}
    num_pairs = 0
    with eval_mode(model), ActivationCapture(model, layer_names) as capture:
        for x, x_adv in pairs:
            if x.shape != x_adv.shape:
                raise ValueError(f"x and x_adv differ in shape: {tuple(x.shape)} vs {tuple(x_adv.shape)}")
            model(x)
            benign = capture.pop()                                           # {layer: (B, C, ...)}
            model(x_adv)
            for name, adv in capture.pop().items():
                batch_sums = neuron_sums(benign[name], adv)                  # (2, C) float64
                if name in sums:
                    sums[name] += batch_sums
                else:
                    sums[name] = batch_sums
            num_pairs += x.shape[0]
    if num_pairs == 0:
        raise ValueError("measure_sensitivity got no pairs; pass at least one (x, x_adv) batch")
    means = {name: (s / num_pairs).cpu() for name, s in sums.items()}
    return SensitivityMap(
        absolute={n: m[0] for n, m in means.items()},
        relative={n: relative_sensitivity(m[0], m[1]) for n, m in means.items()},
        benign_activation={n: m[1] for n, m in means.items()},
        num_pairs=num_pairs,
        metadata={k: json.dumps(v) if not isinstance(v, str) else v for k, v in (metadata or {}).items()},
    )

