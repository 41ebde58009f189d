"""`analyze compare` (claim 1: adversarial training lowers neuron sensitivity) on saved checkpoints.

    models = load_checkpoints(["runs/analysis/.../standard-seed0.pt", ".../pgd_at-seed0.pt"])
    text = compare_report(models, CompareOptions(eps=0.2), writer)

Every model is measured on the same benign test images, each against its own PGD (and, with a shared
source, all against one model's PGD), per layer, in the absolute and the relative variant. The science
lives in ns_core.interpret; this module tabulates, plots and logs through a ReportWriter.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pyarrow as pa

from analyses.loading import Loaded, check_layers, dataset_of, same_data, subtitle
from analyses.plots import compare_distribution_figure, compare_means_figure
from analyses.writer import ReportWriter
from ns_core.interpret import compare_models
from orchestrator.record import tags
from orchestrator.record.tracking import git_commit

log = logging.getLogger(__name__)


@dataclass
class CompareOptions:
    eps: float | None = None  # None: the first checkpoint's training eps (PGD in its training norm)
    steps: int = 10
    examples: int = 1000
    layers: list[str] | None = None
    seed: int = 0
    data_root: str | None = None
    reference: str | None = None  # the model the verdict compares against; None: the first


def compare_report(models: list[Loaded], options: CompareOptions, writer: ReportWriter,
                   shared_source: Loaded | None = None) -> str:
    """Claim 1: sensitivity per layer of every model on the same inputs; returns the terminal text."""
    same_data(models + ([shared_source] if shared_source else []))
    layers = check_layers(models[0].model, options.layers)
    attack = models[0].attack(options.eps, options.steps)
    data = dataset_of(models[0], options.data_root)
    x, y = data.test.take(options.examples)
    comparison = compare_models({m.label: m.model for m in models}, x, y, attack, layers=layers,
                                shared_source=shared_source.model if shared_source else None, seed=options.seed)
    stats, verdict = comparison.stats_table(), comparison.verdict_table(options.reference)
    neurons = comparison.neurons_table()
    sub = subtitle(models[0], attack, len(x))
    params = {"checkpoints": [str(m.path) for m in models], "labels": [m.label for m in models],
              "attack": attack.label, "examples": len(x), "layers": layers, "seed": options.seed,
              "shared_source": str(shared_source.path) if shared_source else None}
    with writer.parent("compare", params=params, tags={tags.ANALYSIS: "compare",
                                                       tags.GIT_COMMIT: git_commit()}) as report:
        for item in models:
            with writer.child(report, item.label, params={"checkpoint": str(item.path),
                                                          "method": item.metadata.get("method")}) as run:
                for source, maps in comparison.maps.items():
                    smap = maps[item.label]
                    writer.table(run, smap.to_arrow(), f"sensitivity/{source}.parquet")
                    writer.metrics(run, {**{f"{source}.sensitivity.{k}": v for k, v in smap.layer_means().items()},
                                         **{f"{source}.relative_sensitivity.{k}": v
                                            for k, v in smap.layer_means(relative=True).items()}})
                writer.metrics(run, comparison.accuracy[item.label])
        for path, table in (("compare/layer_stats.parquet", stats), ("compare/verdict.parquet", verdict),
                            ("compare/accuracy.parquet", comparison.accuracy_table()),
                            ("compare/neurons.parquet", neurons)):
            writer.table(report, table, path)
        labels, rows = [m.label for m in models], neurons.to_pylist()
        for source in comparison.maps:
            text = sub if source == "own" else f"{sub}, crafted on {shared_source.path.name}"
            writer.figure(report, compare_distribution_figure(rows, labels, layers, source, text),
                          f"plots/sensitivity_distribution_{source}.png")
        means_subtitle = f"{sub}; dashed: all attacked by {shared_source.path.name}" if shared_source else sub
        writer.figure(report, compare_means_figure(stats.to_pylist(), comparison.accuracy, labels, layers,
                                                   means_subtitle), "plots/sensitivity_means.png")
    return format_verdict(verdict, comparison.accuracy, attack.label)


def format_verdict(verdict: pa.Table, accuracy: dict[str, dict[str, float]], attack: str) -> str:
    df = verdict.to_pandas()
    lines = [f"accuracy (clean / own {attack}"
             f"{' / shared source' if any('adversarial_shared' in a for a in accuracy.values()) else ''}):"]
    for label, acc in accuracy.items():
        shared = f" / {100 * acc['adversarial_shared']:.1f}%" if "adversarial_shared" in acc else ""
        lines.append(f"  {label:<14}{100 * acc['clean']:.1f}% / {100 * acc['adversarial_own']:.1f}%{shared}")
    for source, part in df.groupby("source", sort=False):
        reference = part["reference"].iloc[0]
        others = part[part["model"] != reference]
        layers = list(dict.fromkeys(part["layer"]))
        lines.append(f"\nmean sensitivity / {reference}'s, per layer ({source} PGD pairs; < 1: lower than {reference})")
        for variant in ("absolute", "relative"):
            wide = others.pivot(index="model", columns="layer", values=f"{variant}_ratio")
            wide = wide.loc[list(dict.fromkeys(others["model"])), layers]
            wide.index = [f"{variant:<9}{m}" for m in wide.index]
            lines.append(wide.to_string(float_format=lambda v: f"{v:.2f}", index_names=False))
        for model, rows in others.groupby("model", sort=False):
            per_layer = rows[rows["layer"] != "(all)"]
            low_abs = [r.layer for r in per_layer.itertuples() if r.absolute_ratio < 1]
            low_rel = [r.layer for r in per_layer.itertuples() if r.relative_ratio < 1]
            lines.append(f"  {model}: lower absolute in {len(low_abs)}/{len(per_layer)} layers "
                         f"({', '.join(low_abs) or '-'}), lower relative in {len(low_rel)}/{len(per_layer)} "
                         f"({', '.join(low_rel) or '-'})")
    return "\n".join(lines)
