"""Arrow schemas and the study's tables, built from its trial rows (docs/design.md, "Artifacts").

Per run (MLflow artifacts, written by orchestrator/run.py): sensitivity/epoch_NNN.parquet,
    sensitivity/sensitivity_per_layer.png, eval/robust_accuracy.parquet, eval/checks.parquet
Per study (on the parent run): study/trials.parquet, study/pareto.parquet, study/param_importances.parquet,
    study/compute.parquet, study/rung_correlation.parquet, study/expected_best.parquet, study/confirmation.parquet,
    the PNGs beside them, study/report.md and study/verdict.txt

    table = trials_table(rows, study.search_space, ["val/robust_acc", "val/clean_acc"])
    compute = compute_table(rows, "val/robust_acc", "max")     # best so far against cumulative training time
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from orchestrator.config.search_space import ParamSpec
from orchestrator.results import Status, finite

TRIAL_FIELDS = [
    pa.field("trial_id", pa.string()), pa.field("replicate", pa.int32()), pa.field("arm", pa.string()),
    pa.field("number", pa.int32()), pa.field("sequence", pa.int32()), pa.field("label", pa.string()),
    pa.field("role", pa.string()), pa.field("status", pa.string()),
    pa.field("failure_reason", pa.string()), pa.field("epochs", pa.int32()), pa.field("budget_epochs", pa.int32()),
    pa.field("forked_at", pa.int32()), pa.field("best_epoch", pa.int32()), pa.field("wall_seconds", pa.float64()),
    pa.field("train_seconds", pa.float64()), pa.field("regularized_epoch_seconds", pa.float64()),
    pa.field("base_epoch_seconds", pa.float64()), pa.field("finished_at", pa.float64()),
    pa.field("sensitivity_selected", pa.float64()), pa.field("sensitivity_all", pa.float64()),
    pa.field("mlflow_run_id", pa.string()),
]  # then one `param.<path>` column per searched parameter and one column per objective metric (validation)
IMPORTANCE_SCHEMA = pa.schema([("objective", pa.string()), ("param", pa.string()), ("importance", pa.float64()),
                               ("trials", pa.int32())])
COMPUTE_SCHEMA = pa.schema([
    ("arm", pa.string()), ("order", pa.int32()), ("label", pa.string()), ("status", pa.string()),
    ("train_seconds", pa.float64()), ("cumulative_train_seconds", pa.float64()), ("epochs", pa.int32()),
    ("cumulative_epochs", pa.int32()), ("value", pa.float64()), ("best_so_far", pa.float64())])
EXPECTED_BEST_SCHEMA = pa.schema([("arm", pa.string()), ("trials", pa.int32()), ("expected_best", pa.float64()),
                                  ("low", pa.float64()), ("high", pa.float64())])  # orchestrator/study/budget.py
RUNG_SCHEMA = pa.schema([("arm", pa.string()), ("rung", pa.float64()), ("rung_epoch", pa.int32()),
                         ("trials", pa.int32()), ("spearman_rho", pa.float64())])  # rung: a share of each trial's
# epochs; rung_epoch: where the longest schedule meets it


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
        for column in schema:
            value = row.get(column.name)
            if isinstance(value, float) and math.isnan(value):
                value = None
            if value is not None and pa.types.is_string(column.type) and not isinstance(value, str):
                value = json.dumps(value)
            columns[column.name].append(value)
    return pa.table(columns, schema=schema)


def compute_table(rows: Sequence[Mapping[str, Any]], metric: str, mode: str) -> pa.Table:
    """Per arm, its trials in the order they finished: training seconds and epochs, cumulative, and the best
    primary objective of a completed trial so far (stopped trials cost compute but are not candidates)."""
    out = []
    for arm in dict.fromkeys(r["arm"] for r in rows):
        mine = sorted((r for r in rows if r["arm"] == arm and r.get("finished_at") is not None),
                      key=lambda r: r["finished_at"])
        seconds, epochs, best = 0.0, 0, None
        for order, row in enumerate(mine, start=1):
            seconds += row.get("train_seconds") or 0.0
            trained = (row.get("epochs") or 0) - (row.get("forked_at") or 0)
            epochs += max(trained, 0)
            value = row.get(metric)
            if row["status"] == Status.COMPLETE and finite(value):
                best = value if best is None or (value > best if mode == "max" else value < best) else best
            out.append({"arm": arm, "order": order, "label": row["label"], "status": str(row["status"]),
                        "train_seconds": row.get("train_seconds"), "cumulative_train_seconds": seconds,
                        "epochs": max(trained, 0), "cumulative_epochs": epochs,
                        "value": value if finite(value) else None, "best_so_far": best})
    return pa.Table.from_pylist(out, schema=COMPUTE_SCHEMA)


def rung_table(rows: Sequence[Mapping[str, Any]], histories: Mapping[str, Mapping[int, float]],
               rungs: Sequence[float], metric: str, max_epochs: int) -> pa.Table:
    """Per arm and rung (a share of each trial's own epochs; execution/search.py rungs): Spearman's rank
    correlation between each completed trial's validation metric at the rung and its final one (how far the
    cheap signal ASHA stops trials on can be trusted), over every replicate's trials; NaN below 3 trials."""
    from scipy.stats import spearmanr

    from orchestrator.execution.search import rung_epoch

    out = []
    for arm in dict.fromkeys(r["arm"] for r in rows):
        done = [r for r in rows if r["arm"] == arm and r["status"] == Status.COMPLETE and finite(r.get(metric))]
        for rung in rungs:
            at = {r["trial_id"]: rung_epoch(rung, r.get("budget_epochs") or max_epochs) for r in done}
            pairs = [(histories[r["trial_id"]][at[r["trial_id"]]], r[metric]) for r in done
                     if finite(histories.get(r["trial_id"], {}).get(at[r["trial_id"]]))
                     and at[r["trial_id"]] < (r.get("epochs") or 0)]
            rho = math.nan
            if len(pairs) >= 3 and len({a for a, _ in pairs}) > 1 and len({b for _, b in pairs}) > 1:
                rho = float(spearmanr([a for a, _ in pairs], [b for _, b in pairs]).statistic)
            out.append({"arm": arm, "rung": rung, "rung_epoch": rung_epoch(rung, max_epochs), "trials": len(pairs),
                        "spearman_rho": rho})
    return pa.Table.from_pylist(out, schema=RUNG_SCHEMA)


def write_table(table: pa.Table, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path
