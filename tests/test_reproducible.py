"""A study repeats itself: the tiny study with a searched recipe, 6 trials per arm, 2 at a time and ASHA from
epoch 1, run twice on the same machine (the second while another process keeps a core busy), runs the same
trials with the same validation results, stops the same ones at the same rung, confirms the same
configurations and prints the same verdict. The searcher suggests trial n from trials 1..n-2 only, told back in
order, and ASHA compares it with those trials only (orchestrator/execution/search.py); the memory format is a
fixed rule, not a timing (ns_core/performance.py)."""

import subprocess
import sys

import pytest
import torch
import yaml
from conftest import TINY_STUDY

from ns_core import performance
from ns_core.models import create_model
from orchestrator.record.tracking import Tracker
from orchestrator.results import Status

TIMING = ["trial_id", "mlflow_run_id", "wall_seconds", "train_seconds", "finished_at", "regularized_epoch_seconds",
          "base_epoch_seconds"]  # what differs between two runs of one study by design


def test_the_memory_format_is_a_rule_of_the_model_and_device_not_a_timing(monkeypatch):
    monkeypatch.delenv("NSLAB_MEMORY_FORMAT")
    lenet = create_model("lenet5", (1, 28, 28), 10)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert performance.memory_format(lenet, (1, 28, 28), cpu) == torch.channels_last
    assert performance.memory_format(lenet, (1, 28, 28), cuda) == torch.contiguous_format
    mlp = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
    assert performance.memory_format(mlp, (1, 28, 28), cpu) == torch.contiguous_format
    monkeypatch.setenv("NSLAB_MEMORY_FORMAT", "contiguous")
    assert performance.memory_format(lenet, (1, 28, 28), cpu) == torch.contiguous_format


@pytest.fixture(scope="module")
def two_runs(local_ray, tmp_path_factory):
    from orchestrator.config.study import load_study
    from orchestrator.study.driver import run_study

    tmp = tmp_path_factory.mktemp("reproducible")
    config = tmp / "study.yaml"
    config.write_text(yaml.safe_dump({
        "base": str(TINY_STUDY),
        "study": {"trials": 6, "concurrency": 2, "scheduler": "asha", "grace_period": 1},
        "search_space": {"train.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}},
        "confirm": {"seeds": [1, 2], "max_seeds": 2},
        "tracking": {"uri": f"sqlite:///{tmp / 'mlflow.db'}", "experiment": "reproducible"},
        "storage": {"ray": str(tmp / "ray")}}))
    study = load_study(config)
    assert study.study.reproducible  # the default
    tracker = Tracker(study.tracking.uri, study.tracking.experiment)
    runs = []
    for name in ("first", "second"):
        busy = None
        if name == "second":  # another process takes a core: trials end in another order than the first time
            # at the lowest priority: it takes what the trials leave idle, not the other test worker's core
            busy = subprocess.Popen([sys.executable, "-c", "import os; os.nice(19)\nwhile True: pass"])
        try:
            outcome = run_study(study, name)
        finally:
            if busy is not None:
                busy.kill()
                busy.wait()
        runs.append((outcome, tracker.read_table(outcome.parent_run_id, "study/trials.parquet").to_pylist(),
                     tracker.read_table(outcome.parent_run_id, "study/confirmation.parquet").to_pylist()))
    return runs


@pytest.mark.slow
def test_a_study_run_twice_runs_the_same_trials_stops_the_same_ones_and_prints_the_same_verdict(two_runs):
    (first, trials_1, confirm_1), (second, trials_2, confirm_2) = two_runs
    assert len(trials_1) == 12 and {r["arm"] for r in trials_1} == {"baseline", "sns"}
    assert any(r["status"] == Status.STOPPED_EARLY for r in trials_1)  # ASHA decided something
    assert any(r["status"] == Status.COMPLETE for r in trials_1)

    def same(rows):
        return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]

    for one, two in zip(same(trials_1), same(trials_2), strict=True):
        assert one == two  # parameters, validation metrics, statuses, epochs, best epoch, sensitivity
    keep = ["configuration", "seed", "status", "test_clean_acc", "test_robust_acc", "robust_diff", "clean_diff"]
    assert [{k: r.get(k) for k in keep} for r in confirm_1] == [{k: r.get(k) for k in keep} for r in confirm_2]
    verdicts = [[c.verdict() for c in outcome.confirmation.comparisons] for outcome in (first, second)]
    assert verdicts[0] and verdicts[0] == verdicts[1]


@pytest.fixture(scope="module")
def replicated(local_ray, tmp_path_factory):
    from orchestrator.config.study import load_study
    from orchestrator.study.driver import run_study

    tmp = tmp_path_factory.mktemp("replicated")
    study = load_study(TINY_STUDY, {"study.replicates": 2, "study.trials": 2, "study.replicate_data": True,
                                    "confirm.seeds": [1], "confirm.max_seeds": 1,  # one seed: the search is the unit
                                    "tracking.uri": f"sqlite:///{tmp / 'mlflow.db'}",
                                    "storage.ray": str(tmp / "ray")})
    outcome = run_study(study, "replicated")
    return study, outcome, Tracker(study.tracking.uri, study.tracking.experiment)


@pytest.mark.slow
def test_replicated_searches_confirm_each_ones_choices_and_the_verdict_rests_on_the_searches(replicated, tmp_path):
    from orchestrator.record import tags

    study, outcome, tracker = replicated
    assert [(r["replicate"], r["label"]) for r in outcome.rows] == [
        (1, "r1-baseline"), (1, "r1-sns-01"), (1, "r1-sns-02"), (2, "r2-baseline"), (2, "r2-sns-01"), (2, "r2-sns-02")]
    confirmation = outcome.confirmation
    assert [(c.name, c.replicate) for c in confirmation.configurations] == [
        ("r1-baseline", 1), ("r1-sns", 1), ("r2-baseline", 2), ("r2-sns", 2)]
    table = tracker.read_table(outcome.parent_run_id, "study/confirmation.parquet").to_pylist()
    assert sorted((r["replicate"], r["configuration"], r["seed"]) for r in table) == [
        (1, "r1-baseline", 1), (1, "r1-sns", 1), (2, "r2-baseline", 1), (2, "r2-sns", 1)]  # the same seed per search
    assert len(confirmation.per_search) == 2 and all(c.searches == 2 for c in confirmation.per_search)
    [verdict] = confirmation.comparisons
    assert verdict.unit == "search" and verdict.robust.seeds == (1, 2)
    assert verdict.robust.differences == tuple(c.robust.mean for c in confirmation.per_search)
    assert "/2 searches" in verdict.verdict() and "; rests on 2 searches, each one's choices confirmed on its " \
        "seeds" in verdict.verdict()
    runs = [r for r in tracker.children(outcome.parent_run_id) if r.data.tags[tags.ROLE] != "warmup"]  # shared
    assert {r.data.tags.get(tags.REPLICATE) for r in runs} == {"1", "2"}  # every run grouped by its search
    assert all(r.data.params["replicate"] == r.data.tags[tags.REPLICATE] for r in runs)
    for run in runs:  # study.replicate_data: the second search chose on its own validation split
        resolved = yaml.safe_load(tracker.download(run.info.run_id, "config/resolved.yaml", tmp_path).read_text())
        assert resolved["data.data_seed"] == int(run.data.tags[tags.REPLICATE]) - 1
