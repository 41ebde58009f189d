"""The driver killed (SIGKILL, with its local Ray) mid-search and again between confirmation seeds, then the same
command, flags included, with --resume: one run per trial, every epoch logged once, no seed lost or repeated."""

import json

import pytest
from fault_injection import epochs_logged, finish, kill_group, runs, start, wait_for, write_study

from orchestrator.record.tracking import Tracker

pytestmark = pytest.mark.slow


def test_a_killed_driver_resumes_mid_search_and_between_seeds_with_the_flags_it_started_with(tmp_path):
    """Started with flags that change the config, killed twice, continued by the same command plus --resume."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = write_study(tmp_path, uri, study={"share_warmup": False, "concurrency": 1})
    command = ["pipelines.study", "--config", str(config), "--name", "kill-driver", "--trials", "1",
               "--set", "confirm.seeds=1", "--set", "confirm.max_seeds=2"]  # 1 seed, undecided, so a 2nd round

    def killed_when(condition, what, resume: bool):
        process = start([*command, "--resume"] if resume else command, tmp_path)
        try:
            wait_for(lambda: condition() or process.poll() is not None, what=what)
            assert process.poll() is None, f"the study ended before {what}: {finish(process)[1][-3000:]}"
        finally:
            kill_group(process)  # the driver dies with its local Ray, as when its machine goes down

    killed_when(lambda: any(r.data.tags["nslab.role"] == "search" and epochs_logged(uri, r) for r in runs(uri)),
                "a search trial past its first epoch", resume=False)
    killed_when(lambda: any(r.info.run_name.endswith("-s2") for r in runs(uri)), "the second confirmation seed",
                resume=True)
    code, output = finish(start([*command, "--resume"], tmp_path))
    assert code == 0, output[-3000:]
    assert "verdict" in output and "undecided after 2 seeds" in output
    tracker = Tracker(uri, "faults")
    (parent,) = tracker.find_runs("tags.`nslab.kind` = 'study'")
    assert parent.info.status == "FINISHED" and json.loads(parent.data.tags["nslab.flags"]) == {
        "confirm.seeds": 1, "confirm.max_seeds": 2, "study.trials": 1}
    everything = tracker.children(parent.info.run_id)
    for run in everything:  # finished, or lost with a driver before Tune recorded it: closed and tagged
        assert run.info.status == "FINISHED" or (run.info.status == "KILLED" and "nslab.orphaned" in run.data.tags), (
            run.info.run_name, run.info.status, run.data.tags.get("nslab.failure_reason"))
    children = [c for c in everything if "nslab.orphaned" not in c.data.tags]
    labels = [c.info.run_name for c in children]
    assert len(labels) == len(set(labels)), labels  # one run per trial, none duplicated
    confirms = sorted(label for label in labels if label.startswith("confirm-"))
    assert confirms == ["confirm-baseline-s1", "confirm-baseline-s2", "confirm-sns-s1", "confirm-sns-s2"]
    assert sorted(label for label in labels if label.startswith(("sns-", "baseline"))) == ["baseline", "sns-01"]
    for child in children:
        if child.data.tags["nslab.role"] != "warmup":
            assert epochs_logged(uri, child) == [1, 2], child.info.run_name
    table = tracker.read_table(parent.info.run_id, "study/confirmation.parquet")
    assert sorted(table.column("seed").to_pylist()) == [1, 1, 2, 2]
