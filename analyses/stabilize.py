"""`analyze stabilize` (claim 2: the sensitive neurons carry the adversarial mistakes) on saved checkpoints.

    models = load_checkpoints(["runs/analysis/.../pgd_at-seed0.pt"])
    text = stabilize_report(models, StabilizeOptions(layers=["relu3"]), writer)

Adversarial test inputs run through each model while k neurons of one layer take their benign values:
the k most sensitive (ranked on a training probe set, never on the scored images) against k random ones,
drawn from all neurons and from the alive ones, several draws each. ns_core.interpret does the patching.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import pandas as pd
import pyarrow as pa
import torch

from analyses.loading import Loaded, check_layers, dataset_of, same_data, subtitle
from analyses.plots import stabilize_figure
from analyses.writer import ReportWriter
from ns_core.interpret import DEFAULT_FRACTIONS, attack_batches, stabilize_curve
from ns_core.sensitivity import measure_sensitivity
from orchestrator.record import tags
from orchestrator.record.tracking import git_commit

log = logging.getLogger(__name__)


@dataclass
class StabilizeOptions:
    layers: list[str] | None = None
    fractions: list[float] = field(default_factory=lambda: list(DEFAULT_FRACTIONS))
    draws: int = 5
    examples: int = 1000
    probe: int = 1000  # training images that rank the neurons (kept apart from the scored test images)
    eps: float | None = None  # None: each checkpoint's training eps (PGD in its training norm)
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
    x, y = data.test.take(options.examples)
    probe_x, probe_y = data.train.take(options.probe)
    all_layers: list[str] = []
    with writer.parent("stabilize", params=params, tags={tags.ANALYSIS: "stabilize",
                                                         tags.GIT_COMMIT: git_commit()}) as report:
        for item in models:
            layers = check_layers(item.model, options.layers)
            all_layers += [layer for layer in layers if layer not in all_layers]
            attack = item.attack(options.eps, options.steps)
            eps = attack.eps
            x_adv = attack_batches(item.model, x, y, attack, seed=options.seed)
            probe_adv = attack_batches(item.model, probe_x, probe_y, attack, seed=options.seed + 1)
            device = next(item.model.parameters()).device
            smap = measure_sensitivity(item.model, [(probe_x.to(device), probe_adv)], layers,
                                       metadata={"model": item.metadata["model"], "attack": attack.label})
            rows = []
            for layer in layers:
                generator = torch.Generator().manual_seed(options.seed)
                rows += stabilize_curve(item.model, x, x_adv, y, layer, options.fractions, smap, options.draws,
                                        generator)
            for row in rows:
                row.update(model=item.label, eps=eps)
            curves += rows
            summary = summarize_curve(rows)
            sub = subtitle(item, attack, len(x), f"neurons ranked on {len(probe_x)} training images; "
                                                 f"{options.draws} random draws")
            with writer.child(report, item.label, params={"checkpoint": str(item.path), "eps": eps}) as run:
                writer.table(run, pa.Table.from_pylist(rows), "stabilize/curve.parquet")
                writer.table(run, pa.Table.from_pandas(summary, preserve_index=False), "stabilize/summary.parquet")
                writer.table(run, smap.to_arrow(), "sensitivity/probe.parquet")
                writer.figure(run, stabilize_figure(summary.to_dict("records"), [item.label], layers, sub),
                              "plots/stabilize.png")
                writer.metrics(run, {"clean_accuracy": rows[0]["clean_accuracy"],
                                     "adversarial_accuracy": rows[0]["adversarial_accuracy"]})
        summary = summarize_curve(curves)
        claims = claim2_table(summary)
        writer.table(report, pa.Table.from_pylist(curves), "stabilize/curve.parquet")
        writer.table(report, pa.Table.from_pandas(summary, preserve_index=False), "stabilize/summary.parquet")
        writer.table(report, pa.Table.from_pandas(claims, preserve_index=False), "stabilize/claim2.parquet")
        eps_note = ", ".join(sorted({f"{r['eps']:g}" for r in curves}))
        sub = subtitle(models[0], models[0].attack(options.eps, options.steps), len(x),
                       f"eps per model {eps_note}; {options.draws} random draws")
        writer.figure(report, stabilize_figure(summary.to_dict("records"), [m.label for m in models], all_layers,
                                               sub), "plots/stabilize.png")
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
