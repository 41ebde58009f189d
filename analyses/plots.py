"""The analysis reports' figures: matplotlib `Figure` objects (Agg, no pyplot state), one per function.
(The study's own plots, the Pareto front among them, are in orchestrator/record/figures.py.)

Every figure says what it compares in its title, names dataset / model / attack in a second title
line, labels its axes with units, and has a legend. Accuracies are drawn in percent.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from orchestrator.results import Status  # noqa: E402

SELECTION_STYLE = {  # stabilize curves
    "sensitive": {"color": "tab:red", "label": "top-k most sensitive neurons", "marker": "o"},
    "random_all": {"color": "tab:gray", "label": "k random neurons (all), mean ± std", "marker": "s"},
    "random_alive": {"color": "tab:blue", "label": "k random alive neurons, mean ± std", "marker": "^"},
}
ABS_LABEL = "σ = mean |F(x) − F(x′)| (activation units)"
REL_LABEL = "relative σ = σ / mean |F(x)| (ratio)"


def colors(labels: Sequence[str]) -> dict[str, str]:
    palette = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink",
               "tab:olive", "tab:cyan", "tab:gray"]
    return {label: palette[i % len(palette)] for i, label in enumerate(labels)}


def _title(fig: Figure, title: str, subtitle: str) -> None:
    fig.suptitle(f"{title}\n{subtitle}", fontsize=11)


def _nan(v: float) -> float:
    return 0.0 if v is None or (isinstance(v, float) and math.isnan(v)) else v


def methods_figure(per_seed: list[dict], summary: list[dict], paired: list[dict], labels: list[str],
                   subtitle: str) -> Figure:
    """Accuracy bars (mean ± std across seeds, seeds as dots), paired per-seed differences, and the
    final models' mean sensitivity (absolute and relative) beside them."""
    fig = Figure(figsize=(17, 4.8), layout="constrained")
    ax_acc, ax_pair, ax_abs, ax_rel = fig.subplots(1, 4, gridspec_kw={"width_ratios": [2.2, 1.6, 1, 1]})
    color = colors(labels)
    by_label = {r["method"]: r for r in summary}
    ok = [r for r in per_seed if r["status"] == Status.COMPLETE]
    width = 0.38
    for i, label in enumerate(labels):
        s = by_label[label]
        for j, (metric, alpha) in enumerate((("clean_acc", 0.45), ("robust_acc", 1.0))):
            x = i + (j - 0.5) * width
            ax_acc.bar(x, 100 * _nan(s[f"{metric}_mean"]), width, yerr=100 * _nan(s[f"{metric}_std"]),
                       color=color[label], alpha=alpha, capsize=4, edgecolor="black", linewidth=0.6)
            seeds = [100 * r[metric] for r in ok if r["method"] == label]
            ax_acc.scatter([x] * len(seeds), seeds, s=14, color="black", zorder=3)
            ax_acc.text(x, 100 * _nan(s[f"{metric}_mean"]) + 100 * _nan(s[f"{metric}_std"]) + 1.5,
                        f"{100 * _nan(s[f'{metric}_mean']):.1f}", ha="center", fontsize=8)
    ax_acc.set_xticks(range(len(labels)), labels)
    ax_acc.set_ylim(0, 122)
    ax_acc.set_yticks(range(0, 101, 20))
    ax_acc.set_ylabel("test accuracy (%)")
    ax_acc.set_title("Clean vs robust accuracy (mean ± std over seeds)")
    ax_acc.legend(handles=[Patch(facecolor="lightgray", edgecolor="black", label="clean (light)"),
                           Patch(facecolor="dimgray", edgecolor="black", label="robust, worst case (dark)"),
                           Line2D([], [], marker="o", color="black", linestyle="", markersize=4, label="one seed")],
                  loc="upper center", ncol=3, fontsize=8)
    names, positions = [], 0
    for a, b in dict.fromkeys((p["a"], p["b"]) for p in paired):
        for metric, short in (("clean_acc", "clean"), ("robust_acc", "robust")):
            diffs = [100 * p["difference"] for p in paired if (p["a"], p["b"], p["metric"]) == (a, b, metric)]
            if diffs:
                mean = sum(diffs) / len(diffs)
                ax_pair.scatter([positions] * len(diffs), diffs, color=color.get(a, "black"), s=18, zorder=3,
                                edgecolor="black", linewidth=0.5, label="one seed" if positions == 0 else None)
                ax_pair.hlines(mean, positions - 0.25, positions + 0.25, color="black", linewidth=2,
                               label="mean" if positions == 0 else None)
            names.append(f"{a} − {b}\n{short}")
            positions += 1
    ax_pair.axhline(0, color="gray", linewidth=0.8, linestyle="--")
    ax_pair.set_xticks(range(len(names)), names, fontsize=7, rotation=25)
    ax_pair.set_xlim(-0.6, max(positions, 1) - 0.4)
    ax_pair.set_ylabel("paired difference (percentage points)")
    ax_pair.set_title("Paired by seed")
    if positions:
        ax_pair.legend(fontsize=8, loc="best")
    for ax, metric, ylabel, title in ((ax_abs, "sensitivity_all", ABS_LABEL, "Final models' sensitivity"),
                                      (ax_rel, "relative_sensitivity_all", REL_LABEL, "… relative variant")):
        for i, label in enumerate(labels):
            s = by_label[label]
            ax.bar(i, _nan(s[f"{metric}_mean"]), 0.6, yerr=_nan(s[f"{metric}_std"]), color=color[label],
                   capsize=4, edgecolor="black", linewidth=0.6)
            seeds = [r[metric] for r in ok if r["method"] == label]
            ax.scatter([i] * len(seeds), seeds, s=14, color="black", zorder=3)
        ax.set_xticks(range(len(labels)), labels, rotation=30)
        ax.set_ylabel(ylabel, fontsize=9)
        ax.set_title(title)
    _title(fig, "Training methods compared: clean and robust accuracy, and neuron sensitivity", subtitle)
    return fig


def compare_distribution_figure(neurons: list[dict], labels: list[str], layers: list[str], source: str,
                                subtitle: str) -> Figure:
    """Per layer, the distribution of neuron sensitivity of each model (box: quartiles; whiskers 1.5 IQR),
    absolute on top and relative below."""
    fig = Figure(figsize=(3.2 * len(layers) + 1, 7.2), layout="constrained")
    axes = fig.subplots(2, len(layers), squeeze=False)
    color = colors(labels)
    for col, layer in enumerate(layers):
        for row, (key, ylabel) in enumerate((("sensitivity", ABS_LABEL), ("relative_sensitivity", REL_LABEL))):
            ax = axes[row][col]
            data = [[r[key] for r in neurons if r["layer"] == layer and r["model"] == m and r["source"] == source]
                    for m in labels]
            box = ax.boxplot(data, patch_artist=True, widths=0.6, showmeans=True,
                             meanprops={"marker": "D", "markerfacecolor": "white", "markeredgecolor": "black",
                                        "markersize": 5}, flierprops={"markersize": 3})
            for patch, label in zip(box["boxes"], labels, strict=True):
                patch.set_facecolor(color[label])
                patch.set_alpha(0.75)
            ax.set_xticks(range(1, len(labels) + 1), labels, rotation=30, fontsize=8)
            ax.set_title(f"{layer} ({len(data[0])} neurons)" if row == 0 else f"{layer}, relative", fontsize=10)
            if col == 0:
                ax.set_ylabel(ylabel, fontsize=9)
    fig.legend(handles=[Patch(facecolor=color[m], label=m) for m in labels]
               + [Line2D([], [], marker="D", color="black", markerfacecolor="white", linestyle="", label="mean")],
               loc="outside right center", fontsize=9)
    how = "each model attacked by its own PGD" if source == "own" else "all attacked by the shared source's PGD"
    _title(fig, f"Neuron sensitivity per layer, {' vs '.join(labels)} ({how})", subtitle)
    return fig


def compare_means_figure(stats: list[dict], accuracy: dict[str, dict[str, float]], labels: list[str],
                         layers: list[str], subtitle: str) -> Figure:
    """Mean sensitivity per layer, one line per model (dashed: shared attack source), absolute and relative."""
    fig = Figure(figsize=(12, 4.6), layout="constrained")
    axes = fig.subplots(1, 2)
    color = colors(labels)
    sources = sorted({r["source"] for r in stats}, key=lambda s: s != "own")
    for ax, variant, ylabel in ((axes[0], "absolute", ABS_LABEL), (axes[1], "relative", REL_LABEL)):
        for label in labels:
            for source in sources:
                ys = [next(r["mean"] for r in stats if (r["model"], r["layer"], r["variant"], r["source"])
                           == (label, layer, variant, source)) for layer in layers]
                ax.plot(range(len(layers)), ys, marker="o", color=color[label],
                        linestyle="-" if source == "own" else "--")
        ax.set_xticks(range(len(layers)), layers)
        ax.set_xlabel("layer (input → output)")
        ax.set_ylabel(f"layer mean of {ylabel}", fontsize=9)
        ax.set_yscale("log")
        ax.set_title(f"{variant.capitalize()} sensitivity")
    handles = []
    for label in labels:
        acc = accuracy[label]
        handles.append(Line2D([], [], color=color[label], marker="o",
                              label=f"{label}: clean {100 * acc['clean']:.1f}%, "
                                    f"own-PGD {100 * acc['adversarial_own']:.1f}%"))
    if len(sources) > 1:
        handles += [Line2D([], [], color="black", linestyle="-", label="own PGD pairs"),
                    Line2D([], [], color="black", linestyle="--", label="shared-source PGD pairs")]
    fig.legend(handles=handles, loc="outside right center", fontsize=9)
    _title(fig, f"Mean neuron sensitivity per layer: {' vs '.join(labels)} (log scale)", subtitle)
    return fig


def stabilize_figure(summary: list[dict], models: list[str], layers: list[str], subtitle: str) -> Figure:
    """Accuracy on adversarial inputs vs the fraction of a layer's neurons patched with benign values."""
    fig = Figure(figsize=(3.6 * len(layers) + 1.5, 3.4 * len(models) + 0.8), layout="constrained")
    axes = fig.subplots(len(models), len(layers), squeeze=False, sharey=True)
    for i, model in enumerate(models):
        for j, layer in enumerate(layers):
            ax = axes[i][j]
            rows = [r for r in summary if r["model"] == model and r["layer"] == layer]
            if not rows:
                ax.set_visible(False)
                continue
            for selection, style in SELECTION_STYLE.items():
                sel = sorted((r for r in rows if r["selection"] == selection), key=lambda r: r["fraction"])
                if not sel:
                    continue
                xs = [100 * r["fraction"] for r in sel]
                mean = [100 * r["accuracy_mean"] for r in sel]
                ax.plot(xs, mean, marker=style["marker"], color=style["color"], markersize=4)
                if selection != "sensitive":
                    std = [100 * _nan(r["accuracy_std"]) for r in sel]
                    ax.fill_between(xs, [m - s for m, s in zip(mean, std, strict=True)],
                                    [m + s for m, s in zip(mean, std, strict=True)], color=style["color"], alpha=0.2)
            ax.axhline(100 * rows[0]["clean_accuracy"], color="tab:green", linestyle="--", linewidth=1)
            ax.axhline(100 * rows[0]["adversarial_accuracy"], color="black", linestyle=":", linewidth=1)
            ax.set_title(f"{model}: {layer} ({rows[0]['neurons']} neurons, {rows[0]['alive']} alive)", fontsize=10)
            ax.set_xlim(0, 102)
            ax.set_ylim(0, 100)
            if i == len(models) - 1:
                ax.set_xlabel("neurons patched with benign values (% of layer)")
            if j == 0:
                ax.set_ylabel("accuracy on adversarial inputs (%)")
    handles = [Line2D([], [], color=s["color"], marker=s["marker"], label=s["label"]) for s in SELECTION_STYLE.values()]
    handles += [Line2D([], [], color="tab:green", linestyle="--", label="clean accuracy (no attack)"),
                Line2D([], [], color="black", linestyle=":", label="adversarial accuracy, nothing patched")]
    fig.legend(handles=handles, loc="outside lower center", ncol=3, fontsize=9)
    _title(fig, "Stabilizing neurons: accuracy recovered by patching the top-k sensitive vs k random neurons",
           subtitle)
    return fig


def study_scatter_figure(trials: list[dict], rho: dict[tuple[str, str], tuple[float, float, int]],
                         subtitle: str) -> Figure:
    """Each trial's final robust accuracy against its final model's mean sensitivity (absolute, relative)."""
    fig = Figure(figsize=(12, 4.8), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    for ax, key, xlabel in ((axes[0], "sensitivity_all", ABS_LABEL), (axes[1], "relative_sensitivity_all", REL_LABEL)):
        for finished, marker, name in ((True, "o", "completed trial"), (False, "x", "failed / stopped early")):
            pts = [r for r in trials if r.get(key) is not None and r.get("robust_acc") is not None
                   and (r["status"] == Status.COMPLETE) == finished]
            if not pts:
                continue
            ax.scatter([r[key] for r in pts], [100 * r["robust_acc"] for r in pts], marker=marker,
                       c=[100 * r["clean_acc"] if r.get("clean_acc") is not None else 0 for r in pts],
                       cmap="viridis", vmin=0, vmax=100, label=name, s=36)
        (r, p, n), (rf, _, nf) = rho[key, "all"], rho[key, "finished"]
        ax.set_title(f"Spearman ρ = {r:.2f} (p = {p:.2g}, n = {n}); finished only: ρ = {rf:.2f} (n = {nf})",
                     fontsize=10)
        ax.set_xlabel(f"final model's {xlabel}", fontsize=9)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("final robust accuracy (%)")
    mappable = axes[1].collections[0] if axes[1].collections else None
    if mappable is not None:
        fig.colorbar(mappable, ax=axes, label="final clean accuracy (%)")
    _title(fig, "Study trials: robust accuracy vs mean neuron sensitivity (low sensitivity is not robustness)",
           subtitle)
    return fig


def study_maps_figure(maps: dict[str, list[dict]], subtitle: str) -> Figure:
    """Per layer, each neuron's sensitivity (sorted, most sensitive first) for the named trials side by side;
    neurons the trial selected are dark."""
    names = list(maps)
    layers = list(dict.fromkeys(r["layer"] for rows in maps.values() for r in rows))
    fig = Figure(figsize=(5.5 * len(names) + 1, 2.4 * len(layers) + 1), layout="constrained")
    axes = fig.subplots(len(layers), len(names), squeeze=False, sharey="row")
    for j, name in enumerate(names):
        for i, layer in enumerate(layers):
            ax = axes[i][j]
            rows = sorted((r for r in maps[name] if r["layer"] == layer), key=lambda r: -r["sensitivity"])
            ax.bar(range(len(rows)), [r["sensitivity"] for r in rows], width=1.0,
                   color=["tab:red" if r["selected"] else "tab:gray" for r in rows])
            ax.set_title(f"{name}: {layer}", fontsize=10)
            if j == 0:
                ax.set_ylabel("σ (activation units)", fontsize=9)
            if i == len(layers) - 1:
                ax.set_xlabel("neurons, most sensitive first (rank)")
    fig.legend(handles=[Patch(color="tab:red", label="selected (sensitive set)"),
                        Patch(color="tab:gray", label="not selected")], loc="outside lower center", ncol=2)
    _title(fig, f"Neuron sensitivity maps, side by side: {' vs '.join(names)}", subtitle)
    return fig
