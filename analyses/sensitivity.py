"""`analyze sensitivity`: the paper's interpretation of one trained model, whoever trained it.

    item = load_external("torchvision.models:resnet18", "weights.pt", "cifar10")   # or load_checkpoints([...])[0]
    text = sensitivity_report(item, SensitivityOptions(eps=8 / 255), writer)

For the model's layers (given, the model's own, or proposed by nslab), on the first test images: each neuron's
sensitivity to the model's own PGD twins (absolute and relative; ns_core.sensitivity), the most sensitive
neurons per layer, and the cascaded robust accuracy of the suite with the gradient-masking checks
(ns_core.evaluation). Everything goes to one MLflow run and/or --out: sensitivity/test.parquet,
sensitivity/top_neurons.parquet, eval/robust_accuracy.parquet, eval/checks.parquet and the per-layer plot.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import pyarrow as pa

from analyses.loading import Loaded, check_layers, dataset_of, subtitle
from analyses.writer import ReportWriter
from ns_core.attacks import Attack
from ns_core.evaluation import evaluate_robustness
from ns_core.interpret import attack_batches
from ns_core.sensitivity import measure_sensitivity
from orchestrator.record import tags
from orchestrator.record.figures import sensitivity_figure
from orchestrator.record.tracking import git_commit

log = logging.getLogger(__name__)
TOP_SCHEMA = pa.schema([("layer", pa.string()), ("rank", pa.int32()), ("neuron", pa.int32()),
                        ("sensitivity", pa.float64()), ("relative_sensitivity", pa.float64())])


@dataclass
class SensitivityOptions:
    eps: float | None = None  # None: the checkpoint's training eps (an external model must name it)
    steps: int = 10  # PGD steps of the sensitivity pairs
    examples: int = 1000
    layers: list[str] | None = None
    attacks: list[Attack] = field(default_factory=list)  # empty: FGSM, PGD-20 and APGD-CE at eps, cascaded
    top: int = 10  # most sensitive neurons listed per layer
    seed: int = 0
    data_root: str | None = None


def suite(options: SensitivityOptions, eps: float, norm: str) -> list[Attack]:
    if options.attacks:
        return options.attacks
    fgsm = [Attack("fgsm", eps)] if norm == "linf" else []
    return [*fgsm, Attack("pgd", eps, norm=norm, steps=20), Attack("apgd_ce", eps, norm=norm)]


def top_neurons(smap, k: int) -> pa.Table:
    """Per layer, the k most sensitive neurons, most first, with their absolute and relative sensitivity."""
    rows = []
    for layer, sigma in smap.absolute.items():
        relative = smap.values(relative=True)[layer]
        for rank, neuron in enumerate(sigma.argsort(descending=True)[:k].tolist()):
            rows.append({"layer": layer, "rank": rank, "neuron": neuron, "sensitivity": float(sigma[neuron]),
                         "relative_sensitivity": float(relative[neuron])})
    return pa.Table.from_pylist(rows, schema=TOP_SCHEMA)


def sensitivity_report(item: Loaded, options: SensitivityOptions, writer: ReportWriter) -> str:
    """Measure, evaluate and record one model; returns the terminal text."""
    layers = check_layers(item.model, options.layers)
    attack = item.attack(options.eps, options.steps)
    data = dataset_of(item, options.data_root)
    x, y = data.test.take(options.examples)
    device = next(item.model.parameters()).device
    x, y = x.to(device), y.to(device)
    x_adv = attack_batches(item.model, x, y, attack, seed=options.seed)
    smap = measure_sensitivity(item.model, [(x, x_adv)], layers, metadata={
        "model": item.metadata.get("model", ""), "dataset": item.metadata.get("dataset", ""), "attack": attack.name,
        "norm": attack.norm, "eps": attack.eps, "steps": attack.steps_used})
    report = evaluate_robustness(item.model, (x, y), suite(options, attack.eps, attack.norm), seed=options.seed,
                                 num_classes=data.num_classes)
    top = top_neurons(smap, options.top)
    params = {"source": str(item.path), "model": item.metadata.get("model"), "dataset": item.metadata.get("dataset"),
              "layers": layers, "sensitivity_attack": attack.label, "examples": len(y), "seed": options.seed}
    with writer.parent(f"sensitivity-{item.label}", params=params,
                       tags={tags.ANALYSIS: "sensitivity", tags.GIT_COMMIT: git_commit()}) as run:
        writer.table(run, smap.to_arrow(), "sensitivity/test.parquet")
        writer.table(run, top, "sensitivity/top_neurons.parquet")
        writer.table(run, report.to_arrow(), "eval/robust_accuracy.parquet")
        writer.table(run, report.checks_arrow(), "eval/checks.parquet")
        title = f"neuron sensitivity: {subtitle(item, attack, len(y))}"
        writer.figure(run, sensitivity_figure(smap, None, title=title), "plots/sensitivity_per_layer.png")
        writer.metrics(run, {**report.metrics(), **{f"sensitivity.{k}": v for k, v in smap.layer_means().items()},
                             **{f"relative_sensitivity.{k}": v for k, v in smap.layer_means(relative=True).items()}})
        writer.tags(run, {tags.EVAL_FLAGS: ",".join(report.flags) or "none"})
    return "\n".join([f"{item.label}: {subtitle(item, attack, len(y))}; model {item.built}", "",
                      f"most sensitive neurons per layer ({attack.label} pairs):", smap.summary(min(options.top, 5)),
                      "", "robust accuracy (cascaded) and gradient-masking checks:", report.summary()])
