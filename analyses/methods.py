"""`analyze methods`: standard, PGD-AT, TRADES, SNS, ... under one budget and seed set (claim 3).

Every (method, seed) is a Ray Tune trial of the one run path (orchestrator/run.py): trained (resumable,
on a GPU where there is one), evaluated on the test split with the experiment's final suite, its final
sensitivity measured on test pairs, and recorded as a child of the report's MLflow parent run. SNS forks
from its seed's base-method run after its warm-up (the same epochs, trained once). The parent run gets
per-seed results, mean ± std across seeds, paired per-seed differences (e.g. SNS - PGD-AT) with a 95%
interval, a bar plot, and the table printed in the terminal. Final models are copied to
<checkpoint_dir>/<config name>-<config hash>/<label>-seed<k>.pt for `analyze compare` / `analyze stabilize`.
"""

from __future__ import annotations

import logging
import math
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from analyses.config import MethodsConfig
from analyses.plots import methods_figure
from analyses.report import ReportWriter
from orchestrator.config import settings_text
from orchestrator.ray_runtime import trial_resources
from orchestrator.stats import paired_difference, points
from orchestrator.tracking import config_hash, git_commit
from orchestrator.trial import STATE_FILE
from orchestrator.tuning import TrialLog, TrialSpec, nslab_settings, run_fixed

log = logging.getLogger(__name__)
METRICS = ("clean_acc", "robust_acc", "sensitivity_all", "relative_sensitivity_all")


@dataclass
class MethodsResult:
    per_seed: pa.Table
    summary: pa.Table
    paired: pa.Table
    paired_summary: pa.Table
    checkpoints: dict[tuple[str, int], Path]
    seconds: float


def rows_table(rows: list[dict]) -> pa.Table:
    """Rows -> table over the union of their keys (from_pylist alone takes the first row's keys: a failed
    first seed would drop every metric column)."""
    keys = list(dict.fromkeys(k for row in rows for k in row))
    return pa.Table.from_pylist([{k: row.get(k) for k in keys} for row in rows])


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else float("nan")


def summarize(per_seed: list[dict], labels: list[str]) -> list[dict]:
    """Mean and std (sample, across seeds) of each metric per method; failed seeds left out."""
    metrics = [*METRICS, *sorted({k for r in per_seed for k in r if k.startswith("acc_")})]
    out = []
    for label in labels:
        ok = [r for r in per_seed if r["method"] == label and r["status"] == "ok"]
        row: dict = {"method": label, "seeds_ok": len(ok),
                     "seeds_failed": sum(1 for r in per_seed if r["method"] == label and r["status"] != "ok")}
        for metric in metrics:
            values = [r[metric] for r in ok if r.get(metric) is not None]
            row[f"{metric}_mean"] = statistics.fmean(values) if values else float("nan")
            row[f"{metric}_std"] = _std(values)
        out.append(row)
    return out


def paired_differences(per_seed: list[dict], pairs: list[tuple[str, str]]) -> tuple[list[dict], list[dict]]:
    """Per seed a - b for each metric (seeds where both succeeded), and their mean, std, 95% CI and wins."""
    by = {(r["method"], r["seed"]): r for r in per_seed if r["status"] == "ok"}
    rows, summary = [], []
    for a, b in pairs:
        for metric in METRICS:
            values = {side: {s: by[m, s][metric] for (m, s) in by if m == side and by[m, s].get(metric) is not None}
                      for side in (a, b)}
            diff = paired_difference(values[a], values[b])
            rows += [{"a": a, "b": b, "metric": metric, "seed": s, "a_value": values[a][s], "b_value": values[b][s],
                      "difference": d} for s, d in zip(diff.seeds, diff.differences, strict=True)]
            low, high = diff.ci95
            summary.append({"a": a, "b": b, "metric": metric, "seeds": diff.n, "mean": diff.mean, "std": diff.std,
                            "ci95_low": low, "ci95_high": high, "min": min(diff.differences, default=math.nan),
                            "max": max(diff.differences, default=math.nan), "a_higher": diff.wins,
                            "verdict": diff.verdict()})
    return rows, summary


def _pm(mean: float, std: float, scale: float = 100.0, digits: int = 1) -> str:
    if math.isnan(mean):
        return "n/a"
    spread = "" if math.isnan(std) else f" ± {std * scale:.{digits}f}"
    return f"{mean * scale:.{digits}f}{spread}"


def format_table(summary: list[dict], paired: list[dict], robust_name: str) -> str:
    """The terminal table: accuracy in %, sensitivity as measured, mean ± std across seeds, then the pairs."""
    lines = [f"{'method':<14}{'seeds':>6}  {'clean %':>12}  {f'robust % ({robust_name})':>24}  {'sens abs':>17}  "
             f"{'sens rel':>15}"]
    for r in summary:
        lines.append(f"{r['method']:<14}{r['seeds_ok']:>6}  {_pm(r['clean_acc_mean'], r['clean_acc_std']):>12}  "
                     f"{_pm(r['robust_acc_mean'], r['robust_acc_std']):>24}  "
                     f"{_pm(r['sensitivity_all_mean'], r['sensitivity_all_std'], 1, 4):>17}  "
                     f"{_pm(r['relative_sensitivity_all_mean'], r['relative_sensitivity_all_std'], 1, 3):>15}")
    for p in paired:
        if p["metric"] in ("clean_acc", "robust_acc"):
            low, high = p["ci95_low"], p["ci95_high"]
            interval = "" if math.isnan(low) else f", 95% CI {points(low)} to {points(high)}"
            spread = "" if math.isnan(p["std"]) else f" ± {points(p['std'], sign=False)}"
            lines.append(f"paired {p['a']} - {p['b']} {p['metric']}: {points(p['mean'])}{spread} points over "
                         f"{p['seeds']} seeds ({p['a']} higher in {p['a_higher']}/{p['seeds']}{interval}): "
                         f"{p['verdict']}")
    return "\n".join(lines)


def _per_seed_row(label: str, method: str, seed: int, result) -> dict:
    metrics = result.metrics or {}
    ok = result.error is None and bool(metrics.get("final"))
    row = {"method": label, "objective": method, "seed": seed, "status": "ok" if ok else "failed",
           "error": "" if ok else str(result.error or "did not finish").splitlines()[0][:500],
           "mlflow_run_id": metrics.get("mlflow_run_id")}
    if ok:
        row.update({"clean_acc": metrics["test/clean_acc"], "robust_acc": metrics["test/robust_acc"],
                    "sensitivity_all": metrics.get("test/sensitivity_all"),
                    "relative_sensitivity_all": metrics.get("test/relative_sensitivity_all"),
                    "epochs": int(metrics["epoch"]), "masking_flags": int(metrics.get("test/flags", 0)),
                    **{f"acc_{k.removeprefix('test/').removesuffix('_acc')}": v for k, v in metrics.items()
                       if k.startswith("test/") and k.endswith("_acc") and k not in ("test/clean_acc",
                                                                                    "test/robust_acc")}})
    return row


def run_methods(config: MethodsConfig, writer: ReportWriter, checkpoint_dir: Path, storage: str,
                keep_gpu: bool = False) -> MethodsResult:
    """Train every (method, seed) as a Tune trial, then write the parent's report."""
    start = time.perf_counter()
    tag = f"{config.name}-{config_hash(config.model_dump(mode='json', exclude={'resources', 'tracking', 'storage'}))}"
    run_dir = (checkpoint_dir / tag).resolve()
    specs = [TrialSpec(f"{entry.label}-seed{seed}", "method", config.experiment_for(entry, seed), evaluate=True,
                       settings={"method_label": entry.label})
             for seed in config.seeds for entry in config.methods]
    params = {"config": config.model_dump(mode="json"), "checkpoint_dir": str(run_dir)}
    with writer.parent(f"methods-{config.name}", params=params,
                       tags={"nslab.analysis": "methods", "nslab.git_commit": git_commit(),
                             "nslab.config_hash": tag}) as report:
        writer.text(report, settings_text(config), "methods/config.yaml")
        settings = {"tracking_uri": writer.tracking_uri(), "mlflow_experiment": writer.experiment_name(),
                    "parent_run_id": report.run_id, "study": tag, "cpus": config.resources.cpu}
        resources = trial_resources(config.resources.cpu, config.resources.gpu, keep_gpu)
        progress = TrialLog(settings["tracking_uri"], settings["mlflow_experiment"],
                            ["test/clean_acc", "test/robust_acc"])
        grid = run_fixed(specs, settings, storage, tag, resources, max_failures=config.max_failures,
                         share_warmup=config.share_warmup, callbacks=[progress])
        per_seed, checkpoints = [], {}
        for result in grid:
            nslab = nslab_settings(result.config)
            label, seed = nslab["method_label"], int(result.config["spec"]["experiment"]["train"]["seed"])
            row = _per_seed_row(label, result.config["spec"]["experiment"]["method"], seed, result)
            per_seed.append(row)
            if row["status"] == "ok" and result.checkpoint is not None:
                checkpoints[label, seed] = _copy_final(result.checkpoint, run_dir / f"{label}-seed{seed}.pt")
        order = {(e.label, s): i for i, (s, e) in enumerate((s, e) for s in config.seeds for e in config.methods)}
        per_seed.sort(key=lambda r: order[r["method"], r["seed"]])
        labels = [m.label for m in config.methods]
        summary = summarize(per_seed, labels)
        paired, paired_summary = paired_differences(per_seed, [tuple(p) for p in config.paired])
        tables = {"methods/per_seed.parquet": rows_table(per_seed), "methods/summary.parquet": rows_table(summary),
                  "methods/paired.parquet": rows_table(paired),
                  "methods/paired_summary.parquet": rows_table(paired_summary)}
        for path, table in tables.items():
            writer.table(report, table, path)
        suite = ", ".join(a.label for a in config.experiment.final_suite())
        subtitle = (f"{config.experiment.dataset} / {config.experiment.model}; robust = worst case over {suite} "
                    f"on test; {len(config.seeds)} seeds, {config.experiment.train.epochs} epochs each")
        writer.figure(report, methods_figure(per_seed, summary, paired, labels, subtitle), "plots/methods_accuracy.png")
        writer.metrics(report, {f"{r['method']}.{m}_mean": r[f"{m}_mean"] for r in summary for m in METRICS})
    return MethodsResult(tables["methods/per_seed.parquet"], tables["methods/summary.parquet"],
                         tables["methods/paired.parquet"], tables["methods/paired_summary.parquet"],
                         checkpoints, time.perf_counter() - start)


def _copy_final(checkpoint, target: Path) -> Path:
    """The trial's last Tune checkpoint (local or remote storage) as one .pt file on this machine."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with checkpoint.as_directory() as directory:
        shutil.copyfile(Path(directory) / STATE_FILE, target)
    return target
