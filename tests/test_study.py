"""A study end to end on a real local Ray, real Optuna searchers and a real SQLite MLflow store, run once per
session and read by every test here: two arms (PGD-AT and SNS, each searched over the shared learning rate, a
diverging value among its choices), ASHA on validation, and a sequential confirmation. SNS runs at lambda 0
here, so its best configuration trains exactly what PGD-AT's does: the confirmation must find them equivalent
at its first seeds (zero-width interval), whatever the machine. The science (SNS with its regularizer on, seeds
added until decided) is tests/test_sequential.py's."""

import json
import tempfile
from pathlib import Path

import pytest
import yaml
from conftest import TINY_STUDY

from ns_core.evaluation import CHECK_SCHEMA
from ns_core.evaluation import SCHEMA as EVAL_SCHEMA
from ns_core.sensitivity import SENSITIVITY_SCHEMA
from orchestrator.config.study import load_study
from orchestrator.record import tags
from orchestrator.record.artifacts import COMPUTE_SCHEMA, RUNG_SCHEMA, trials_schema
from orchestrator.record.tracking import Tracker
from orchestrator.results import Status
from orchestrator.study.decision import Decision

pytestmark = pytest.mark.slow
OBJECTIVES = ["val/robust_acc", "val/clean_acc"]
EPOCH_METRICS = ["val/robust_acc", "val/clean_acc", "val/sensitivity_all", "train/loss", "train/attack_eps",
                 "time/epoch_seconds", "objective/val_robust_acc"]


@pytest.fixture(scope="module")
def study_run(local_ray, tmp_path_factory):
    from orchestrator.study.driver import run_study

    tmp = tmp_path_factory.mktemp("study")
    (tmp / "study.yaml").write_text(yaml.safe_dump({
        "base": str(TINY_STUDY),
        "study": {"trials": 3, "concurrency": 2, "scheduler": "asha", "grace_period": 1, "max_failures": 1,
                  "points_to_evaluate": [{"train.lr": 1.0e6, "sns.fraction": 0.1, "sns.lam": 0.0},
                                         {"train.lr": 0.05, "sns.fraction": 0.2, "sns.lam": 0.0}]},
        "experiment": {"train": {"optimizer": "sgd", "momentum": 0.9, "lr": 0.05}},
        "search_space": {"train.lr": {"type": "categorical", "choices": [0.05, 1.0e6]},
                         "sns.lam": {"type": "categorical", "choices": [0.0], "low": None, "high": None,
                                     "log": False}},  # (null: drops tiny.yaml's bounds in the merge)
        "tracking": {"uri": f"sqlite:///{tmp / 'mlflow.db'}", "experiment": "test-study"},
        "storage": {"ray": str(tmp / "ray")}}))
    study = load_study(tmp / "study.yaml")
    outcome = run_study(study, "e2e", launch={"config": str(tmp / "study.yaml"), "overrides": {}})
    tracker = Tracker(study.tracking.uri, study.tracking.experiment)
    return study, outcome, tracker


def read_text(tracker, run_id: str, path: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        return Path(tracker.download(run_id, path, tmp)).read_text()


def children(tracker, outcome, role=None):
    runs = tracker.children(outcome.parent_run_id)
    return [r for r in runs if role is None or r.data.tags[tags.ROLE] == role]


def test_both_arms_get_the_same_trials_and_the_baseline_arm_never_samples_sns_paths(study_run):
    study, outcome, tracker = study_run
    arms = {arm: [r for r in outcome.rows if r["arm"] == arm] for arm in ("baseline", "sns")}
    assert {a: len(rows) for a, rows in arms.items()} == {"baseline": 3, "sns": 3}
    assert [r["label"] for r in outcome.rows] == ["baseline-01", "baseline-02", "baseline-03", "sns-01", "sns-02",
                                                  "sns-03"]  # creation order, per arm
    assert all(r["param.sns.fraction"] is None and r["param.sns.lam"] is None for r in arms["baseline"])
    assert all(r["param.sns.fraction"] is not None for r in arms["sns"])
    for run in children(tracker, outcome, "search"):
        overrides = json.loads(run.data.tags[tags.OVERRIDES])
        if run.data.tags[tags.ARM] == "baseline":
            assert not any(p.startswith("sns.") for p in [*overrides, *run.data.params]) and run.data.params[
                "recipe.lr"] in ("0.05", "1e+06")  # the shared recipe first in the compare view, under recipe.
        assert run.info.run_name == run.data.tags[tags.LABEL] and run.data.params["arm"] == run.data.tags[tags.ARM]


def test_diverged_trials_fail_with_their_reason_and_the_search_goes_on(study_run):
    _, outcome, tracker = study_run
    for arm in ("baseline", "sns"):
        rows = [r for r in outcome.rows if r["arm"] == arm]
        diverged = [r for r in rows if r["param.train.lr"] == 1.0e6]
        assert diverged and all(r["status"] == Status.FAILED and "TrainingDiverged" in r["failure_reason"]
                                for r in diverged)
        assert any(r["status"] == Status.COMPLETE for r in rows)
        assert all(r["status"] in (Status.COMPLETE, Status.STOPPED_EARLY) for r in rows if r not in diverged)
    stopped = 0
    for run in children(tracker, outcome, "search"):
        if "TrainingDiverged" in run.data.tags.get(tags.FAILURE, ""):
            assert run.info.status == "FAILED" and run.data.tags[tags.STATUS] == "FAILED"
        elif tags.STOPPED_EARLY in run.data.tags:  # ASHA at its rung: a normal end, nslab's status in a tag
            stopped += 1
            assert run.info.status == "FINISHED" and run.data.tags[tags.STATUS] == "STOPPED_EARLY"
            assert run.data.tags[tags.STOPPED_EARLY] == "asha after epoch 1"
        else:
            assert run.info.status == "FINISHED" and run.data.tags[tags.STATUS] == "COMPLETE"
    assert stopped == sum(r["status"] == Status.STOPPED_EARLY for r in outcome.rows)


def test_trial_runs_hold_every_epoch_once_and_only_what_tells_them_apart(study_run):
    study, outcome, tracker = study_run
    finished = [r for r in children(tracker, outcome, "search") if r.data.tags.get(tags.STATUS) == "COMPLETE"]
    assert finished and all(r.info.status == "FINISHED" for r in finished)
    for run in finished:
        for metric in EPOCH_METRICS:
            history = tracker.client.get_metric_history(run.info.run_id, metric)
            assert sorted(m.step for m in history) == [1, 2], metric  # every epoch once, forked epochs included
        assert "epoch" not in run.data.metrics  # the step is the epoch; a shared `epoch` metric crowds the UI
        assert not any(k.startswith("test/") for k in run.data.metrics)  # the search never reads the test split
        assert set(run.data.params) <= {"arm", "recipe.lr", "sns.lam", "sns.fraction"}  # the constants: on the parent
        resolved = yaml.safe_load(read_text(tracker, run.info.run_id, "config/resolved.yaml"))
        assert resolved["model"] == "lenet5" and resolved["data.train_size"] == 256  # what it used, in full
        assert run.data.tags["nslab.checkpoint_dir"].startswith(study.storage.ray)  # not Ray's temp session dir
        sensitivity = tracker.read_table(run.info.run_id, "sensitivity/epoch_002.parquet")
        assert sensitivity.schema.remove_metadata().equals(SENSITIVITY_SCHEMA) and sensitivity.num_rows == 226
        assert run.data.metrics["time/trial_wall_seconds"] > 0
    parent = tracker.get_run(outcome.parent_run_id)
    assert parent.data.params["experiment.attack.eps"] == "0.2" and parent.data.params["study.trials"] == "3"


def test_the_parent_run_carries_the_answer_tables_plots_and_summary(study_run):
    study, outcome, tracker = study_run
    parent = tracker.get_run(outcome.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags[tags.STUDY] == "e2e"
    assert parent.info.run_name == "tiny: SNS equivalent to PGD-AT"  # the answer in the runs table's first column
    assert parent.data.tags[tags.VERDICT] == "SNS equivalent to PGD-AT, +0.0 points (2 seeds)"
    assert parent.data.tags[tags.GIT_COMMIT] and parent.data.tags[tags.CONFIG_HASH]
    verdict = outcome.confirmation.comparisons[0].verdict()
    assert verdict in parent.data.tags["mlflow.note.content"]  # the description the UI renders
    assert read_text(tracker, parent.info.run_id, "study/verdict.txt") == verdict + "\n"
    assert verdict in read_text(tracker, parent.info.run_id, "study/report.md")
    artifacts = set(tracker.list_artifacts(parent.info.run_id, "study"))
    assert {"study/trials.parquet", "study/pareto.parquet", "study/compute.parquet", "study/rung_correlation.parquet",
            "study/confirmation.parquet", "study/pareto_front.png", "study/robust_vs_compute.png",
            "study/confirmation.png", "study/report.md", "study/verdict.txt", "study/config.yaml",
            "study/expected_best.parquet", "study/expected_best.png"} <= artifacts
    budget = tracker.read_table(parent.info.run_id, "study/expected_best.parquet")
    assert set(budget.column("arm").to_pylist()) == {"baseline", "sns"}  # each arm's expected best after k trials
    assert "rests on one search (variation between searches not measured)" in verdict
    assert "study/param_importances.png" not in artifacts  # 3 trials: too few for fANOVA, and the report says so
    trials = tracker.read_table(parent.info.run_id, "study/trials.parquet")
    assert trials.schema.equals(trials_schema(study.search_space, OBJECTIVES))
    assert trials.column("arm").to_pylist() == [r["arm"] for r in outcome.rows]
    assert trials.column("status").to_pylist() == [str(r["status"]) for r in outcome.rows]
    compute = tracker.read_table(parent.info.run_id, "study/compute.parquet")
    assert compute.schema.equals(COMPUTE_SCHEMA) and set(compute.column("arm").to_pylist()) == {"baseline", "sns"}
    for arm in ("baseline", "sns"):
        mine = [r for r in compute.to_pylist() if r["arm"] == arm]
        cumulative = [r["cumulative_train_seconds"] for r in mine]
        assert cumulative == sorted(cumulative) and [r["order"] for r in mine] == list(range(1, len(mine) + 1))
    rungs = tracker.read_table(parent.info.run_id, "study/rung_correlation.parquet")
    assert rungs.schema.equals(RUNG_SCHEMA) and rungs.column("rung_epoch").to_pylist() == [1, 1]
    summary = parent.data.metrics
    assert {"summary/baseline_best_val_robust_acc_pct", "summary/sns_best_val_robust_acc_pct", "summary/study_seconds",
            "confirmed/sns_robust_diff_points", "confirmed/sns_seeds"} <= set(summary)  # units in the names
    assert summary["confirmed/sns_robust_diff_points"] == 0.0
    best = max(r["val/robust_acc"] for r in outcome.rows if r["arm"] == "sns" and r["status"] == Status.COMPLETE)
    assert summary["summary/sns_best_val_robust_acc_pct"] == pytest.approx(100 * best, abs=1e-3)  # percent


def test_the_confirmation_pairs_seeds_and_finds_identical_training_equivalent(study_run):
    study, outcome, tracker = study_run
    confirmation = outcome.confirmation
    assert [c.name for c in confirmation.configurations] == ["baseline", "sns"]
    assert all(c.overrides["train.lr"] == 0.05 for c in confirmation.configurations)  # each arm's best
    table = tracker.read_table(outcome.parent_run_id, "study/confirmation.parquet").to_pylist()
    assert sorted((r["configuration"], r["seed"]) for r in table) == [("baseline", 1), ("baseline", 2), ("sns", 1),
                                                                      ("sns", 2)]
    [comparison] = confirmation.comparisons
    assert comparison.decision == Decision.EQUIVALENT and comparison.robust.differences == (0.0, 0.0)
    assert confirmation.rounds == 1  # decided at its first seeds: no seed added
    assert "SNS is equivalent to PGD-AT within ±1.0 points after 2 seeds" in comparison.verdict()
    for row in table:
        run = tracker.get_run(row["mlflow_run_id"])
        assert run.info.status == "FINISHED" and run.data.tags[tags.ROLE] == "confirm"
        assert run.info.run_name == f"confirm-{row['configuration']}-s{row['seed']}"
        assert row["test_robust_acc"] == pytest.approx(run.data.metrics["test/robust_acc"])
        assert run.data.params["seed"] == str(row["seed"])
        evaluation = tracker.read_table(run.info.run_id, "eval/robust_accuracy.parquet")
        assert evaluation.schema.equals(EVAL_SCHEMA) and evaluation.column("attack").to_pylist() == [
            "clean", "fgsm", "pgd", "worst_case"]
        assert tracker.read_table(run.info.run_id, "eval/checks.parquet").schema.equals(CHECK_SCHEMA)
    runs = children(tracker, outcome)
    assert len({r.data.tags[tags.TRIAL_ID] for r in runs}) == len(runs)  # one run per trial
    assert all(r.data.tags[tags.PARENT] == outcome.parent_run_id for r in runs)
