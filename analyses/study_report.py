"""`analyze study`: a finished study's trials, read back from MLflow, as one report.

It finds the study's parent run (tag `nslab.study` = name, else run name = name) in the study's
experiment, reads every child (trial) run's last metrics, and shows:
- each trial's final robust accuracy against its final model's mean sensitivity (absolute and
  relative), with Spearman's rank correlation: does lower sensitivity go with robustness here?
- the per-neuron sensitivity maps of the best and the worst trial (by robust accuracy) side by side;
- the clean vs robust Pareto front (the study's own study/pareto.parquet when it has one).

"Final" means the last epoch's validation metrics (val/*): robust_acc and sensitivity_all are measured on
the same PGD pairs (ns_core.training.Trainer.validate), so they pair up exactly. Only the search trials
and the baseline are read; confirmation runs (test split) are the study's own report.
"""

from __future__ import annotations

import logging
import math

import pyarrow as pa
from scipy.stats import spearmanr

from analyses.plots import study_maps_figure, study_scatter_figure
from analyses.writer import ReportWriter
from orchestrator.record import tags
from orchestrator.record.figures import pareto_figure
from orchestrator.record.tracking import Tracker, git_commit
from orchestrator.results import Status, arm_fronts, run_status

log = logging.getLogger(__name__)
SENSITIVITIES = ("sensitivity_all", "relative_sensitivity_all")
METRICS = ("robust_acc", "clean_acc", "sensitivity_all", "sensitivity_selected", "relative_sensitivity_all")


def find_study(tracker: Tracker, name: str):
    """The newest parent run tagged nslab.study=name, else named name, else tagged name-*; a ValueError
    listing the studies found otherwise."""
    quoted = name.replace("'", "\\'")
    queries = (f"tags.`{tags.STUDY}` = '{quoted}'", f"attributes.run_name = '{quoted}'",
               f"tags.`{tags.STUDY}` LIKE '{quoted}-%'")  # a config's name: its newest dated study
    for query in queries:
        parents = [r for r in tracker.find_runs(query) if tags.PARENT not in r.data.tags]
        if parents:
            if len(parents) > 1:
                log.warning("%d parent runs match study %r; using the newest (%s)", len(parents), name,
                            parents[0].info.run_id)
            return parents[0]
    known = sorted({r.data.tags[tags.STUDY] for r in tracker.find_runs(f"tags.`{tags.STUDY}` LIKE '%'")
                    if tags.PARENT not in r.data.tags})
    hint = f"studies there: {', '.join(known)}" if known else "it holds no study runs"
    raise ValueError(f"no study named {name!r} in MLflow experiment {tracker.experiment!r} at "
                     f"{tracker.tracking_uri} ({hint}); pass --study-experiment (the study config's "
                     "tracking.experiment) or --tracking-uri")


def trial_rows(tracker: Tracker, parent) -> list[dict]:
    rows = []
    for run in tracker.children(parent.info.run_id):
        if run.data.tags.get(tags.ROLE, "search") not in ("search", "baseline"):
            continue
        metrics = run.data.metrics
        rows.append({"trial": run.info.run_name, "run_id": run.info.run_id,
                     "status": run_status(run.info.status, run.data.tags), "arm": run.data.tags.get(tags.ARM, ""),
                     "role": run.data.tags.get(tags.ROLE, "search"),
                     "failure_reason": run.data.tags.get(tags.FAILURE, run.data.tags.get("failure_reason", "")),
                     **{m: metrics.get(f"val/{m}") for m in METRICS}})
    return rows


def mark_front(tracker: Tracker, parent, rows: list[dict]) -> str:
    """Set rows' on_front from the study's study/pareto.parquet, else compute it over finished trials."""
    artifacts = tracker.list_artifacts(parent.info.run_id, "study")
    if "study/pareto.parquet" in artifacts:
        pareto = tracker.read_table(parent.info.run_id, "study/pareto.parquet")
        if "mlflow_run_id" in pareto.column_names:
            ids = set(pareto.column("mlflow_run_id").to_pylist())
            for row in rows:
                row["on_front"] = row["run_id"] in ids
            return "the study's study/pareto.parquet"
    objectives = [("robust_acc", "max"), ("clean_acc", "max")]
    front = arm_fronts(rows, objectives)
    for row, on in zip(rows, front, strict=True):
        row["on_front"] = on
    return "each arm's front, computed over its completed trials"


def spearman(rows: list[dict], key: str, finished_only: bool = False) -> tuple[float, float, int]:
    pts = [(r[key], r["robust_acc"]) for r in rows if r[key] is not None and r["robust_acc"] is not None
           and (r["status"] == Status.COMPLETE or not finished_only)]
    if len(pts) < 3 or len({p[0] for p in pts}) == 1 or len({p[1] for p in pts}) == 1:
        return float("nan"), float("nan"), len(pts)  # undefined: too few trials, or a constant variable
    result = spearmanr([p[0] for p in pts], [p[1] for p in pts])
    return float(result.statistic), float(result.pvalue), len(pts)


def last_map(tracker: Tracker, run_id: str) -> list[dict] | None:
    files = sorted(f for f in tracker.list_artifacts(run_id, "sensitivity") if f.endswith(".parquet"))
    return tracker.read_table(run_id, files[-1]).to_pylist() if files else None


def study_subtitle(parent, name: str, trials: int, experiment: str) -> str:
    """Dataset / model / validation attack from the study's logged config (flattened experiment.* params)."""
    p = parent.data.params
    what = "/".join(v for v in (p.get("experiment.dataset"), p.get("experiment.model")) if v)
    attack = (f"the validation attack (eps {p['experiment.attack.eps']})" if "experiment.attack.eps" in p
              else "the validation attack")
    return (f"study {name!r} ({trials} trials, MLflow experiment {experiment}){'; ' + what if what else ''}; "
            f"robust = last-epoch validation accuracy under {attack}")


def pick_best_worst(tracker: Tracker, ranked: list[dict]) -> list[tuple[str, dict, list[dict]]]:
    """(role, trial row, last sensitivity table) for the most and least robust trials that logged a map."""
    picked = []
    for role, order in (("best", ranked), ("worst", ranked[::-1])):
        for row in order:
            table = last_map(tracker, row["run_id"])
            if table is not None:
                if not picked or picked[0][1] is not row:
                    picked.append((role, row, table))
                break
    return picked


def study_report(source: Tracker, name: str, writer: ReportWriter) -> str:
    parent = find_study(source, name)
    rows = trial_rows(source, parent)
    if not rows:
        raise ValueError(f"study {name!r} (run {parent.info.run_id}) has no trial runs yet")
    front_source = mark_front(source, parent, rows)
    rho = {(key, subset): spearman(rows, key, subset == "finished") for key in SENSITIVITIES
           for subset in ("all", "finished")}
    ranked = sorted((r for r in rows if r["robust_acc"] is not None), key=lambda r: -r["robust_acc"])
    subtitle = study_subtitle(parent, name, len(rows), source.experiment)
    params = {"study": name, "study_run_id": parent.info.run_id, "study_experiment": source.experiment,
              "tracking_uri": source.tracking_uri}
    with writer.parent(f"study-{name}", params=params, tags={tags.ANALYSIS: "study",
                                                             tags.GIT_COMMIT: git_commit()}) as report:
        writer.table(report, pa.Table.from_pylist(rows), "study_report/trials.parquet")
        writer.table(report, pa.Table.from_pylist(
            [{"sensitivity": k, "trials": subset, "spearman_rho": v[0], "p_value": v[1], "n": v[2]}
             for (k, subset), v in rho.items()]), "study_report/correlation.parquet")
        writer.figure(report, study_scatter_figure(rows, rho, subtitle),
                      "plots/robust_vs_sensitivity.png")
        writer.figure(report, pareto_figure(rows, [("robust_acc", "max"), ("clean_acc", "max")],
                                            [r["on_front"] for r in rows], title=f"Pareto fronts: {front_source}"),
                      "plots/pareto.png")
        maps = {}
        picked = pick_best_worst(source, ranked)
        for role, row, table in picked:
            title = f"{role} ({row['trial']}, robust {100 * row['robust_acc']:.1f}%)"
            maps[title] = table
            with writer.child(report, f"{role}-{row['trial']}", params={"trial_run_id": row["run_id"]}) as run:
                writer.table(run, pa.Table.from_pylist(table), "sensitivity/final.parquet")
        if maps:
            writer.figure(report, study_maps_figure(maps, subtitle), "plots/best_worst_sensitivity.png")
        writer.metrics(report, {f"spearman_{k}_{subset}": v[0] for (k, subset), v in rho.items()
                                if not math.isnan(v[0])})
    lines = [f"study {name!r}: {len(rows)} trials ({sum(r['status'] == Status.COMPLETE for r in rows)} completed)"]
    for (key, subset), (r, p, n) in rho.items():
        lines.append(f"Spearman rho(robust_acc, {key}) over {subset} trials = {r:.3f} (p = {p:.3g}, n = {n})")
    for role, row, _ in picked:
        lines.append(f"{role} trial with a sensitivity map: {row['trial']} (robust {100 * row['robust_acc']:.1f}%)")
    lines.append(f"Pareto front ({front_source}): " + ", ".join(r["trial"] for r in rows if r.get("on_front")))
    return "\n".join(lines)
