"""How a confirmation is judged, look by look: its design, the evidence at each look (seeds and test examples),
and the decisions, replayed from the results so far.

    design = confirmation_design(study, configurations=2)   # the demo: looks at 3, 4, 5, 6 seeds
    outcomes = read_examples(record, rows)                  # MLflow run id -> robust_correct per test example
    judged = judge(design, planned_seeds, ran_seeds, pairs, margin)   # [(PairedDifference, Decision)]

A look is a planned seed count (the first `confirm.seeds`, then as many as a round adds, up to
`confirm.max_seeds`) that the rounds have reached. At each look every comparison still open is judged by Holm's
step-down over the family (orchestrator/study/decision.py; one comparison: `decide` itself) on the evidence of the
look's seeds: the paired differences, and the test examples' share of the variance from the per-example outcomes
each confirmation run logged (confirm/examples.parquet). A comparison decided at a look keeps that decision and
that evidence: later seeds, trained for the comparisons still open, never reopen it, which is what keeps the
error rates of the design (docs/studies.md, "How sure a verdict is"). Where a run's per-example outcomes are
missing (a study recorded before they were), the comparison's interval covers the seeds alone, and says so.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from orchestrator.config.study import StudyFile
from orchestrator.execution.trial_settings import Record
from orchestrator.run import EXAMPLES_ARTIFACT
from orchestrator.study.decision import Decision, PairedDifference, example_variance, holm, paired_difference
from orchestrator.study.design import Design

log = logging.getLogger(__name__)
_read: dict[tuple[str, str], np.ndarray | None] = {}  # (tracking URI, run id) -> outcomes (a finished run's stay)


def confirmation_design(study: StudyFile, configurations: int) -> Design:
    """The study's looks: its first seeds, then as many seeds per round as keep the cluster busy (concurrency over
    the configurations per seed, as next_seeds adds them), up to confirm.max_seeds; its boundary."""
    per_round = max(1, study.study.concurrency // max(1, configurations))
    return Design.schedule(len(study.confirm_seeds()), per_round, study.confirm.max_seeds,
                           boundary=study.confirm.boundary)


@dataclass
class Pairs:
    """One comparison's material: each side's robust accuracy per seed and, where recorded, its per-example
    outcomes (robust_correct over the test examples, in the split's order)."""

    mine: dict[int, float]
    baseline: dict[int, float]
    outcomes: dict[int, np.ndarray | None] = field(default_factory=dict)
    baseline_outcomes: dict[int, np.ndarray | None] = field(default_factory=dict)

    def evidence(self, seeds: Collection[int], design: Design, look: int | None) -> PairedDifference:
        """The paired difference over `seeds` (those both sides finished), with the test examples' variance
        where every one of those runs recorded its per-example outcomes."""
        diff = paired_difference({s: v for s, v in self.mine.items() if s in seeds},
                                 {s: v for s, v in self.baseline.items() if s in seeds})
        tables = [(self.outcomes.get(s), self.baseline_outcomes.get(s)) for s in diff.seeds]
        if diff.n >= 2 and all(a is not None and b is not None and len(a) == len(b) == len(tables[0][0])
                               for a, b in tables):
            per_example = np.stack([a.astype(float) - b.astype(float) for a, b in tables])  # (seeds, examples)
            diff = diff.with_(example_variance=example_variance(per_example), examples=per_example.shape[1])
        return diff.with_(design=design, look=look)


def judge(design: Design, planned: Sequence[int], ran: Collection[int], pairs: Sequence[Pairs],
          margin: float) -> list[tuple[PairedDifference, Decision]]:
    """Replay the looks the rounds reached (planned[:n] all ran, for each planned n); return each comparison's
    evidence and decision: at the look that decided it, else at the last look (or, before any look, on every
    seed that ran)."""
    family, settled = len(pairs), [None] * len(pairs)
    latest = [p.evidence(ran, design, None) for p in pairs]
    looked = False
    for k, n in enumerate(design.looks):
        if len(planned) < n or not set(planned[:n]) <= set(ran):
            break
        looked, diffs = True, [p.evidence(set(planned[:n]), design, k) for p in pairs]
        for j, (decision, share) in enumerate(holm(diffs, margin, settled)):
            if settled[j] is None:
                latest[j] = diffs[j].with_(share=share, family=family)
                settled[j] = decision if decision != Decision.UNDECIDED else None
    if not looked and pairs:
        judged = holm(latest, margin)
        latest = [d.with_(share=share, family=family) for d, (_, share) in zip(latest, judged, strict=True)]
        settled = [decision for decision, _ in judged]
    return [(d, s or Decision.UNDECIDED) for d, s in zip(latest, settled, strict=True)]


def read_examples(record: Record, rows: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """MLflow run id -> robust_correct per test example, for every finished confirmation run that logged its
    EXAMPLES_ARTIFACT (read once per run and kept: the plan of every round reads them again)."""
    from orchestrator.record.tracking import Tracker

    tracker, out = None, {}
    for row in rows:
        run_id = row.get("mlflow_run_id")
        if not run_id or row.get("test_robust_acc") is None:
            continue
        key = (record.tracking_uri, run_id)
        if key not in _read:
            tracker = tracker or Tracker(record.tracking_uri, record.mlflow_experiment)
            _read[key] = _outcomes(tracker, run_id)
        if _read[key] is not None:
            out[run_id] = _read[key]
    return out


def _outcomes(tracker, run_id: str) -> np.ndarray | None:
    if EXAMPLES_ARTIFACT not in tracker.list_artifacts(run_id, EXAMPLES_ARTIFACT.rpartition("/")[0]):
        log.info("run %s has no %s (recorded before per-example outcomes): its comparisons' intervals cover the "
                 "seeds only", run_id, EXAMPLES_ARTIFACT)
        return None
    table = tracker.read_table(run_id, EXAMPLES_ARTIFACT).sort_by("example")
    return table.column("robust_correct").to_numpy(zero_copy_only=False).astype(bool)
