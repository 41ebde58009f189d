"""Study and run plots as matplotlib Figures (no pyplot state; Tracker.log_figure saves them as PNG). Each says
what it compares in its title and how many runs it rests on.

    sensitivity_figure(smap, selected)      per layer: every neuron's sensitivity, most sensitive first; the
                                            neurons SNS stabilizes in red (only for a method that selects)
    pareto_figure(rows, objectives, mask)   each arm's completed trials on the first two objectives, fronts joined
    compute_figure(compute, metric)         per arm, the best validation metric so far against training time
    expected_best_figure(table, metric, n)  per arm, the expected best validation result after k trials, banded
    importance_figure(table)                Optuna's fANOVA importances per objective, with the trial count
    confirmation_figure(confirmation)       both arms' test accuracy per seed (paired lines) and the paired
                                            difference with its 95% interval; the verdict in the title
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa
from matplotlib.figure import Figure

from orchestrator.results import Status, finite

# One colour per arm name in every plot of a study (a shootout's usual arm names get distinct ones; any other
# name a stable colour of its own from the rest of the palette).
ARM_COLORS = {"baseline": "tab:blue", "pgd_at": "tab:blue", "sns": "tab:red", "sns_pgd_at": "tab:red",
              "trades": "tab:green", "sns_trades": "tab:purple", "mart": "tab:orange", "cas": "tab:brown"}
OTHER_COLORS = ("tab:pink", "tab:olive", "tab:cyan", "tab:gray")


def arm_color(arm: str) -> str:
    return ARM_COLORS.get(arm) or OTHER_COLORS[zlib.crc32(arm.encode()) % len(OTHER_COLORS)]


def sensitivity_figure(smap, selected: Mapping[str, Any] | None = None, title: str = "neuron sensitivity") -> Figure:
    """`selected`: the neurons the method stabilizes (SNS), drawn in red; None for methods that select none."""
    layers = smap.layers
    figure = Figure(figsize=(3.2 * len(layers), 3.0))
    axes = figure.subplots(1, len(layers), squeeze=False)[0]
    _margins(figure, len(layers))
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
    figure.suptitle(f"{title}; red: the neurons SNS stabilizes" if selected else title, fontsize=10)
    return figure


def _margins(figure: Figure, columns: int, left: float = 0.65, right: float = 0.12, bottom: float = 0.45,
             top: float = 0.6, gap: float = 0.42) -> None:
    """Fixed margins in inches for a row of same-sized panels with short labels. Every trial draws such a figure,
    and constrained layout's measuring passes with a tight-bbox save took almost half of its CPU time (LeNet-5's
    four layers, 2-core x86_64: 0.47 s against 0.26 s saved as Tracker.log_figure saves it)."""
    width, height = figure.get_size_inches()
    panel = (width - left - right - (columns - 1) * gap) / columns
    figure.subplots_adjust(left=left / width, right=1 - right / width, bottom=bottom / height, top=1 - top / height,
                           wspace=gap / panel)


def pareto_figure(rows: Sequence[Mapping[str, Any]], objectives: Sequence[tuple[str, str]],
                  front: Sequence[bool], title: str = "") -> Figure:
    """Each arm's completed trials (labelled by trial name, e.g. sns-07, the name of its MLflow run) on the first
    two objectives with its front joined, accuracies in percent; one objective: the value per trial number."""
    figure = Figure(figsize=(6.0, 4.4), layout="constrained")
    ax = figure.subplots()
    done = [(r, on) for r, on in zip(rows, front, strict=True) if r.get("status") == Status.COMPLETE]
    arms = list(dict.fromkeys(r.get("arm", "") for r, _ in done))
    mx = objectives[0][0]
    my = objectives[1][0] if len(objectives) > 1 else None
    for arm in arms:
        mine = [(r, on) for r, on in done if r.get("arm", "") == arm]
        xs = [_shown(mx, r.get(mx)) for r, _ in mine] if my else [r.get("number") or i for i, (r, _) in
                                                                   enumerate(mine, 1)]
        ys = [_shown(my, r.get(my)) for r, _ in mine] if my else [_shown(mx, r.get(mx)) for r, _ in mine]
        ax.scatter(xs, ys, color=arm_color(arm), alpha=0.55, label=f"{arm} arm ({len(mine)} completed)")
        for (r, _), x, y in zip(mine, xs, ys, strict=True):
            ax.annotate(trial_name(r), (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        best = sorted(((x, y) for (_, on), x, y in zip(mine, xs, ys, strict=True) if on), key=lambda p: p[0]) \
            if my else []
        if best:
            ax.plot([p[0] for p in best], [p[1] for p in best], "o-", color=arm_color(arm), label=f"{arm} front")
    if my:
        ax.set_xlabel(f"{mx}{_unit(mx)} ({objectives[0][1]})")
        ax.set_ylabel(f"{my}{_unit(my)} ({objectives[1][1]})")
    else:
        ax.set_xlabel("trial number (creation order, per arm)")
        ax.set_ylabel(f"{mx}{_unit(mx)}")
    if done:
        ax.legend(fontsize=8)
    ax.set_title(title or f"validation objectives of {len(done)} completed trials", fontsize=10)
    return figure


def trial_name(row: Mapping[str, Any]) -> str:
    """A trial as every record names it ('sns-07', its MLflow run's name); its number only when it has no name."""
    return str(row.get("label") or row.get("trial") or row.get("number") or "")


def _shown(metric: str, value: Any) -> Any:
    """An accuracy (a fraction) in percent, as every table and plot of a study shows it; other values as they are."""
    return 100 * value if metric.endswith("acc") and finite(value) else value


def _unit(metric: str) -> str:
    return " (%)" if metric.endswith("acc") else ""


def compute_figure(compute: pa.Table, metric: str) -> Figure:
    """Per arm: the best completed trial's validation metric so far against cumulative training seconds —
    whether a method is better or only faster shows as one curve above the other at equal compute."""
    figure = Figure(figsize=(6.0, 4.0), layout="constrained")
    ax = figure.subplots()
    rows = compute.to_pylist()
    for arm in dict.fromkeys(r["arm"] for r in rows):
        mine = [r for r in rows if r["arm"] == arm and r["best_so_far"] is not None]
        if mine:
            ax.step([r["cumulative_train_seconds"] for r in mine], [100 * r["best_so_far"] for r in mine], where="post",
                    color=arm_color(arm), marker="o", label=f"{arm} arm ({sum(1 for r in rows if r['arm'] == arm)} "
                                                            "trials)")
    ax.set_xlabel("cumulative training time of the arm's trials (s)")
    ax.set_ylabel(f"best {metric} so far (%)")
    ax.set_title("best validation result against training compute, per arm", fontsize=10)
    if rows:
        ax.legend(fontsize=8)
    return figure


def expected_best_figure(table: pa.Table, metric: str, budgets: Mapping[str, int]) -> Figure:
    """Per arm: the expected best validation result after k trials (orchestrator/study/budget.py) with its 95%
    bootstrap band, and the arm's budget marked: a curve still rising there says more trials might have chosen
    another configuration."""
    figure = Figure(figsize=(6.0, 4.0), layout="constrained")
    ax = figure.subplots()
    rows = table.to_pylist()
    for arm in dict.fromkeys(r["arm"] for r in rows):
        mine = [r for r in rows if r["arm"] == arm]
        k = [r["trials"] for r in mine]
        color = arm_color(arm)
        ax.plot(k, [100 * r["expected_best"] for r in mine], color=color, marker="o", label=f"{arm} arm")
        ax.fill_between(k, [100 * r["low"] for r in mine], [100 * r["high"] for r in mine], color=color, alpha=0.15)
        if arm in budgets:
            ax.axvline(budgets[arm], color=color, linestyle=":", linewidth=1)
    ax.set_xlabel("trials (k)")
    ax.set_ylabel(f"expected best {metric} (%)")
    ax.set_title("expected best validation result after k trials (95% bootstrap band; dotted: the budget)",
                 fontsize=9)
    if rows:
        ax.legend(fontsize=8)
    return figure


def importance_figure(table: pa.Table) -> Figure:
    rows = table.to_pylist()
    objectives = list(dict.fromkeys(r["objective"] for r in rows))
    figure = Figure(figsize=(4.5 * max(len(objectives), 1), 3.0), layout="constrained")
    axes = figure.subplots(1, max(len(objectives), 1), squeeze=False)[0]
    for ax, objective in zip(axes, objectives, strict=False):
        mine = sorted((r for r in rows if r["objective"] == objective), key=lambda r: r["importance"])
        ax.barh([r["param"] for r in mine], [r["importance"] for r in mine], color="tab:blue")
        ax.set_title(f"fANOVA importance for {objective}\n(n = {mine[0]['trials']} completed trials: indicative)",
                     fontsize=9)
        ax.set_xlim(0, 1)
    return figure


def confirmation_figure(confirmation) -> Figure:
    """Left: each configuration's test robust accuracy per seed, its seeds joined to the baseline's by a line
    (paired). Right: the paired robust and clean differences per seed with their mean and 95% interval."""
    figure = Figure(figsize=(10.5, 4.4), layout="constrained")
    ax_abs, ax_diff = figure.subplots(1, 2, gridspec_kw={"width_ratios": [1.2, 1]})
    names = [c.name for c in confirmation.configurations]
    by = {(r["configuration"], r["seed"]): r for r in confirmation.rows}
    for seed in confirmation.seeds:
        values = [by.get((name, seed), {}).get("test_robust_acc") for name in names]
        points = [(i, 100 * v) for i, v in enumerate(values) if finite(v)]
        ax_abs.plot([p[0] for p in points], [p[1] for p in points], color="gray", alpha=0.5, linewidth=0.8)
        for i, y in points:
            ax_abs.scatter([i], [y], color=arm_color(confirmation.configurations[i].arm.name), s=22, zorder=3)
            ax_abs.annotate(f"s{seed}", (i, y), fontsize=6, xytext=(4, 0), textcoords="offset points")
    ax_abs.set_xticks(range(len(names)), names)
    ax_abs.set_xlim(-0.5, len(names) - 0.5)
    ax_abs.set_ylabel("test robust accuracy (%), worst case")
    ax_abs.set_title("per seed (lines join the same seed)", fontsize=9)
    labels = []
    for i, comparison in enumerate(confirmation.comparisons):
        for offset, (diff, color, kind) in enumerate(((comparison.robust, "tab:red", "robust"),
                                                      (comparison.clean, "tab:blue", "clean"))):
            x = i + (offset - 0.5) * 0.35
            ax_diff.scatter([x] * diff.n, [100 * d for d in diff.differences], color=color, s=18, zorder=3,
                            label=f"Δ {kind}, one seed" if i == 0 else None)
            if diff.n >= 2:
                low, high = diff.ci95
                ax_diff.errorbar([x], [100 * diff.mean], yerr=[[100 * (diff.mean - low)], [100 * (high - diff.mean)]],
                                 color="black", capsize=5, linewidth=1.5, label="mean, 95% CI" if i == offset == 0
                                 else None)
        labels.append(f"{comparison.configuration.name}\n− {comparison.baseline.name}")
    if confirmation.comparisons:
        margin = 100 * confirmation.comparisons[0].margin
        ax_diff.axhspan(-margin, margin, color="gray", alpha=0.15, label=f"equivalence margin (±{margin:g} points)")
        ax_diff.legend(fontsize=7)
    ax_diff.axhline(0, color="gray", linestyle="--", linewidth=0.8)
    ax_diff.set_xlim(-0.6, max(len(labels), 1) - 0.4)
    ax_diff.set_xticks(range(len(labels)), labels, fontsize=8)
    ax_diff.set_ylabel("test accuracy difference (points), same seed")
    ax_diff.set_title("paired differences", fontsize=9)
    verdicts = [str(c.decision) for c in confirmation.comparisons]
    head = (f"{confirmation.comparisons[0].what()}: {', '.join(verdicts)}" if confirmation.comparisons
            else "confirmation")
    figure.suptitle(f"{head} ({len(confirmation.seeds)} seeds, test split)", fontsize=10)
    return figure
