"""A finished study in words: the Markdown report the MLflow UI renders on the parent run (its description and
study/report.md), the summary metrics and the short verdict it shows in the runs table, and the console text of
the pipeline.

    text = study_markdown(study, outcome)        # the verdict first, then the tables a reviewer checks
    metrics = summary_metrics(study, outcome)    # {"confirmed/sns_robust_diff_points": 2.1, ...}
    short_verdict(outcome)                       # "SNS beats PGD-AT, +2.1 points (3 seeds)": the nslab.verdict tag
    parent_run_name(study, outcome)              # "quick: SNS beats PGD-AT": the parent run's name once finished

One unit per quantity, named where it is a number: accuracies in percent (`_pct`), their differences in
percentage points (`_points`); "±" is the standard deviation over seeds wherever it is printed.
"""

from __future__ import annotations

from typing import Any

from orchestrator.config.study import StudyFile
from orchestrator.results import Status, finite, fmt, pct, points
from orchestrator.study import ranking
from orchestrator.study.decision import Decision, probability_of_improvement


def summary_metrics(study: StudyFile, outcome) -> dict[str, float]:
    """The parent run's metrics: the confirmed paired differences in points with their interval, seed count and
    bootstrap probability (`confirmed/<configuration>_*`: they sort before every trial's `objective/` in the
    runs table, so the answer is in its first metric columns), then per arm its best completed validation
    objectives in percent and its completed trials, the compute ratio, seconds and epochs (`summary/*`)."""
    out: dict[str, float] = {}
    comparisons = outcome.confirmation.comparisons if outcome.confirmation else []
    for comparison in comparisons:
        name, robust = comparison.configuration.name, comparison.robust
        if sum(c.configuration.name == name for c in comparisons) > 1:  # an arm judged against two others
            name = f"{name}_vs_{comparison.baseline.name}"
        low, high = robust.ci95
        out.update({f"confirmed/{name}_robust_diff_points": 100 * robust.mean,
                    f"confirmed/{name}_ci95_low_points": 100 * low, f"confirmed/{name}_ci95_high_points": 100 * high,
                    f"confirmed/{name}_clean_diff_points": 100 * comparison.clean.mean,
                    f"confirmed/{name}_seeds": robust.n,
                    f"confirmed/{name}_p_better": probability_of_improvement(robust) if robust.n else None})
    for arm in outcome.arms:
        done = [r for r in outcome.rows if r["arm"] == arm.name and r["status"] == Status.COMPLETE]
        out[f"summary/{arm.name}_completed_trials"] = len(done)
        for metric, mode in outcome.objectives:
            values = [r[metric] for r in done if finite(r.get(metric))]
            if values:
                best = max(values) if mode == "max" else min(values)
                out[f"summary/{arm.name}_best_{metric.replace('/', '_')}_{_unit(metric)}"] = _scaled(metric, best)
    out.update({f"summary/{arm}_cost_per_epoch_vs_control": ratio for arm, ratio in outcome.cost_ratios.items()
                if arm != study.control_arm})
    out.update({"summary/method_cost_per_epoch": outcome.cost_ratio, "summary/study_seconds": outcome.seconds,
                "summary/epochs_trained": outcome.epochs_trained,
                "summary/epochs_without_sharing": outcome.epochs_unshared})
    return {k: round(float(v), 4) for k, v in out.items() if finite(v)}  # what the numbers can carry


def _unit(metric: str) -> str:
    """An accuracy is logged in percent; the sensitivities as measured."""
    return "pct" if metric.endswith("_acc") else "value"


def _scaled(metric: str, value: float) -> float:
    return 100 * value if metric.endswith("_acc") else value


def short_verdict(outcome) -> str:
    """The study's answer in a runs-table cell (the parent's nslab.verdict tag), one clause per comparison:
    'SNS beats PGD-AT, +2.1 points (3 seeds)', 'SNS vs PGD-AT undecided, +1.2 points (6 seeds)'; the
    sentence with the interval is the run's description and study/verdict.txt."""
    return _answer(outcome, numbers=True)


def parent_run_name(study: StudyFile, outcome) -> str:
    """The finished study's run name, short enough for the runs table's first column: the study's config name
    and its answer without the numbers ('quick: SNS beats PGD-AT'); the dated study name stays in the
    nslab.study tag and the Ray results folder."""
    return f"{study.study.name}: {_answer(outcome, numbers=False)}"


def _answer(outcome, numbers: bool) -> str:
    confirmation = outcome.confirmation
    if confirmation is None:
        return "search only (no confirmation)"
    if not confirmation.comparisons:
        return "no comparison (no baseline)"
    return "; ".join(_clause(c, numbers) for c in confirmation.comparisons)


def _clause(comparison, numbers: bool) -> str:
    name, baseline = comparison.configuration.arm.title, comparison.baseline.arm.title
    if comparison.configuration.name != comparison.configuration.arm.name:
        name += f" ({comparison.configuration.name})"
    robust = comparison.robust
    if robust.n == 0:
        return f"{name} vs {baseline}: no seed finished for both"
    words = {Decision.BEATS: f"{name} beats {baseline}", Decision.LOSES: f"{name} loses to {baseline}",
             Decision.EQUIVALENT: f"{name} equivalent to {baseline}"}.get(comparison.decision,
                                                                         f"{name} vs {baseline} undecided")
    return f"{words}, {points(robust.mean)} points ({robust.n} seed{'' if robust.n == 1 else 's'})" if numbers \
        else words


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def _question(study: StudyFile, outcome) -> str:
    """'sns vs pgd_at' for two arms; 'six arms against the control pgd_at' for a shootout."""
    if study.arms is not None:
        return f"{len(outcome.arms)} arms against the control {study.control_arm}"
    return f"{study.experiment.method} vs {study.baseline_method() or '(no baseline)'}"


def study_markdown(study: StudyFile, outcome) -> str:
    """The study's answer first (the verdicts), then the confirmation, each arm's best, the trials, the
    compute and the trust in the cheap signal; every number rounded to what it can carry."""
    e = study.experiment
    confirmation = outcome.confirmation
    verdicts = [f"**{c.verdict()}**" for c in confirmation.comparisons] if confirmation else []
    lines = [*verdicts, "" if verdicts else "(no confirmation)", f"# Study {outcome.name}", "",
             f"{_question(study, outcome)} on {e.dataset} / {e.model}, "
             f"{e.attack.norm} eps {e.attack.eps:g}; " + "; ".join(a.describe() for a in outcome.arms) + "; "
             "verdict on the test split, paired by seed (above).", ""]
    if verdicts:
        lines += ["Accuracies in percent, differences (Δ) in percentage points; ± is the standard deviation of the "
                  "per-seed differences over seeds; the 95% CI is that of their mean, counting the seeds and the test "
                  "examples (each source's ± beside it) and holding at every look of the sequential design, under "
                  "Holm where there are several comparisons (docs/studies.md, \"How sure a verdict is\"); "
                  "P(better) the share of "
                  "paired-bootstrap resamples of the seeds whose mean difference is above 0.", ""]
    if ranking.shown(confirmation):
        rows = ranking.ranking(confirmation, study.control_arm)
        lines += ["## Ranking", "", "By mean robust accuracy on the confirmation seeds (± sd over seeds); a rank is "
                  "only as firm as its interval against the control and the decision beside it.", ""]
        lines += _table(ranking.RANKING_HEADER, [ranking.ranking_cells(r) for r in rows]) + [""]
        per_base = ranking.base_lines(confirmation)
        if per_base:
            lines += ["SNS on each base, against that base (the paper's claim, per base):", ""]
            lines += [f"- {line}" for line in per_base] + [""]
    per_search = getattr(confirmation, "per_search", [])  # a replicated study's
    if per_search:
        lines += ["Each search's own comparison (its choices, paired by seed):", ""]
        lines += [f"- {c.verdict()}" for c in per_search] + [""]
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
    for arm in outcome.arms:
        lines += search_table(arm, [r for r in outcome.rows if r["arm"] == arm.name], outcome.objectives)
    lines += ["", f"Training compute: {compute_words(study, outcome)}; {outcome.epochs_trained} epochs trained "
              f"({outcome.epochs_unshared} without shared warm-ups). study/robust_vs_compute.png plots each arm's "
              "best so far against training time."]
    rungs = outcome.rungs.to_pylist() if outcome.rungs is not None else []
    if rungs:
        lines += ["", f"How far the multi-fidelity signal can be trusted (Spearman ρ between {metric} at a rung and "
                      "at the end, completed trials):", ""]
        lines += _table(["arm", "rung (epoch)", "trials", "ρ"],
                        [[r["arm"], r["rung_epoch"], r["trials"], fmt(r["spearman_rho"], 2)] for r in rungs])
    budget = budget_lines(outcome)
    if budget:
        lines += ["", "Was each arm's budget enough? Expected best validation result after k trials "
                      "(study/expected_best.png), over the last quarter of the budget:", ""]
        lines += [f"- {line}" for line in budget]
    importances = outcome.importances
    if importances is not None and not importances.num_rows:
        lines += ["", "Parameter importances: not computed (fewer than 8 completed trials of the method's arm)."]
    return "\n".join(lines) + "\n"


RISING = 0.1  # points the expected best may still gain over the last quarter of a budget for it to count as flat


def compute_words(study: StudyFile, outcome) -> str:
    """Each arm's seconds per epoch against the control's, on the same machine and recipe: 'per epoch against
    PGD-AT: TRADES 1.62x, SNS on PGD-AT 1.09x (regularized epochs), ...'; an SNS arm is timed on its regularized
    epochs (its warm-up is its base's)."""
    titles = {arm.name: arm for arm in outcome.arms}
    control = titles.get(study.control_arm)
    others = [(titles[name], ratio) for name, ratio in outcome.cost_ratios.items() if name != study.control_arm]
    if control is None or not others:
        return "no cost per epoch (the control arm has no timed epoch)"
    return f"cost per epoch against {control.title}: " + ", ".join(
        f"{arm.title} {fmt(ratio, 3)}x" + (" (regularized epochs)" if arm.method == "sns" else "")
        for arm, ratio in others)


def budget_lines(outcome) -> list[str]:
    """Per arm, whether its expected best validation result (study/expected_best.parquet) still rises over the
    last quarter of its budget: 'PGD-AT: +0.4 points from 6 to 8 trials: a larger budget may change the answer'."""
    table = getattr(outcome, "expected_best", None)
    if table is None:
        return []
    rows, sign = table.to_pylist(), 1 if outcome.objectives[0][1] == "max" else -1
    lines = []
    for arm in outcome.arms:
        if not arm.tuned:
            continue
        curve = {r["trials"]: r["expected_best"] for r in rows if r["arm"] == arm.name}
        n = min(arm.trials, max(curve, default=0))
        if n < 2:
            lines.append(f"{arm.title}: {n} trial(s) with a value: no curve")
            continue
        start = n - max(1, n // 4)
        rise = sign * (curve[n] - curve[start])
        judged = "a larger budget may change the answer" if 100 * rise >= RISING else "flat: the budget looks enough"
        lines.append(f"{arm.title}: {points(rise)} points from {start} to {n} trials: {judged}")
    return lines


def search_table(arm, rows: list[dict], objectives: list[tuple[str, str]]) -> list[str]:
    """One arm's search trials as a Markdown table narrow enough for MLflow's preview: the trial, its status,
    the arm's searched values, its validation objectives (%), and epochs and training seconds where they
    differ between its trials; each failed trial's reason below it."""
    if not rows:
        return []
    columns = [("trial", lambda r: r["label"]), ("status", lambda r: r["status"])]
    columns += [(_short_path(p), lambda r, p=p: fmt(r.get(f"param.{p}"), 3)) for p in arm.space]
    columns += [(f"{m.removeprefix('val/')} %" if m.endswith("_acc") else m.removeprefix("val/"),
                 lambda r, m=m: pct(r.get(m)) if m.endswith("_acc") else fmt(r.get(m), 3)) for m, _ in objectives]
    optional = [("epochs", lambda r: fmt(r.get("epochs"))), ("train s", lambda r: fmt(r.get("train_seconds"), 3))]
    columns += [(name, cell) for name, cell in optional if len({cell(r) for r in rows}) > 1]
    out = [f"### {arm.describe()} ({arm.name} arm)", ""]
    out += _table([name for name, _ in columns], [[cell(r) for _, cell in columns] for r in rows])
    out += [f"- {r['label']}: {r['failure_reason']}" for r in rows if r.get("failure_reason")]
    return [*out, ""]


def _short_path(path: str) -> str:
    return path.removeprefix("sns.").removeprefix("train.")


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
    out.append(f"compute: {compute_words(study, outcome)}; {outcome.epochs_trained} epochs trained "
               f"({outcome.epochs_unshared} without shared warm-ups)")
    for arm in outcome.arms:
        rows = [r for r in outcome.compute.to_pylist() if r["arm"] == arm.name] if outcome.compute else []
        if rows:
            out.append(f"  {arm.name} arm: {rows[-1]['cumulative_train_seconds']:.0f} s of training, best "
                       f"{metrics[0]} {pct(rows[-1]['best_so_far'])}%")
    rungs = outcome.rungs.to_pylist() if outcome.rungs is not None else []
    if rungs:
        out.append("rank correlation of each rung's metric with the final one (completed trials): " + "; ".join(
            f"{r['arm']} epoch {r['rung_epoch']}: ρ {fmt(r['spearman_rho'], 2)} (n {r['trials']})" for r in rungs))
    budget = budget_lines(outcome)
    if budget:
        out.append("expected best after k trials (was the budget enough?): " + "; ".join(budget))
    if outcome.importances is not None and outcome.importances.num_rows:
        out.append("parameter importances (fANOVA, n = " + str(outcome.importances.column("trials")[0].as_py())
                   + " trials): " + ", ".join(f"{r['param']}->{r['objective']} {r['importance']:.2f}"
                                             for r in outcome.importances.to_pylist()))
    confirmation = outcome.confirmation
    if confirmation is not None:
        out.append(f"\nconfirmation on the test split, seeds {confirmation.seeds} ({confirmation.rounds} round(s); "
                   f"Δ = configuration − baseline, same seed, points):")
        out.append(confirmation.text())
        if ranking.shown(confirmation):
            out.append("\nranking (mean robust accuracy on the confirmation seeds; Δ and 95% CI against the control):")
            out.append(ranking.ranking_text(ranking.ranking(confirmation, study.control_arm)))
            per_base = ranking.base_lines(confirmation)
            out += ["SNS on each base: " + "; ".join(per_base)] if per_base else []
    out.append(f"\nMLflow parent run {outcome.parent_run_id}; Ray results {outcome.experiment_path}")
    out.append(f"open the MLflow UI:  {outcome.ui_command}")
    if getattr(confirmation, "per_search", []):
        out.append("\neach search's own comparison (test split, paired by seed):")
        out += [f"  {c.verdict()}" for c in confirmation.per_search]
    if confirmation is not None and confirmation.comparisons:
        unit = confirmation.comparisons[0].unit
        out.append(f"\nverdict (test split, {'one difference per search' if unit == 'search' else 'paired by seed'}):")
        out += [f"  {c.verdict()}" for c in confirmation.comparisons]
    return "\n".join(out)
