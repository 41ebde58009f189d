"""orchestrator.study end to end on a real local Ray, a real Optuna search and a real SQLite MLflow store:
a 3-trial study in which one trial diverges, read back from MLflow (runs, metrics, Parquet schemas)."""

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # local Ray on 127.0.0.1 (before Ray's import)

from pathlib import Path

import pytest
import ray
import yaml

from ns_core.evaluation import SCHEMA as EVAL_SCHEMA
from ns_core.sensitivity import SENSITIVITY_SCHEMA
from orchestrator.artifacts import IMPORTANCE_SCHEMA, pareto_mask, trials_schema, trials_table
from orchestrator.config import ParamSpec, load_study
from orchestrator.study import make_scheduler, make_searcher, param_importances, run_study
from orchestrator.tracking import PARENT_TAG, Tracker
from orchestrator.trial import TRIAL_ID_TAG

REPO = Path(__file__).resolve().parent.parent
EPOCH_METRICS = ["robust_acc", "clean_acc", "sensitivity_all", "sensitivity_selected", "train_loss", "epoch_seconds"]


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def tiny_study(tmp_path: Path, **study_overrides):
    """configs/study/tiny.yaml with SGD, a learning rate that diverges among the choices, and this test's
    own MLflow store and Ray storage."""
    data = {
        "base": str(REPO / "configs" / "study" / "tiny.yaml"),
        "study": {"trials": 3, "concurrency": 2, "scheduler": "asha", "grace_period": 1, "max_failures": 1,
                  "points_to_evaluate": [{"sns.lam": 0.01, "sns.fraction": 0.1, "train.lr": 1.0e6},
                                         {"sns.lam": 0.1, "sns.fraction": 0.2, "train.lr": 0.05}],
                  **study_overrides},
        "experiment": {"train": {"optimizer": "sgd", "momentum": 0.9}},
        "search_space": {"train.lr": {"type": "categorical", "choices": [0.05, 1.0e6]}},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "test-study"},
        "storage": {"ray": str(tmp_path / "ray")},
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_study(path)


@pytest.mark.slow
def test_study_end_to_end_with_a_diverging_trial(local_ray, tmp_path):
    study = tiny_study(tmp_path)
    outcome = run_study(study, "e2e")
    tracker = Tracker(study.tracking.uri, study.tracking.experiment)

    # Tune + Optuna: the budget ran; the diverged trial failed with its reason, the others finished.
    rows = {r["trial_id"]: r for r in outcome.rows}
    assert len(rows) == 3 and not outcome.interrupted
    diverged = [r for r in rows.values() if r["param.train.lr"] == 1.0e6]
    finished = [r for r in rows.values() if r["status"] == "TERMINATED"]
    assert diverged and all(r["status"] == "ERROR" and "TrainingDiverged" in r["failure_reason"] for r in diverged)
    assert finished and len(finished) + len(diverged) == 3
    assert all(r["param.train.lr"] == 0.05 and r["training_iterations"] == 1 for r in finished)

    # MLflow: one parent, one nested child per trial (the retried diverged trial did not duplicate its run).
    parent = tracker.get_run(outcome.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["nslab.study"] == "e2e"
    assert parent.data.tags["git_commit"] and parent.data.tags["config_hash"]
    assert parent.data.params["study.trials"] == "3"
    children = tracker.children(outcome.parent_run_id)
    assert sorted(c.data.tags[TRIAL_ID_TAG] for c in children) == sorted(rows)
    assert all(c.data.tags[PARENT_TAG] == outcome.parent_run_id for c in children)
    by_trial = {c.data.tags[TRIAL_ID_TAG]: c for c in children}
    for row in diverged:
        run = by_trial[row["trial_id"]]
        assert run.info.status == "FAILED" and "TrainingDiverged" in run.data.tags["failure_reason"]
    for row in finished:
        run = by_trial[row["trial_id"]]
        assert run.info.status == "FINISHED" and run.data.params["train.lr"] == "0.05"
        for metric in EPOCH_METRICS:
            history = tracker.client.get_metric_history(run.info.run_id, metric)
            assert [m.step for m in history] == [1], metric
        assert 0 <= run.data.metrics["test_worst_case_acc"] <= run.data.metrics["test_clean_acc"] <= 1
        assert run.data.metrics["trial_wall_seconds"] > 0

        # Per-trial Parquet artifacts read back with their schemas.
        sensitivity = tracker.read_table(run.info.run_id, "sensitivity/epoch_001.parquet")
        assert sensitivity.schema.remove_metadata().equals(SENSITIVITY_SCHEMA)
        assert sensitivity.num_rows == 6 + 16 + 120 + 84 and any(sensitivity.column("selected").to_pylist())
        evaluation = tracker.read_table(run.info.run_id, "eval/robust_accuracy.parquet")
        assert evaluation.schema.remove_metadata().equals(EVAL_SCHEMA)
        assert evaluation.column("attack").to_pylist() == ["clean", "fgsm", "pgd", "worst_case"]
        assert "sensitivity/sensitivity_per_layer.png" in tracker.list_artifacts(run.info.run_id, "sensitivity")

    # Study tables on the parent.
    trials = tracker.read_table(outcome.parent_run_id, "study/trials.parquet")
    assert trials.schema.equals(trials_schema(study.search_space, ["robust_acc", "clean_acc"]))
    statuses = dict(zip(trials.column("trial_id").to_pylist(), trials.column("status").to_pylist(), strict=True))
    assert statuses == {t: r["status"] for t, r in rows.items()}
    pareto = tracker.read_table(outcome.parent_run_id, "study/pareto.parquet")
    assert pareto.schema.equals(trials.schema) and 1 <= pareto.num_rows <= len(finished)
    assert set(pareto.column("status").to_pylist()) == {"TERMINATED"}
    assert set(pareto.column("training_iterations").to_pylist()) == {1}
    importances = tracker.read_table(outcome.parent_run_id, "study/param_importances.parquet")
    assert importances.schema.equals(IMPORTANCE_SCHEMA)
    assert "study/pareto_front.png" in tracker.list_artifacts(outcome.parent_run_id, "study")


def test_pareto_front_keeps_only_completed_undominated_trials():
    objectives = [("robust_acc", "max"), ("clean_acc", "max")]
    rows = [
        {"status": "TERMINATED", "training_iterations": 3, "robust_acc": 0.5, "clean_acc": 0.9},
        {"status": "TERMINATED", "training_iterations": 3, "robust_acc": 0.6, "clean_acc": 0.8},
        {"status": "TERMINATED", "training_iterations": 3, "robust_acc": 0.4, "clean_acc": 0.7},   # dominated
        {"status": "STOPPED_EARLY", "training_iterations": 1, "robust_acc": 0.9, "clean_acc": 0.95},  # ASHA
        {"status": "ERROR", "training_iterations": 1, "robust_acc": None, "clean_acc": None},
    ]
    assert pareto_mask(rows, objectives, epochs=3) == [True, True, False, False, False]
    assert pareto_mask(rows, [("robust_acc", "min")], epochs=3) == [False, False, True, False, False]


def test_importances_need_two_completed_trials_and_tables_keep_list_params(tmp_path):
    study = tiny_study(tmp_path)
    row = {"trial_id": "a", "number": 1, "status": "TERMINATED", "training_iterations": 1, "robust_acc": 0.5,
           "clean_acc": 0.9, "param.sns.lam": 0.1, "param.sns.fraction": 0.2, "param.train.lr": 0.05}
    assert param_importances([row], study, [("robust_acc", "max")]).num_rows == 0
    space = {"sns.layers": ParamSpec(type="categorical", choices=[["relu3"], ["relu3", "relu4"]])}
    table = trials_table([{"trial_id": "a", "param.sns.layers": ["relu3"], "robust_acc": float("nan")}], space,
                         ["robust_acc"])
    assert table.column("param.sns.layers").to_pylist() == ['["relu3"]']
    assert table.column("robust_acc").to_pylist() == [None]


def test_searcher_and_scheduler_follow_the_config(tmp_path):
    study = tiny_study(tmp_path)
    limiter = make_searcher(study, "unit")
    assert limiter.max_concurrent == 2
    assert limiter.searcher.metric == ["robust_acc", "clean_acc"] and limiter.searcher.mode == ["max", "max"]
    asha = make_scheduler(study)
    assert asha.metric == "robust_acc" and asha._max_t == study.experiment.train.epochs
