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

from analyses.plots import methods_figure
from analyses.writer import ReportWriter
from orchestrator.config.analysis import MethodsConfig
from orchestrator.config.loader import settings_text
from orchestrator.execution.phases import TrialLog, run_fixed
from orchestrator.execution.ray_session import trial_resources
from orchestrator.execution.trainable import STATE_FILE
from orchestrator.execution.trial_outcome import TrialOutcome
from orchestrator.execution.trial_settings import Record, Role, TrialSettings
from orchestrator.record import tags
from orchestrator.record.tracking import config_hash, git_commit
from orchestrator.results import Status, mean_std, rows_table, verdict_sentence
from orchestrator.study.decision import decide, paired_difference, probability_of_improvement

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


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else float("nan")


def summarize(per_seed: list[dict], labels: list[str]) -> list[dict]:
    """Mean and std (sample, across seeds) of each metric per method; failed seeds left out."""
    metrics = [*METRICS, *sorted({k for r in per_seed for k in r if k.startswith("acc_")})]
    out = []
    for label in labels:
        ok = [r for r in per_seed if r["method"] == label and r["status"] == Status.COMPLETE]
        row: dict = {"method": label, "seeds_ok": len(ok),
                     "seeds_failed": sum(r["method"] == label and r["status"] != Status.COMPLETE for r in per_seed)}
        for metric in metrics:
            values = [r[metric] for r in ok if r.get(metric) is not None]
            row[f"{metric}_mean"] = statistics.fmean(values) if values else float("nan")
            row[f"{metric}_std"] = _std(values)
        out.append(row)
    return out


def paired_differences(per_seed: list[dict], pairs: list[tuple[str, str]],
                       margin: float = 0.01) -> tuple[list[dict], list[dict]]:
    """Per seed a - b for each metric (seeds where both completed), and their mean, std, 95% CI, wins, paired
    bootstrap probability and decision (orchestrator/study/decision.py)."""
    by = {(r["method"], r["seed"]): r for r in per_seed if r["status"] == Status.COMPLETE}
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
                            "p_improvement": probability_of_improvement(diff), "decision": str(decide(diff, margin)),
                            "verdict": verdict_sentence(f"{a} vs {b} ({metric})", a, b, diff, None,
                                                        robust_name=metric.removesuffix("_acc"), margin=margin)})
    return rows, summary


def format_table(summary: list[dict], paired: list[dict], robust_name: str) -> str:
    """The terminal table: accuracy in %, sensitivity as measured, mean ± std across seeds, then the pairs."""
    lines = [f"{'method':<14}{'seeds':>6}  {'clean %':>12}  {f'robust % ({robust_name})':>24}  {'sens abs':>17}  "
             f"{'sens rel':>15}"]
    for r in summary:
        lines.append(f"{r['method']:<14}{r['seeds_ok']:>6}  {mean_std(r['clean_acc_mean'], r['clean_acc_std']):>12}  "
                     f"{mean_std(r['robust_acc_mean'], r['robust_acc_std']):>24}  "
                     f"{mean_std(r['sensitivity_all_mean'], r['sensitivity_all_std'], 1, 4):>17}  "
                     f"{mean_std(r['relative_sensitivity_all_mean'], r['relative_sensitivity_all_std'], 1, 3):>15}")
    lines += [f"paired {p['verdict']}" for p in paired if p["metric"] in ("clean_acc", "robust_acc")]
    return "\n".join(lines)


def _per_seed_row(settings: TrialSettings, result) -> dict:
    outcome = TrialOutcome.of_result(result)
    metrics, ok = outcome.metrics, outcome.ok
    row = {"method": settings.arm, "objective": settings.method, "seed": settings.seed, "status": str(outcome.status),
           "error": "" if ok else (outcome.error or "did not finish").splitlines()[0][:500],
           "mlflow_run_id": outcome.mlflow_run_id}
    if ok:
        row.update({"clean_acc": metrics["test/clean_acc"], "robust_acc": metrics["test/robust_acc"],
                    "sensitivity_all": metrics.get("test/sensitivity_all"),
                    "relative_sensitivity_all": metrics.get("test/relative_sensitivity_all"),
                    "epochs": outcome.epoch, "masking_flags": int(metrics.get("test/flags", 0)),
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
    params = {"config": config.model_dump(mode="json"), "checkpoint_dir": str(run_dir)}
    with writer.parent(f"methods-{config.name}", params=params,
                       tags={tags.ANALYSIS: "methods", tags.GIT_COMMIT: git_commit(),
                             tags.CONFIG_HASH: tag}) as report:
        writer.text(report, settings_text(config), "methods/config.yaml")
        record = Record(writer.tracking_uri(), writer.experiment_name(), report.run_id, tag)
        trials = [TrialSettings(role=Role.METHOD, label=f"{entry.label}-seed{seed}", arm=entry.label, record=record,
                                experiment=config.experiment_for(entry, seed).model_dump(mode="json"), evaluate=True)
                  for seed in config.seeds for entry in config.methods]
        resources = trial_resources(config.resources.cpu, config.resources.gpu, keep_gpu)
        progress = TrialLog(record.tracking_uri, record.mlflow_experiment, ["test/clean_acc", "test/robust_acc"],
                            phase="methods")
        grid = run_fixed(trials, storage, tag, resources, record=record, max_failures=config.max_failures,
                         share_warmup=config.share_warmup, callbacks=[progress])
        per_seed, checkpoints = [], {}
        for result in grid:
            settings = TrialSettings.of(result.config)
            row = _per_seed_row(settings, result)
            per_seed.append(row)
            label, seed = settings.arm, settings.seed
            if row["status"] == Status.COMPLETE and result.checkpoint is not None:
                checkpoints[label, seed] = _copy_final(result.checkpoint, run_dir / f"{label}-seed{seed}.pt")
        order = {(e.label, s): i for i, (s, e) in enumerate((s, e) for s in config.seeds for e in config.methods)}
        per_seed.sort(key=lambda r: order[r["method"], r["seed"]])
        labels = [m.label for m in config.methods]
        summary = summarize(per_seed, labels)
        paired, paired_summary = paired_differences(per_seed, [tuple(p) for p in config.paired], config.margin / 100)
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
