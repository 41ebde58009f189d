"""A finished study in words: the Markdown report the MLflow UI renders on the parent run (its description and
study/report.md), the summary metrics it shows beside it, and the console text of the pipeline.

    text = study_markdown(study, outcome)        # the verdict first, then the tables a reviewer checks
    metrics = summary_metrics(study, outcome)    # {"summary/sns_best_val_robust_acc": 0.836, ...}
"""

from __future__ import annotations

from typing import Any

from orchestrator.config.study import StudyFile
from orchestrator.results import Status, finite, fmt, pct, points


def summary_metrics(study: StudyFile, outcome) -> dict[str, float]:
    """Per arm its best completed validation objectives, the compute ratio, the epochs saved, and the confirmed
    paired differences with their interval (names under `summary/` sort together in the UI)."""
    out: dict[str, float] = {}
    for arm in outcome.arms:
        done = [r for r in outcome.rows if r["arm"] == arm.name and r["status"] == Status.COMPLETE]
        out[f"summary/{arm.name}_completed_trials"] = len(done)
        for metric, mode in outcome.objectives:
            values = [r[metric] for r in done if finite(r.get(metric))]
            if values:
                out[f"summary/{arm.name}_best_{metric.replace('/', '_')}"] = max(values) if mode == "max" \
                    else min(values)
    for comparison in outcome.confirmation.comparisons if outcome.confirmation else []:
        name = comparison.configuration.name
        low, high = comparison.robust.ci95
        out.update({f"summary/{name}_confirmed_robust_diff": comparison.robust.mean,
                    f"summary/{name}_confirmed_ci95_low": low, f"summary/{name}_confirmed_ci95_high": high,
                    f"summary/{name}_confirmed_clean_diff": comparison.clean.mean,
                    f"summary/{name}_confirmation_seeds": comparison.robust.n})
    out.update({"summary/method_cost_per_epoch": outcome.cost_ratio, "summary/study_seconds": outcome.seconds,
                "summary/epochs_trained": outcome.epochs_trained,
                "summary/epochs_without_sharing": outcome.epochs_unshared})
    return {k: round(float(v), 4) for k, v in out.items() if finite(v)}  # what the numbers can carry


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def study_markdown(study: StudyFile, outcome) -> str:
    """The study's answer first (the verdicts), then the confirmation, each arm's best, the trials, the
    compute and the trust in the cheap signal; every number rounded to what it can carry."""
    e = study.experiment
    confirmation = outcome.confirmation
    verdicts = [f"**{c.verdict()}**" for c in confirmation.comparisons] if confirmation else []
    lines = [*verdicts, "" if verdicts else "(no confirmation)", f"# Study {outcome.name}", "",
             f"{e.method} vs {study.baseline_method() or '(no baseline)'} on {e.dataset} / {e.model}, "
             f"{e.attack.norm} eps {e.attack.eps:g}; " + "; ".join(a.describe() for a in outcome.arms) + "; "
             "verdict on the test split, paired by seed (above).", ""]
    if confirmation is not None:
        lines += ["## Confirmation", ""]
        lines += _table(["configuration", "seed", "clean %", "robust %", "Δ robust", "Δ clean", "status"], [
            [r["configuration"], r["seed"], pct(r.get("test_clean_acc")), pct(r.get("test_robust_acc")),
             points(r.get("robust_diff")) if finite(r.get("robust_diff")) else "",
             points(r.get("clean_diff")) if finite(r.get("clean_diff")) else "", r["status"]]
            for r in confirmation.rows])
        lines += ["", "Configurations, chosen on validation:", ""]
        lines += [f"- **{c.name}** ({c.arm.describe()}): {c.describe()}" for c in confirmation.configurations]
    metric = outcome.objectives[0][0]
    lines += ["", "## Search (validation split)", ""]
    params = list(study.search_space)
    lines += _table(["trial", "status", *[p.removeprefix("sns.").removeprefix("train.") for p in params],
                     *[m.removeprefix("val/") for m, _ in outcome.objectives], "epochs", "train s"], [
        [r["label"], r["status"], *[fmt(r.get(f"param.{p}"), 3) for p in params],
         *[pct(r.get(m)) for m, _ in outcome.objectives], r.get("epochs"), fmt(r.get("train_seconds"), 3)]
        for r in outcome.rows])
    ratio = outcome.cost_ratio
    lines += ["", f"Training compute: {e.method} costs {fmt(ratio, 3)}x its base per regularized epoch; "
              f"{outcome.epochs_trained} epochs trained ({outcome.epochs_unshared} without shared warm-ups). "
              "study/robust_vs_compute.png plots each arm's best so far against training time."]
    rungs = outcome.rungs.to_pylist() if outcome.rungs is not None else []
    if rungs:
        lines += ["", f"How far the multi-fidelity signal can be trusted (Spearman ρ between {metric} at a rung and "
                      "at the end, completed trials):", ""]
        lines += _table(["arm", "rung (epoch)", "trials", "ρ"],
                        [[r["arm"], r["rung_epoch"], r["trials"], fmt(r["spearman_rho"], 2)] for r in rungs])
    importances = outcome.importances
    if importances is not None and not importances.num_rows:
        lines += ["", "Parameter importances: not computed (fewer than 8 completed trials of the method's arm)."]
    return "\n".join(lines) + "\n"


def console_text(study: StudyFile, outcome) -> str:
    """What the study pipeline prints at the end: each arm's trials, the compute, the confirmation, where the
    record is, and the verdict last."""
    metrics = [m for m, _ in outcome.objectives]
    params = list(study.search_space)
    header = ["trial", "status", *[p.removeprefix("sns.").removeprefix("train.") for p in params],
              *[m.removeprefix("val/") for m in metrics], "epochs", "forked", "best_ep", "train_s"]

    def cells(row: dict) -> list[str]:
        values = [row["label"], row["status"], *[row.get(f"param.{p}") for p in params], *[row.get(m) for m in metrics],
                  row.get("epochs"), row.get("forked_at"), row.get("best_epoch"), row.get("train_seconds")]
        return [fmt(v, 4) for v in values]

    lines = [header] + [cells(r) for r in outcome.rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    table = ["  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)) for line in lines]
    out = [f"\nstudy {outcome.name}: {len(outcome.rows)} trials ({'; '.join(a.describe() for a in outcome.arms)}), "
           f"{outcome.seconds:.0f} s in all; validation metrics ({', '.join(metrics)})", *table]
    out += [f"  {r['label']}: {r['failure_reason']}" for r in outcome.rows if r.get("failure_reason")]
    front = [r["label"] for r, on in zip(outcome.rows, outcome.pareto, strict=True) if on]
    out.append(f"\nPareto fronts (completed trials, per arm): {', '.join(front) or 'none'}")
    out.append(f"compute: {study.experiment.method} costs {fmt(outcome.cost_ratio, 3)}x its base per regularized "
               f"epoch; {outcome.epochs_trained} epochs trained ({outcome.epochs_unshared} without shared warm-ups)")
    for arm in outcome.arms:
        rows = [r for r in outcome.compute.to_pylist() if r["arm"] == arm.name] if outcome.compute else []
        if rows:
            out.append(f"  {arm.name} arm: {rows[-1]['cumulative_train_seconds']:.0f} s of training, best "
                       f"{metrics[0]} {pct(rows[-1]['best_so_far'])}%")
    rungs = outcome.rungs.to_pylist() if outcome.rungs is not None else []
    if rungs:
        out.append("rank correlation of each rung's metric with the final one (completed trials): " + "; ".join(
            f"{r['arm']} epoch {r['rung_epoch']}: ρ {fmt(r['spearman_rho'], 2)} (n {r['trials']})" for r in rungs))
    if outcome.importances is not None and outcome.importances.num_rows:
        out.append("parameter importances (fANOVA, n = " + str(outcome.importances.column("trials")[0].as_py())
                   + " trials): " + ", ".join(f"{r['param']}->{r['objective']} {r['importance']:.2f}"
                                             for r in outcome.importances.to_pylist()))
    confirmation = outcome.confirmation
    if confirmation is not None:
        out.append(f"\nconfirmation on the test split, seeds {confirmation.seeds} ({confirmation.rounds} round(s); "
                   f"Δ = configuration − baseline, same seed, points):")
        out.append(confirmation.text())
    out.append(f"\nMLflow parent run {outcome.parent_run_id}; Ray results {outcome.experiment_path}")
    out.append(f"open the MLflow UI:  {outcome.ui_command}")
    if confirmation is not None and confirmation.comparisons:
        out.append("\nverdict (test split, paired by seed):")
        out += [f"  {c.verdict()}" for c in confirmation.comparisons]
    return "\n".join(out)
