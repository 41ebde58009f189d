"""`analyze compare` (claim 1) and `analyze stabilize` (claim 2) on saved checkpoints, as reports.

    models = load_checkpoints(["runs/analysis/.../standard-seed0.pt", ".../pgd_at-seed0.pt"])
    text = compare_report(models, CompareOptions(eps=0.2), writer)

Both read the checkpoints' own metadata (model, dataset, training eps) and draw the benign inputs
from the test split of that dataset. The science lives in ns_core.interpret; this module loads,
tabulates, plots and logs through a ReportWriter (MLflow parent + one child per model, and --out).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow as pa
import torch
from torch import nn

from ns_core.data import DatasetSplits, load_dataset
from ns_core.experiment import load_model
from ns_core.interpret import DEFAULT_FRACTIONS, attack_batches, compare_models, stabilize_curve
from ns_core.sensitivity import measure_sensitivity, resolve_layers
from ns_core.training import first_examples
from orchestrator.analysis_report import ReportWriter
from orchestrator.report_plots import compare_distribution_figure, compare_means_figure, stabilize_figure
from orchestrator.tracking import git_commit

log = logging.getLogger(__name__)


@dataclass
class Loaded:
    label: str
    path: Path
    model: nn.Module
    metadata: dict

    @property
    def train_eps(self) -> float | None:
        spec = self.metadata.get("spec", {})
        return spec.get("method_params", {}).get("eps") or spec.get("train", {}).get("val_eps")


def load_checkpoints(paths: Sequence[str | Path], labels: Sequence[str] | None = None,
                     device: str = "auto") -> list[Loaded]:
    """Load nslab checkpoints; labels default to the training method (plus the seed when methods repeat)."""
    if labels is not None and len(labels) != len(paths):
        raise ValueError(f"--labels needs one label per checkpoint: {len(paths)} checkpoints, {len(labels)} labels")
    loaded = []
    for path in paths:
        path = Path(path).expanduser().resolve()
        if not path.is_file():
            raise ValueError(f"checkpoint {path} does not exist; pass .pt files that `analyze methods` or "
                             "`python -m pipelines.train` saved")
        model, meta = load_model(path, device)
        loaded.append(Loaded("", path, model, meta))
    methods = [m.metadata.get("method", m.path.stem) for m in loaded]
    for i, item in enumerate(loaded):
        seed = item.metadata.get("spec", {}).get("train", {}).get("seed")
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
    spec = item.metadata.get("spec", {})
    return load_dataset(item.metadata["dataset"], root=data_root or spec.get("data_root"), download=False)


def check_layers(model: nn.Module, layers: Sequence[str] | None) -> list[str]:
    """The layers to analyze (default: the model's default_layers); unknown names raise listing the valid."""
    layers = list(layers or model.default_layers)
    resolve_layers(model, layers)
    return layers


@dataclass
class CompareOptions:
    eps: float | None = None  # None: the first checkpoint's training eps
    steps: int = 10
    examples: int = 1000
    layers: list[str] | None = None
    seed: int = 0
    data_root: str | None = None
    reference: str | None = None  # the model the verdict compares against; None: the first


def _subtitle(item: Loaded, attack: str, n: int) -> str:
    return f"{item.metadata['dataset']} test split ({n} images) / {item.metadata['model']}; {attack}"


def compare_report(models: list[Loaded], options: CompareOptions, writer: ReportWriter,
                   shared_source: Loaded | None = None) -> str:
    """Claim 1: sensitivity per layer of every model on the same inputs; returns the terminal text."""
    same_data(models + ([shared_source] if shared_source else []))
    layers = check_layers(models[0].model, options.layers)
    eps = options.eps if options.eps is not None else models[0].train_eps
    if eps is None:
        raise ValueError("no --eps given and the first checkpoint names no training eps; pass --eps")
    data = dataset_of(models[0], options.data_root)
    x, y = first_examples(data.test, options.examples)
    comparison = compare_models({m.label: m.model for m in models}, x, y, eps=eps, steps=options.steps,
                                layers=layers, shared_source=shared_source.model if shared_source else None,
                                seed=options.seed)
    stats, verdict = comparison.stats_table(), comparison.verdict_table(options.reference)
    neurons = comparison.neurons_table()
    attack = f"PGD-{options.steps} Linf eps {eps:g}"
    subtitle = _subtitle(models[0], attack, len(x))
    params = {"checkpoints": [str(m.path) for m in models], "labels": [m.label for m in models], "eps": eps,
              "steps": options.steps, "examples": len(x), "layers": layers, "seed": options.seed,
              "shared_source": str(shared_source.path) if shared_source else None}
    with writer.parent("compare", params=params, tags={"nslab.analysis": "compare",
                                                       "nslab.git_commit": git_commit()}) as report:
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
            sub = subtitle if source == "own" else f"{subtitle}, crafted on {shared_source.path.name}"
            writer.figure(report, compare_distribution_figure(rows, labels, layers, source, sub),
                          f"plots/sensitivity_distribution_{source}.png")
        means_subtitle = f"{subtitle}; dashed: all attacked by {shared_source.path.name}" if shared_source else subtitle
        writer.figure(report, compare_means_figure(stats.to_pylist(), comparison.accuracy, labels, layers,
                                                   means_subtitle), "plots/sensitivity_means.png")
    return format_verdict(verdict, comparison.accuracy, attack)


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


@dataclass
class StabilizeOptions:
    layers: list[str] | None = None
    fractions: list[float] = field(default_factory=lambda: list(DEFAULT_FRACTIONS))
    draws: int = 5
    examples: int = 1000
    probe: int = 1000  # training images that rank the neurons (kept apart from the scored test images)
    eps: float | None = None
    steps: int = 10
    seed: int = 0
    data_root: str | None = None


def summarize_curve(rows: list[dict]) -> pd.DataFrame:
    """Per (model, layer, selection, fraction, k): accuracy mean/std/min/max over draws, recovered share."""
    df = pd.DataFrame(rows)
    keys = ["model", "layer", "neurons", "alive", "selection", "fraction", "k"]
    out = df.groupby(keys, sort=False).agg(
        accuracy_mean=("accuracy", "mean"), accuracy_std=("accuracy", "std"), accuracy_min=("accuracy", "min"),
        accuracy_max=("accuracy", "max"), recovered_mean=("recovered", "mean"), draws=("draw", "count"),
        patched_sensitivity=("patched_sensitivity", "mean"), clean_accuracy=("clean_accuracy", "first"),
        adversarial_accuracy=("adversarial_accuracy", "first")).reset_index()
    return out


def claim2_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Per (model, layer, fraction): sensitive vs the random baselines, and whether top-k beat every draw."""
    wide = summary.pivot_table(index=["model", "layer", "fraction", "k"], columns="selection",
                               values=["accuracy_mean", "accuracy_std", "accuracy_max"], sort=False)
    out = pd.DataFrame(index=wide.index)
    out["sensitive"] = wide["accuracy_mean"]["sensitive"]
    for base in ("random_all", "random_alive"):
        if base in wide["accuracy_mean"]:
            out[f"{base}_mean"] = wide["accuracy_mean"][base]
            out[f"{base}_std"] = wide["accuracy_std"][base]
            out[f"sensitive_minus_{base}"] = out["sensitive"] - out[f"{base}_mean"]
            out[f"beats_every_{base}_draw"] = out["sensitive"] > wide["accuracy_max"][base]
    return out.reset_index()


def stabilize_report(models: list[Loaded], options: StabilizeOptions, writer: ReportWriter) -> str:
    """Claim 2: accuracy recovered by patching the top-k sensitive vs k random neurons, per layer."""
    same_data(models)
    curves = []
    params = {"checkpoints": [str(m.path) for m in models], "labels": [m.label for m in models],
              "fractions": options.fractions, "draws": options.draws, "examples": options.examples,
              "probe": options.probe, "steps": options.steps, "seed": options.seed}
    data = dataset_of(models[0], options.data_root)
    x, y = first_examples(data.test, options.examples)
    probe_x, probe_y = first_examples(data.train, options.probe)
    all_layers: list[str] = []
    with writer.parent("stabilize", params=params, tags={"nslab.analysis": "stabilize",
                                                         "nslab.git_commit": git_commit()}) as report:
        for item in models:
            layers = check_layers(item.model, options.layers)
            all_layers += [layer for layer in layers if layer not in all_layers]
            eps = options.eps if options.eps is not None else item.train_eps
            if eps is None:
                raise ValueError(f"no --eps given and {item.path.name} names no training eps; pass --eps")
            attack = {"eps": eps, "steps": options.steps}
            x_adv = attack_batches(item.model, x, y, seed=options.seed, **attack)
            probe_adv = attack_batches(item.model, probe_x, probe_y, seed=options.seed + 1, **attack)
            device = next(item.model.parameters()).device
            smap = measure_sensitivity(item.model, [(probe_x.to(device), probe_adv)], layers,
                                       metadata={"model": item.metadata["model"], "attack": "pgd", "eps": eps})
            rows = []
            for layer in layers:
                generator = torch.Generator().manual_seed(options.seed)
                rows += stabilize_curve(item.model, x, x_adv, y, layer, options.fractions, smap, options.draws,
                                        generator)
            for row in rows:
                row.update(model=item.label, eps=eps)
            curves += rows
            summary = summarize_curve(rows)
            subtitle = _subtitle(item, f"PGD-{options.steps} Linf eps {eps:g}; neurons ranked on {len(probe_x)} "
                                       f"training images; {options.draws} random draws", len(x))
            with writer.child(report, item.label, params={"checkpoint": str(item.path), "eps": eps}) as run:
                writer.table(run, pa.Table.from_pylist(rows), "stabilize/curve.parquet")
                writer.table(run, pa.Table.from_pandas(summary, preserve_index=False), "stabilize/summary.parquet")
                writer.table(run, smap.to_arrow(), "sensitivity/probe.parquet")
                writer.figure(run, stabilize_figure(summary.to_dict("records"), [item.label], layers, subtitle),
                              "plots/stabilize.png")
                writer.metrics(run, {"clean_accuracy": rows[0]["clean_accuracy"],
                                     "adversarial_accuracy": rows[0]["adversarial_accuracy"]})
        summary = summarize_curve(curves)
        claims = claim2_table(summary)
        writer.table(report, pa.Table.from_pylist(curves), "stabilize/curve.parquet")
        writer.table(report, pa.Table.from_pandas(summary, preserve_index=False), "stabilize/summary.parquet")
        writer.table(report, pa.Table.from_pandas(claims, preserve_index=False), "stabilize/claim2.parquet")
        eps_note = ", ".join(sorted({f"{r['eps']:g}" for r in curves}))
        subtitle = _subtitle(models[0], f"PGD-{options.steps} Linf eps {eps_note}; {options.draws} random draws",
                             len(x))
        writer.figure(report, stabilize_figure(summary.to_dict("records"), [m.label for m in models], all_layers,
                                               subtitle), "plots/stabilize.png")
    return format_claim2(claims)


def format_claim2(claims: pd.DataFrame) -> str:
    df = claims.copy()
    pct = lambda v: f"{100 * v:5.1f}"  # noqa: E731
    df["frac"] = df["fraction"].map(lambda f: f"{100 * f:g}%")
    df["top-k"] = df["sensitive"].map(pct)
    for base in ("random_all", "random_alive"):
        if f"{base}_mean" in df:
            df[base] = [f"{pct(m)} ± {100 * (0 if pd.isna(s) else s):4.1f}"
                        for m, s in zip(df[f"{base}_mean"], df[f"{base}_std"], strict=True)]
            df[f"beats {base}"] = df[f"beats_every_{base}_draw"].map({True: "yes", False: "no"})
    columns = [c for c in ("model", "layer", "frac", "k", "top-k", "random_all", "random_alive",
                           "beats random_all", "beats random_alive") if c in df]
    return ("accuracy (%) on adversarial inputs with k neurons patched; 'beats' = top-k above every random draw\n"
            + df[columns].to_string(index=False))
