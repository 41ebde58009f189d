"""Study and run plots as matplotlib Figures (no pyplot state; Tracker.log_figure saves them as PNG).

    sensitivity_figure(smap, selected)     per layer: every neuron's sensitivity, most sensitive first,
                                           the selected (stabilized) neurons in red
    pareto_figure(rows, objectives, mask)  the completed trials on the first two objectives, front joined
    importance_figure(table)               Optuna parameter importances per objective
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa
from matplotlib.figure import Figure


def sensitivity_figure(smap, selected: Mapping[str, Any] | None = None, title: str = "neuron sensitivity") -> Figure:
    layers = smap.layers
    figure = Figure(figsize=(3.2 * len(layers), 3.0), layout="constrained")
    axes = figure.subplots(1, len(layers), squeeze=False)[0]
    for ax, layer in zip(axes, layers, strict=True):
        sigma = smap.absolute[layer]
        order = sigma.argsort(descending=True)
        chosen = set(selected[layer].cpu().tolist()) if selected and layer in selected else set()
        colors = ["tab:red" if int(i) in chosen else "tab:gray" for i in order]
        ax.bar(range(len(order)), sigma[order].numpy(), color=colors, width=1.0)
        ax.set_title(f"{layer} (mean {float(sigma.mean()):.3g})", fontsize=9)
        ax.set_xlabel("neuron (by rank)", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0].set_ylabel("sensitivity (mean |F(x) - F(x')|)", fontsize=8)
    figure.suptitle(f"{title}; red: selected", fontsize=10)
    return figure


def pareto_figure(rows: Sequence[Mapping[str, Any]], objectives: Sequence[tuple[str, str]],
                  front: Sequence[bool], reference: Mapping[str, Any] | None = None, title: str = "") -> Figure:
    """Completed trials on the first two objectives (one objective: value per trial number), the front joined,
    and the baseline (`reference`) as a star."""
    figure = Figure(figsize=(5.5, 4.2), layout="constrained")
    ax = figure.subplots()
    done = [(row, on) for row, on in zip(rows, front, strict=True) if row.get("status") in ("TERMINATED", "FINISHED")]
    if len(objectives) == 1:
        metric = objectives[0][0]
        ax.scatter([r.get("number", i) for i, (r, _) in enumerate(done, start=1)], [r.get(metric) for r, _ in done],
                   c=["tab:red" if on else "tab:gray" for _, on in done])
        ax.set_xlabel("trial number")
        ax.set_ylabel(metric)
    else:
        (mx, _), (my, _) = objectives[:2]
        ax.scatter([r.get(mx) for r, _ in done], [r.get(my) for r, _ in done], c="tab:gray", label="trials")
        best = sorted((r for r, on in done if on), key=lambda r: r[mx])
        ax.plot([r[mx] for r in best], [r[my] for r in best], "o-", color="tab:red", label="Pareto front")
        for r, _ in done:
            ax.annotate(str(r.get("number", r.get("trial", ""))), (r.get(mx), r.get(my)), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        if reference is not None and reference.get(mx) is not None and reference.get(my) is not None:
            ax.scatter([reference[mx]], [reference[my]], marker="*", s=220, color="black", zorder=4,
                       label="baseline")
        ax.set_xlabel(f"{mx} ({objectives[0][1]})")
        ax.set_ylabel(f"{my} ({objectives[1][1]})")
        ax.legend(fontsize=8)
    if len(objectives) == 1 and reference is not None and reference.get(objectives[0][0]) is not None:
        ax.axhline(reference[objectives[0][0]], color="black", linestyle="--", label="baseline")
        ax.legend(fontsize=8)
    ax.set_title(title or f"{len(done)} completed trials", fontsize=10)
    return figure


def importance_figure(table: pa.Table) -> Figure:
    rows = table.to_pylist()
    objectives = list(dict.fromkeys(r["objective"] for r in rows))
    figure = Figure(figsize=(4.5 * max(len(objectives), 1), 3.0), layout="constrained")
    axes = figure.subplots(1, max(len(objectives), 1), squeeze=False)[0]
    for ax, objective in zip(axes, objectives, strict=False):
        mine = sorted((r for r in rows if r["objective"] == objective), key=lambda r: r["importance"])
        ax.barh([r["param"] for r in mine], [r["importance"] for r in mine], color="tab:blue")
        ax.set_title(f"importance for {objective}", fontsize=9)
        ax.set_xlim(0, 1)
    return figure
