"""The way back from a trial, typed: what a trial reports to Ray Tune each epoch, and what the driver reads
from it once the trial ended, with the one mapping from Tune's outcomes to nslab's statuses and from those to
MLflow's run statuses.

    tune.report(report_values(metrics, run_id, final=True))          # in the trainable
    outcome = TrialOutcome.of_result(result)                          # a finished phase's tune.Result
    outcome = TrialOutcome.of_trial(trial)                            # a Trial from the experiment state
    outcome.status, outcome.epoch, outcome.mlflow_run_id, outcome.metric("test/robust_acc")

A trial that trained its whole budget reports `final`; Tune ends a trial that ASHA stopped without an error
and without `final`: STOPPED_EARLY, a normal end (FINISHED in MLflow, nslab's status in a tag).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from orchestrator.execution.trial_settings import Role, TrialSettings
from orchestrator.results import Status

FINAL = "final"  # 1.0 in the report that ends a trial's whole budget (its final evaluation recorded)
RUN_ID = "mlflow_run_id"
EPOCH = "epoch"
PROGRESS = "progress"  # epoch / the trial's own epochs: where ASHA's rungs are (execution/search.py rungs)

# nslab's status -> the MLflow run status it ends with. Only a failure is a failure.
MLFLOW_STATUS = {Status.COMPLETE: "FINISHED", Status.STOPPED_EARLY: "FINISHED", Status.WARMED_UP: "FINISHED",
                 Status.FAILED: "FAILED", Status.INCOMPLETE: "KILLED"}


def report_values(metrics: Mapping[str, Any], run_id: str, final: bool) -> dict[str, float | str]:
    """One epoch's report to Tune: the numeric metrics, the trial's MLflow run id and whether it is the last."""
    values: dict[str, float | str] = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
    values.update({RUN_ID: run_id, FINAL: float(final)})
    return values


def trial_status(*, errored: bool, ended: bool, final: bool, role: Role) -> Status:
    """nslab's status for what Tune saw: an error, a final report (every epoch trained), a warm-up that reached
    its last kept epoch, a trial the scheduler stopped, or one that has not ended."""
    if errored:
        return Status.FAILED
    if final:
        return Status.COMPLETE
    if ended:
        return Status.WARMED_UP if role == Role.WARMUP else Status.STOPPED_EARLY
    return Status.INCOMPLETE


@dataclass(frozen=True)
class TrialOutcome:
    """A trial's last report and how it ended."""

    settings: TrialSettings
    status: Status
    epoch: int = 0
    mlflow_run_id: str | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)
    error: str | None = None

    @classmethod
    def of(cls, config: Mapping | TrialSettings, last: Mapping | None, *, errored: bool, ended: bool,
           error: str | None = None) -> TrialOutcome:
        """`config`: the trial's Tune config (or its settings); `last`: its last report (None if it never reported)."""
        settings = config if isinstance(config, TrialSettings) else TrialSettings.of(config)
        last = dict(last or {})
        status = trial_status(errored=errored, ended=ended, final=bool(last.get(FINAL)), role=settings.role)
        metrics = {k: float(v) for k, v in last.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        return cls(settings, status, int(last.get(EPOCH, 0) or 0), last.get(RUN_ID) or None, metrics, error)

    @classmethod
    def of_result(cls, result) -> TrialOutcome:
        """From a tune.Result of a finished phase (every trial in it has ended)."""
        error = str(result.error) if result.error is not None else None
        return cls.of(result.config, result.metrics, errored=error is not None, ended=True, error=error)

    @classmethod
    def of_trial(cls, trial) -> TrialOutcome:
        """From a Tune Trial read back from the experiment state (it may not have ended)."""
        return cls.of(trial.config, trial.last_result, errored=trial.status == "ERROR",
                      ended=trial.status == "TERMINATED")

    @property
    def ok(self) -> bool:
        return self.status == Status.COMPLETE

    @property
    def mlflow_status(self) -> str:
        return MLFLOW_STATUS[self.status]

    def metric(self, name: str) -> float | None:
        """A reported value, or None when the trial did not finish its budget (a partial run's test metrics are
        not results) or never reported it."""
        return self.metrics.get(name) if self.ok else None

    def test_metrics(self) -> dict[str, float]:
        """The final evaluation's `test/...` values of a complete trial."""
        return {k: v for k, v in self.metrics.items() if k.startswith("test/")} if self.ok else {}
