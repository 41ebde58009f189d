"""Arrow schemas and Parquet writers for study results.

Per run (MLflow artifacts, written by orchestrator/run.py): sensitivity/epoch_NNN.parquet,
    sensitivity/sensitivity_per_layer.png, eval/robust_accuracy.parquet, eval/checks.parquet
Per study (on the parent run): study/trials.parquet, study/pareto.parquet, study/param_importances.parquet,
    study/confirmation.parquet and the PNGs beside them

    table = trials_table(rows, study.search_space, ["val/robust_acc", "val/clean_acc"])
    front = pareto_mask(rows, [("val/robust_acc", "max"), ("val/clean_acc", "max")], epochs=10)
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from orchestrator.study_config import ParamSpec

TRIAL_FIELDS = [
    pa.field("trial_id", pa.string()), pa.field("number", pa.int32()), pa.field("role", pa.string()),
    pa.field("status", pa.string()), pa.field("failure_reason", pa.string()), pa.field("epochs", pa.int32()),
    pa.field("forked_at", pa.int32()), pa.field("best_epoch", pa.int32()), pa.field("wall_seconds", pa.float64()),
    pa.field("train_seconds", pa.float64()), pa.field("sensitivity_selected", pa.float64()),
    pa.field("sensitivity_all", pa.float64()), pa.field("mlflow_run_id", pa.string()),
]  # then one `param.<path>` column per searched parameter and one column per objective metric (validation)
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
    Optuna as COMPLETE too, so the status and the last epoch decide) and dominated by no other."""
    def values(row):
        return [row[m] if mode == "max" else -row[m] for m, mode in objectives]

    eligible = [row.get("status") == COMPLETE and row.get("epochs") == epochs
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
