"""Where an analysis report goes: an MLflow parent run with child runs, and/or a plain directory.

The same Parquet tables and PNG plots land in both: `--out DIR` gives DIR/<path> for the parent's
files and DIR/<child name>/<path> for a child's, for people who do not use MLflow.

    writer = ReportWriter(Tracker(uri, "nslab-analysis"), Path("out"))
    with writer.parent("compare", params={...}, tags={"nslab.analysis": "compare"}) as report:
        with writer.child(report, "pgd_at") as run:
            writer.table(run, table, "sensitivity/own.parquet")
        writer.figure(report, figure, "plots/sensitivity_by_layer.png")

A run whose block raises ends FAILED; the exception goes on.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from orchestrator.record.tracking import Tracker

log = logging.getLogger(__name__)
FIGURE_DPI = 120


@dataclass
class RunRef:
    """One run of a report: its MLflow run id (None without MLflow) and its folder under --out."""

    name: str
    run_id: str | None
    folder: Path | None


def safe_name(name: str) -> str:
    """A run name as a folder name: letters, digits, '.', '_' and '-' only."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "run"


class ReportWriter:
    def __init__(self, tracker: Tracker | None, out_dir: str | Path | None) -> None:
        if tracker is None and out_dir is None:
            raise ValueError("a report needs somewhere to go: an MLflow tracking URI, --out DIR, or both")
        self.tracker = tracker
        self.out_dir = Path(out_dir).resolve() if out_dir is not None else None
        self.files: list[Path] = []  # written under out_dir, in order

    def _start(self, name: str, folder: Path | None, parent: RunRef | None, params: Mapping[str, Any] | None,
               tags: Mapping[str, Any] | None) -> RunRef:
        run_id = None
        if self.tracker is not None:
            run_id = self.tracker.start_run(name, parent_run_id=parent.run_id if parent else None,
                                            params=params, tags={k: str(v) for k, v in (tags or {}).items()})
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
        return RunRef(name, run_id, folder)

    @contextlib.contextmanager
    def _run(self, ref: RunRef) -> Iterator[RunRef]:
        try:
            yield ref
        except BaseException as err:
            self.end(ref, "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
            raise
        self.end(ref)

    def parent(self, name: str, params: Mapping[str, Any] | None = None,
               tags: Mapping[str, Any] | None = None) -> contextlib.AbstractContextManager[RunRef]:
        return self._run(self._start(name, self.out_dir, None, params, tags))

    def child(self, parent: RunRef, name: str, params: Mapping[str, Any] | None = None,
              tags: Mapping[str, Any] | None = None) -> contextlib.AbstractContextManager[RunRef]:
        folder = parent.folder / safe_name(name) if parent.folder is not None else None
        return self._run(self._start(name, folder, parent, params, tags))

    def start_child(self, parent: RunRef, name: str, params: Mapping[str, Any] | None = None,
                    tags: Mapping[str, Any] | None = None) -> RunRef:
        """A child run the caller ends with `end` (for runs whose outcome is known only afterwards)."""
        folder = parent.folder / safe_name(name) if parent.folder is not None else None
        return self._start(name, folder, parent, params, tags)

    def end(self, run: RunRef, status: str = "FINISHED") -> None:
        if self.tracker is not None and run.run_id is not None:
            self.tracker.end_run(run.run_id, status)

    def table(self, run: RunRef, table: pa.Table, path: str) -> None:
        if self.tracker is not None and run.run_id is not None:
            self.tracker.log_table(run.run_id, table, path)
        if run.folder is not None:
            target = run.folder / path
            target.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(table, target)
            self.files.append(target)

    def figure(self, run: RunRef, figure, path: str) -> None:
        """Log a matplotlib Figure as PNG (the same file in MLflow and under --out)."""
        if self.tracker is not None and run.run_id is not None:
            self.tracker.log_figure(run.run_id, figure, path)
        if run.folder is not None:
            target = run.folder / path
            target.parent.mkdir(parents=True, exist_ok=True)
            figure.savefig(target, dpi=FIGURE_DPI, bbox_inches="tight")
            self.files.append(target)

    def text(self, run: RunRef, text: str, path: str) -> None:
        if self.tracker is not None and run.run_id is not None:
            self.tracker.log_text(run.run_id, text, path)
        if run.folder is not None:
            target = run.folder / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
            self.files.append(target)

    def tracking_uri(self) -> str:
        """The MLflow store (trainings that log their own runs need one)."""
        if self.tracker is None:
            raise ValueError("this analysis trains models that log to MLflow: pass a real --tracking-uri, not 'none'")
        return self.tracker.tracking_uri

    def experiment_name(self) -> str:
        return self.tracker.experiment if self.tracker is not None else ""

    def metrics(self, run: RunRef, metrics: Mapping[str, float], step: int | None = None) -> None:
        if self.tracker is not None and run.run_id is not None:
            self.tracker.log_metrics(run.run_id, metrics, step=step)

    def tags(self, run: RunRef, tags: Mapping[str, Any]) -> None:
        if self.tracker is not None and run.run_id is not None:
            self.tracker.set_tags(run.run_id, tags)

    def where(self) -> str:
        """One line saying where the report went."""
        parts = []
        if self.tracker is not None:
            parts.append(f"MLflow {self.tracker.tracking_uri} (experiment {self.tracker.experiment!r}; "
                         f"UI: {self.tracker.ui_command()})")
        if self.out_dir is not None:
            parts.append(f"files under {self.out_dir}")
        return "; ".join(parts)
