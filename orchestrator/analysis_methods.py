"""`analyze methods`: standard, PGD-AT, TRADES and SNS under one budget and seed set (claim 3).

Every (method, seed) trains as one Ray task (`train_method`): resume from its checkpoint if one
exists, train, evaluate the test split with the config's attack suite, and measure the final
model's neuron sensitivity against its own PGD. The driver logs each task as a child run when it
finishes and writes, on the parent run: per-seed results, mean +/- std across seeds, paired
per-seed differences (e.g. SNS - PGD-AT), a bar plot, and the table printed in the terminal.

Checkpoints go to <checkpoint_dir>/<config name>-<config hash>/<label>-seed<k>.pt (absolute), so a
re-run resumes and `analyze compare` / `analyze stabilize` can read the trained models.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from ns_core.experiment import ExperimentSpec, build_trainer, evaluate, load_data
from ns_core.interpret import attack_batches
from ns_core.sensitivity import measure_sensitivity
from ns_core.training import first_examples
from orchestrator.analysis_config import MethodsConfig
from orchestrator.analysis_report import ReportWriter
from orchestrator.parallel import TaskOutcome, run_tasks
from orchestrator.report_plots import methods_figure
from orchestrator.tracking import config_hash, git_commit

log = logging.getLogger(__name__)


def train_method(spec: dict, checkpoint: str, sensitivity: dict) -> dict:
    """One Ray task: train (resuming from `checkpoint`), evaluate, measure the final sensitivity."""
    spec_ = ExperimentSpec.from_dict(spec)
    start = time.perf_counter()
    data = load_data(spec_)
    trainer = build_trainer(spec_, [lambda _metrics, t: t.save_checkpoint(checkpoint)], data)
    if Path(checkpoint).exists():
        trainer.load_checkpoint(checkpoint)
    resumed_at = trainer.epoch
    trainer.fit()
    trainer.save_checkpoint(checkpoint)
    train_seconds = time.perf_counter() - start
    model = trainer.model.eval()
    start = time.perf_counter()
    report = evaluate(model, data, spec_)
    x, y = first_examples(data.test, sensitivity["examples"])
    x_adv = attack_batches(model, x, y, eps=sensitivity["eps"], steps=sensitivity["steps"], seed=spec_.train.seed)
    device = trainer.device
    smap = measure_sensitivity(model, [(x.to(device), x_adv)], sensitivity["layers"] or model.default_layers,
                               metadata={"model": spec_.model, "dataset": spec_.dataset, "attack": "pgd",
                                         "eps": sensitivity["eps"], "steps": sensitivity["steps"]})
    return {"history": trainer.history, "eval": report.to_arrow(), "sanity_passed": report.sanity_passed,
            "sensitivity": smap.to_arrow(), "sensitivity_all": smap.mean(),
            "relative_sensitivity_all": smap.mean(relative=True), "layer_means": smap.layer_means(),
            "relative_layer_means": smap.layer_means(relative=True), "train_seconds": train_seconds,
            "eval_seconds": time.perf_counter() - start, "device": str(device), "resumed_at_epoch": resumed_at,
            "checkpoint": checkpoint, "checkpoint_bytes": Path(checkpoint).read_bytes()}


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


def _per_seed_row(label: str, method: str, seed: int, outcome: TaskOutcome) -> dict:
    row = {"method": label, "objective": method, "seed": seed, "status": "ok" if outcome.ok else "failed",
           "error": outcome.error or ""}
    if not outcome.ok:
        return row
    value = outcome.value
    rows = value["eval"].to_pylist()
    row.update({"clean_acc": rows[0]["accuracy"], "robust_acc": rows[-1]["accuracy"],
                **{f"acc_{r['attack']}": r["accuracy"] for r in rows[1:-1]},
                "sensitivity_all": value["sensitivity_all"],
                "relative_sensitivity_all": value["relative_sensitivity_all"],
                "epochs": len(value["history"]), "resumed_at_epoch": value["resumed_at_epoch"],
                "train_seconds": value["train_seconds"]})  # this invocation's: small when resumed
    return row


METRICS = ("clean_acc", "robust_acc", "sensitivity_all", "relative_sensitivity_all")


def summarize(per_seed: list[dict], labels: list[str]) -> list[dict]:
    """Mean, std (sample, across seeds), min and max of each metric per method; failed seeds left out."""
    metrics = [*METRICS, *sorted({k for r in per_seed for k in r if k.startswith("acc_")})]
    out = []
    for label in labels:
        ok = [r for r in per_seed if r["method"] == label and r["status"] == "ok"]
        row: dict = {"method": label, "seeds_ok": len(ok), "seeds_failed": sum(
            1 for r in per_seed if r["method"] == label and r["status"] != "ok")}
        for metric in metrics:
            values = [r[metric] for r in ok if metric in r]
            row[f"{metric}_mean"] = statistics.fmean(values) if values else float("nan")
            row[f"{metric}_std"] = _std(values)
        out.append(row)
    return out


def paired_differences(per_seed: list[dict], pairs: list[tuple[str, str]]) -> tuple[list[dict], list[dict]]:
    """Per seed a - b for each metric (seeds where both succeeded), and their mean, std, min, max, wins."""
    by = {(r["method"], r["seed"]): r for r in per_seed if r["status"] == "ok"}
    rows, summary = [], []
    for a, b in pairs:
        seeds = sorted(s for (m, s) in by if m == a and (b, s) in by)
        for metric in METRICS:
            diffs = []
            for seed in seeds:
                va, vb = by[a, seed][metric], by[b, seed][metric]
                rows.append({"a": a, "b": b, "metric": metric, "seed": seed, "a_value": va, "b_value": vb,
                             "difference": va - vb})
                diffs.append(va - vb)
            summary.append({"a": a, "b": b, "metric": metric, "seeds": len(diffs),
                            "mean": statistics.fmean(diffs) if diffs else float("nan"), "std": _std(diffs),
                            "min": min(diffs, default=float("nan")), "max": max(diffs, default=float("nan")),
                            "a_higher": sum(d > 0 for d in diffs)})
    return rows, summary


def _pm(mean: float, std: float, scale: float = 100.0, digits: int = 1) -> str:
    if math.isnan(mean):
        return "n/a"
    spread = "" if math.isnan(std) else f" ± {std * scale:.{digits}f}"
    return f"{mean * scale:.{digits}f}{spread}"


def format_table(summary: list[dict], paired: list[dict]) -> str:
    """The terminal table: accuracy in %, sensitivity as measured, mean ± std across seeds."""
    lines = [f"{'method':<10}{'seeds':>6}  {'clean %':>12}  {'robust % (worst)':>17}  {'sens abs':>17}  "
             f"{'sens rel':>15}"]
    for r in summary:
        lines.append(f"{r['method']:<10}{r['seeds_ok']:>6}  {_pm(r['clean_acc_mean'], r['clean_acc_std']):>12}  "
                     f"{_pm(r['robust_acc_mean'], r['robust_acc_std']):>17}  "
                     f"{_pm(r['sensitivity_all_mean'], r['sensitivity_all_std'], 1, 4):>17}  "
                     f"{_pm(r['relative_sensitivity_all_mean'], r['relative_sensitivity_all_std'], 1, 3):>15}")
    for p in paired:
        if p["metric"] in ("clean_acc", "robust_acc"):
            lines.append(f"paired {p['a']} - {p['b']} {p['metric']}: {_pm(p['mean'], p['std'])} points "
                         f"over {p['seeds']} seeds (min {p['min'] * 100:+.1f}, max {p['max'] * 100:+.1f}; "
                         f"{p['a']} higher in {p['a_higher']}/{p['seeds']})")
    return "\n".join(lines)


def _log_child(writer: ReportWriter, child, outcome: TaskOutcome) -> None:
    if not outcome.ok:
        writer.tags(child, {"nslab.error": outcome.error})
        writer.end(child, "FAILED")
        return
    value = outcome.value
    for metrics in value["history"]:
        writer.metrics(child, {k: v for k, v in metrics.items() if k != "epoch"}, step=int(metrics["epoch"]))
    rows = value["eval"].to_pylist()
    final = {"test_clean_acc": rows[0]["accuracy"], "test_robust_acc": rows[-1]["accuracy"],
             "final_sensitivity_all": value["sensitivity_all"],
             "final_relative_sensitivity_all": value["relative_sensitivity_all"],
             "train_seconds": value["train_seconds"], "eval_seconds": value["eval_seconds"],
             **{f"test_acc_{r['attack']}": r["accuracy"] for r in rows[1:-1]},
             **{f"final_sensitivity.{k}": v for k, v in value["layer_means"].items()},
             **{f"final_relative_sensitivity.{k}": v for k, v in value["relative_layer_means"].items()}}
    writer.metrics(child, final, step=len(value["history"]))
    writer.table(child, value["eval"], "eval/robust_accuracy.parquet")
    writer.table(child, value["sensitivity"], "sensitivity/final.parquet")
    writer.tags(child, {"nslab.checkpoint": value["checkpoint"], "nslab.device": value["device"],
                        "nslab.eval_sanity": "ok" if value["sanity_passed"] else "FAILED"})
    writer.end(child)


def run_methods(config: MethodsConfig, writer: ReportWriter, checkpoint_dir: Path) -> MethodsResult:
    """Train every (method, seed) as a Ray task, log children as they finish, write the parent's report."""
    start = time.perf_counter()
    run_dir = (checkpoint_dir / f"{config.name}-{config_hash(config.model_dump(exclude={'ray'}))}").resolve()
    jobs = [(entry, seed) for seed in config.seeds for entry in config.methods]
    sensitivity = {"examples": config.sensitivity.examples, "eps": config.sensitivity_eps(),
                   "steps": config.sensitivity.steps, "layers": config.sensitivity.layers}
    kwargs = [{"spec": config.spec(entry, seed).to_dict(), "checkpoint": str(run_dir / f"{entry.label}-seed{seed}.pt"),
               "sensitivity": sensitivity} for entry, seed in jobs]
    run_dir.mkdir(parents=True, exist_ok=True)
    params = {"config": config.model_dump(mode="json"), "checkpoint_dir": str(run_dir)}
    with writer.parent(f"methods-{config.name}", params=params,
                       tags={"nslab.analysis": "methods", "nslab.git_commit": git_commit()}) as report:
        children = [writer.start_child(report, f"{entry.label}-seed{seed}",
                                       params={"method": entry.method, "label": entry.label, "seed": seed,
                                               **{f"params.{k}": v for k, v in entry.params.items()}})
                    for entry, seed in jobs]
        logged: set[int] = set()

        def on_done(outcome: TaskOutcome) -> None:
            entry, seed = jobs[outcome.index]
            if outcome.ok and not Path(outcome.value["checkpoint"]).exists():  # trained on another machine
                Path(outcome.value["checkpoint"]).write_bytes(outcome.value["checkpoint_bytes"])
            _log_child(writer, children[outcome.index], outcome)
            logged.add(outcome.index)
            status = "done" if outcome.ok else f"FAILED ({outcome.error})"
            print(f"[{len(logged)}/{len(jobs)}] {entry.label} seed {seed}: {status}", flush=True)

        try:
            outcomes = run_tasks(train_method, kwargs, cpus_per_task=config.ray.cpus_per_task,
                                 gpus_per_task=config.ray.gpus_per_task, address=config.ray.address,
                                 num_cpus=config.ray.num_cpus, on_done=on_done)
        finally:
            for i, child in enumerate(children):
                if i not in logged:
                    writer.end(child, "FAILED")
        per_seed = [_per_seed_row(e.label, e.method, s, o) for (e, s), o in zip(jobs, outcomes, strict=True)]
        labels = [m.label for m in config.methods]
        summary = summarize(per_seed, labels)
        paired, paired_summary = paired_differences(per_seed, [tuple(p) for p in config.paired])
        tables = {"methods/per_seed.parquet": rows_table(per_seed), "methods/summary.parquet": rows_table(summary),
                  "methods/paired.parquet": rows_table(paired),
                  "methods/paired_summary.parquet": rows_table(paired_summary)}
        for path, table in tables.items():
            writer.table(report, table, path)
        attacks = ", ".join(a.spec().label for a in config.eval.attacks)
        subtitle = (f"{config.dataset} / {config.model}; attacks: {attacks} (robust = worst case); "
                    f"{len(config.seeds)} seeds, {config.train.get('epochs', 5)} epochs each")
        writer.figure(report, methods_figure(per_seed, summary, paired, labels, subtitle),
                      "plots/methods_accuracy.png")
        writer.metrics(report, {f"{r['method']}.{m}_mean": r[f"{m}_mean"] for r in summary for m in METRICS})
    checkpoints = {(e.label, s): Path(k["checkpoint"]) for (e, s), k, o in zip(jobs, kwargs, outcomes, strict=True)
                   if o.ok}
    return MethodsResult(tables["methods/per_seed.parquet"], tables["methods/summary.parquet"],
                         tables["methods/paired.parquet"], tables["methods/paired_summary.parquet"],
                         checkpoints, time.perf_counter() - start)
