"""orchestrator.study end to end on a real local Ray, a real Optuna search and a real SQLite MLflow store: a
baseline, 3 search trials of which one diverges, a confirmation on 2 fresh seeds; read back from MLflow (runs,
metrics, Parquet schemas) and checked against each other. Plus the searcher, the scheduler and the tables."""

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # local Ray on 127.0.0.1 (before Ray's import)

from pathlib import Path

import pytest
import yaml

from ns_core.evaluation import CHECK_SCHEMA
from ns_core.evaluation import SCHEMA as EVAL_SCHEMA
from ns_core.sensitivity import SENSITIVITY_SCHEMA
from orchestrator.artifacts import IMPORTANCE_SCHEMA, pareto_mask, trials_schema, trials_table
from orchestrator.ray_runtime import ray_session
from orchestrator.study_config import ParamSpec, load_study
from orchestrator.tracking import PARENT_TAG, Tracker
from orchestrator.trial import ROLE_TAG, TRIAL_ID_TAG

REPO = Path(__file__).resolve().parent.parent
EPOCH_METRICS = ["val/robust_acc", "val/clean_acc", "val/sensitivity_all", "val/sensitivity_selected", "train/loss",
                 "time/epoch_seconds"]
OBJECTIVES = ["val/robust_acc", "val/clean_acc"]


@pytest.fixture(scope="module")
def local_ray():
    with ray_session(num_cpus=2):
        yield


def tiny_study(tmp_path: Path, **study_overrides):
    """configs/study/tiny.yaml with SGD, a learning rate that diverges among the choices, and this test's own
    MLflow store and Ray storage."""
    data = {
        "base": str(REPO / "configs" / "study" / "tiny.yaml"),
        "study": {"trials": 3, "concurrency": 2, "scheduler": "asha", "grace_period": 1, "max_failures": 1,
                  "points_to_evaluate": [{"sns.lam": 0.01, "sns.fraction": 0.1, "train.lr": 1.0e6},
                                         {"sns.lam": 0.1, "sns.fraction": 0.2, "train.lr": 0.05}],
                  **study_overrides},
        "experiment": {"train": {"optimizer": "sgd", "momentum": 0.9, "lr": 0.05}},
        "search_space": {"train.lr": {"type": "categorical", "choices": [0.05, 1.0e6]}},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "test-study"},
        "storage": {"ray": str(tmp_path / "ray")},
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_study(path)


@pytest.mark.slow
def test_study_with_baseline_search_and_confirmation_end_to_end(local_ray, tmp_path):
    from orchestrator.study import run_study

    study = tiny_study(tmp_path)
    outcome = run_study(study, "e2e")
    tracker = Tracker(study.tracking.uri, study.tracking.experiment)

    # Tune + Optuna: the budget ran; the diverged trial failed with its reason; the baseline ran outside the search.
    rows = {r["trial_id"]: r for r in outcome.rows}
    assert len(rows) == 4
    baseline = [r for r in rows.values() if r["role"] == "baseline"]
    assert len(baseline) == 1 and baseline[0]["status"] == "TERMINATED" and baseline[0]["param.sns.lam"] is None
    search = [r for r in rows.values() if r["role"] == "search"]
    diverged = [r for r in search if r["param.train.lr"] == 1.0e6]
    finished = [r for r in search if r["status"] == "TERMINATED"]
    assert diverged and all(r["status"] == "ERROR" and "TrainingDiverged" in r["failure_reason"] for r in diverged)
    assert finished and len(finished) + len(diverged) == 3
    assert all(r["param.train.lr"] == 0.05 and r["epochs"] == 2 for r in finished)
    assert sorted(r["number"] for r in outcome.rows) == [1, 2, 3, 4]

    # MLflow: one parent; one nested child per trial, warm-up and confirmation run; no duplicate runs.
    parent = tracker.get_run(outcome.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["nslab.study"] == "e2e"
    assert parent.data.tags["git_commit"] and parent.data.tags["config_hash"]
    assert parent.data.params["study.trials"] == "3" and parent.data.metrics["study_seconds"] > 0
    children = tracker.children(outcome.parent_run_id)
    roles = [c.data.tags[ROLE_TAG] for c in children]
    assert roles.count("search") == 3 and roles.count("baseline") == 1 and roles.count("confirm") == 4
    assert len({c.data.tags[TRIAL_ID_TAG] for c in children}) == len(children)
    assert all(c.data.tags[PARENT_TAG] == outcome.parent_run_id for c in children)
    by_trial = {c.data.tags[TRIAL_ID_TAG]: c for c in children}
    for row in diverged:
        run = by_trial[row["trial_id"]]
        assert run.info.status == "FAILED" and "TrainingDiverged" in run.data.tags["failure_reason"]
    for row in [*finished, *baseline]:
        run = by_trial[row["trial_id"]]
        assert run.info.status == "FINISHED" and run.data.params["train.lr"] == "0.05"
        assert "trades.beta" not in run.data.params and "train.amp" not in run.data.params  # only what applies
        for metric in EPOCH_METRICS:
            history = tracker.client.get_metric_history(run.info.run_id, metric)
            assert sorted(m.step for m in history) == [1, 2], metric  # every epoch once
        assert not any(k.startswith("test/") for k in run.data.metrics)  # the search never reads the test split
        assert run.data.metrics["time/trial_wall_seconds"] > 0
        sensitivity = tracker.read_table(run.info.run_id, "sensitivity/epoch_002.parquet")
        assert sensitivity.schema.remove_metadata().equals(SENSITIVITY_SCHEMA)
        assert sensitivity.num_rows == 6 + 16 + 120 + 84 and any(sensitivity.column("selected").to_pylist())
    sns_runs = [by_trial[r["trial_id"]] for r in finished]
    assert all(eval(run.data.params["sns.layers"]) == ["relu1", "relu2", "relu3", "relu4"] for run in sns_runs)
    assert all(run.data.params["sampled.sns.lam"] for run in sns_runs)  # the sampled values, as their own group

    # Study tables on the parent; the baseline is a reference, not a point of the front.
    trials = tracker.read_table(outcome.parent_run_id, "study/trials.parquet")
    assert trials.schema.equals(trials_schema(study.search_space, OBJECTIVES))
    statuses = dict(zip(trials.column("trial_id").to_pylist(), trials.column("status").to_pylist(), strict=True))
    assert statuses == {t: r["status"] for t, r in rows.items()}
    pareto = tracker.read_table(outcome.parent_run_id, "study/pareto.parquet")
    assert 1 <= pareto.num_rows <= len(finished) and set(pareto.column("role").to_pylist()) == {"search"}
    importances = tracker.read_table(outcome.parent_run_id, "study/param_importances.parquet")
    assert importances.schema.equals(IMPORTANCE_SCHEMA)
    assert {"study/pareto_front.png", "study/confirmation.png"} <= set(tracker.list_artifacts(outcome.parent_run_id,
                                                                                              "study"))

    # Confirmation: one row per (configuration, seed) on fresh seeds; the paired differences are the runs'.
    table = tracker.read_table(outcome.parent_run_id, "study/confirmation.parquet").to_pylist()
    assert sorted((r["configuration"], r["seed"]) for r in table) == [("baseline", 1), ("baseline", 2),
                                                                      ("config1", 1), ("config1", 2)]
    runs = {r["mlflow_run_id"]: tracker.get_run(r["mlflow_run_id"]) for r in table}
    for r in table:
        run = runs[r["mlflow_run_id"]]
        assert run.info.status == "FINISHED" and run.data.tags[ROLE_TAG] == "confirm"
        assert r["test_robust_acc"] == pytest.approx(run.data.metrics["test/robust_acc"])
        assert run.data.params["train.seed"] == str(r["seed"])
        evaluation = tracker.read_table(run.info.run_id, "eval/robust_accuracy.parquet")
        assert evaluation.schema.equals(EVAL_SCHEMA) and evaluation.column("attack").to_pylist() == [
            "clean", "fgsm", "pgd", "worst_case"]
        assert tracker.read_table(run.info.run_id, "eval/checks.parquet").schema.equals(CHECK_SCHEMA)
        assert "eval.flags" in run.data.tags
    base = {r["seed"]: r for r in table if r["configuration"] == "baseline"}
    for r in (r for r in table if r["configuration"] == "config1"):
        assert r["robust_diff"] == pytest.approx(r["test_robust_acc"] - base[r["seed"]]["test_robust_acc"])
        assert r["clean_diff"] == pytest.approx(r["test_clean_acc"] - base[r["seed"]]["test_clean_acc"])
    [comparison] = outcome.confirmation.comparisons
    assert comparison.robust.n == 2 and comparison.robust.mean == pytest.approx(
        sum(r["robust_diff"] for r in table if r["configuration"] == "config1") / 2)
    assert "points over pgd_at (" in comparison.verdict() and parent.data.tags["verdict.1"] == comparison.verdict()


def test_baseline_first_keeps_the_baseline_out_of_optunas_model(tmp_path):
    from orchestrator.tuning import make_searcher

    study = tiny_study(tmp_path)
    limiter = make_searcher(study, "unit", baseline={"nslab": {"role": "baseline"}})
    wrapper = limiter.searcher
    assert wrapper.suggest("t0") == {"nslab": {"role": "baseline"}}
    suggestions = [wrapper.suggest(f"t{i}") for i in (1, 2)]
    assert all("sns.lam" in s for s in suggestions)
    result = {"val/robust_acc": 0.5, "val/clean_acc": 0.9}
    for trial in ("t0", "t1", "t2"):
        wrapper.on_trial_complete(trial, result)
    assert len(wrapper.searcher._ot_study.trials) == 2  # the baseline never reached Optuna
    restored = make_searcher(study, "unit", baseline={"nslab": {"role": "baseline"}}).searcher
    restored.set_state(wrapper.get_state())
    assert restored.baseline_trial_id == "t0"


def test_pareto_front_keeps_only_completed_undominated_trials():
    objectives = [("robust_acc", "max"), ("clean_acc", "max")]
    rows = [
        {"status": "TERMINATED", "epochs": 3, "robust_acc": 0.5, "clean_acc": 0.9},
        {"status": "TERMINATED", "epochs": 3, "robust_acc": 0.6, "clean_acc": 0.8},
        {"status": "TERMINATED", "epochs": 3, "robust_acc": 0.4, "clean_acc": 0.7},   # dominated
        {"status": "STOPPED_EARLY", "epochs": 1, "robust_acc": 0.9, "clean_acc": 0.95},  # ASHA
        {"status": "ERROR", "epochs": 1, "robust_acc": None, "clean_acc": None},
    ]
    assert pareto_mask(rows, objectives, epochs=3) == [True, True, False, False, False]
    assert pareto_mask(rows, [("robust_acc", "min")], epochs=3) == [False, False, True, False, False]


def test_importances_need_two_completed_trials_and_tables_keep_list_params(tmp_path):
    from orchestrator.study import param_importances

    study = tiny_study(tmp_path)
    row = {"trial_id": "a", "number": 1, "role": "search", "status": "TERMINATED", "epochs": 2,
           "val/robust_acc": 0.5, "val/clean_acc": 0.9, "param.sns.lam": 0.1, "param.sns.fraction": 0.2,
           "param.train.lr": 0.05}
    assert param_importances([row], study, [("val/robust_acc", "max")]).num_rows == 0
    space = {"sns.layers": ParamSpec(type="categorical", choices=[["relu3"], ["relu3", "relu4"]])}
    table = trials_table([{"trial_id": "a", "param.sns.layers": ["relu3"], "robust_acc": float("nan")}], space,
                         ["robust_acc"])
    assert table.column("param.sns.layers").to_pylist() == ['["relu3"]']
    assert table.column("robust_acc").to_pylist() == [None]


def test_searcher_and_scheduler_follow_the_config(tmp_path):
    from orchestrator.tuning import BaselineSparingASHA, make_scheduler, make_searcher

    study = tiny_study(tmp_path)
    limiter = make_searcher(study, "unit", baseline=None)
    assert limiter.max_concurrent == 2
    assert limiter.searcher.metric == OBJECTIVES and limiter.searcher.mode == ["max", "max"]
    asha = make_scheduler(study)
    assert isinstance(asha, BaselineSparingASHA) and asha.metric == "val/robust_acc"
    assert asha._max_t == study.experiment.train.epochs and asha._time_attr == "epoch"
