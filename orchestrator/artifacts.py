"""Arrow schemas and Parquet writers for study results, and the per-run logging that Tune trials and
single runs (pipelines.train) share.

Per run (MLflow artifacts, DESIGN.md):   sensitivity/epoch_NNN.parquet, sensitivity/sensitivity_per_layer.png,
                                         eval/robust_accuracy.parquet
Per study (on the parent run):          study/trials.parquet, study/pareto.parquet,
                                         study/param_importances.parquet and the PNGs beside them

    logger = RunLogger(tracker, run_id)
    trainer = build_trainer(spec, callbacks=[lambda m, t: logger.log_epoch(m, t)], data=data)
    trainer.fit()
    report, final = logger.log_final(trainer, data, spec)
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from orchestrator.config import ParamSpec

log = logging.getLogger(__name__)

TRIAL_FIELDS = [
    pa.field("trial_id", pa.string()), pa.field("number", pa.int32()), pa.field("status", pa.string()),
    pa.field("failure_reason", pa.string()), pa.field("training_iterations", pa.int32()),
    pa.field("best_epoch", pa.int32()), pa.field("wall_seconds", pa.float64()),
    pa.field("train_seconds", pa.float64()), pa.field("sensitivity_selected", pa.float64()),
    pa.field("sensitivity_all", pa.float64()), pa.field("test_clean_acc", pa.float64()),
    pa.field("test_worst_case_acc", pa.float64()), pa.field("mlflow_run_id", pa.string()),
]  # then one `param.<path>` column per searched parameter and one column per objective metric
IMPORTANCE_SCHEMA = pa.schema([("objective", pa.string()), ("param", pa.string()), ("importance", pa.float64())])
COMPLETE = "TERMINATED"  # trained every epoch; STOPPED_EARLY (ASHA), ERROR and INCOMPLETE are the others


def param_type(spec: ParamSpec) -> pa.DataType:
    if spec.type == "float":
        return pa.float64()
    if spec.type == "int":
        return pa.int64()
    choices = spec.choices or []
    if all(isinstance(c, bool) for c in choices):
        return pa.bool_()
    if all(isinstance(c, int | float) and not isinstance(c, bool) for c in choices):
        return pa.float64()
    return pa.string()  # strings, and lists/dicts as JSON


def trials_schema(search_space: Mapping[str, ParamSpec], objectives: Sequence[str]) -> pa.Schema:
    params = [pa.field(f"param.{path}", param_type(spec)) for path, spec in search_space.items()]
    return pa.schema(TRIAL_FIELDS + params + [pa.field(metric, pa.float64()) for metric in objectives])


def trials_table(rows: Sequence[Mapping[str, Any]], search_space: Mapping[str, ParamSpec],
                 objectives: Sequence[str]) -> pa.Table:
    """rows: flat dicts with TRIAL_FIELDS' names, `param.<path>` and objective keys (missing -> null)."""
    schema = trials_schema(search_space, objectives)
    columns = {name: [] for name in schema.names}
    for row in rows:
        for field in schema:
            value = row.get(field.name)
            if isinstance(value, float) and math.isnan(value):
                value = None
            if value is not None and pa.types.is_string(field.type) and not isinstance(value, str):
                value = json.dumps(value)
            columns[field.name].append(value)
    return pa.table(columns, schema=schema)


def pareto_mask(rows: Sequence[Mapping[str, Any]], objectives: Sequence[tuple[str, str]],
                epochs: int) -> list[bool]:
    """True for trials on the Pareto front: completed (every epoch trained; ASHA-stopped trials reach
    Optuna as COMPLETE too, so the status and iteration count decide) and dominated by no other."""
    def values(row):
        return [row[m] if mode == "max" else -row[m] for m, mode in objectives]

    eligible = [row.get("status") == COMPLETE and row.get("training_iterations") == epochs
                and all(row.get(m) is not None and not math.isnan(row[m]) for m, _ in objectives) for row in rows]
    points = [values(row) if ok else None for row, ok in zip(rows, eligible, strict=True)]

    def dominated(p):
        return any(q is not None and q != p and all(a >= b for a, b in zip(q, p, strict=True)) for q in points)

    return [p is not None and not dominated(p) for p in points]


def write_table(table: pa.Table, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def final_metrics(report) -> dict[str, float]:
    """A RobustnessReport as flat metrics: test_clean_acc, test_<attack>_acc, ..., test_worst_case_acc."""
    metrics: dict[str, float] = {}
    for row in report.rows:
        key = f"test_{row['attack']}_acc"
        if key in metrics:  # the same attack twice (e.g. two eps): name it fully
            key = f"test_{row['attack']}_{row['norm']}_eps{row['eps']:g}_s{row['steps']}_acc"
        metrics[key] = row["accuracy"]
    return metrics


class RunLogger:
    """Logs one training run into its MLflow run: per-epoch metrics and sensitivity tables, then the
    final test-split evaluation (Parquet) and the per-layer sensitivity plot."""

    def __init__(self, tracker, run_id: str) -> None:
        self.tracker = tracker
        self.run_id = run_id

    def log_epoch(self, metrics: Mapping[str, Any], trainer) -> None:
        epoch = int(metrics["epoch"])
        numbers = {k: v for k, v in metrics.items() if k != "epoch" and isinstance(v, int | float)}
        self.tracker.log_metrics(self.run_id, numbers, step=epoch)
        if trainer.last_sensitivity is not None:
            table = trainer.last_sensitivity.to_arrow(selected=trainer.selected())
            pairs = {"attack": "pgd", "norm": "linf", "eps": trainer.config.val_eps,  # how x' was made
                     "steps": trainer.config.val_steps, "epoch": epoch}
            metadata = {**(table.schema.metadata or {}), **{k.encode(): str(v).encode() for k, v in pairs.items()}}
            self.tracker.log_table(self.run_id, table.replace_schema_metadata(metadata),
                                   f"sensitivity/epoch_{epoch:03d}.parquet")

    def log_final(self, trainer, data, spec) -> tuple[Any, dict[str, float]]:
        """Evaluate on the test split with spec.eval_attacks; log the table, the plot and test_* metrics."""
        from ns_core.experiment import evaluate
        from orchestrator.plots import sensitivity_figure

        report = evaluate(trainer.model, data, spec)
        metrics = final_metrics(report)
        self.tracker.log_table(self.run_id, report.to_arrow(), "eval/robust_accuracy.parquet")
        self.tracker.log_metrics(self.run_id, metrics, step=trainer.epoch)
        self.tracker.set_tags(self.run_id, {"sanity_passed": report.sanity_passed})
        if trainer.last_sensitivity is not None:
            figure = sensitivity_figure(trainer.last_sensitivity, trainer.selected(),
                                        title=f"neuron sensitivity after epoch {trainer.epoch}")
            self.tracker.log_figure(self.run_id, figure, "sensitivity/sensitivity_per_layer.png")
        return report, metrics
