"""Faults injected into real components (local Ray, SQLite MLflow), each followed by a check of the record:

- several writers opening one new SQLite store at the same moment;
- a trial's worker process killed (SIGKILL, by PID) mid-epoch (the study in this process's Ray);
- a checkpoint cut short before a resume;
- storage and data paths that cannot be used (one line, before Ray starts).

A driver killed and resumed is test_faults_driver.py; a tracking server that goes down, test_faults_server.py
(each a file of its own, so that `make test`'s two workers can run them side by side)."""

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import yaml
from conftest import REPO, run_module, subprocess_env
from fault_injection import epochs_logged, finish, kill_group, runs, start, wait_for, write_study

from orchestrator.record.tracking import Tracker

pytestmark = pytest.mark.slow


WRITER = """
import sys
from orchestrator.record.tracking import Tracker
tracker = Tracker(sys.argv[1], "nslab")
run = tracker.start_run("writer", tags={"nslab.kind": "train"})
tracker.log_metrics(run, {"val/robust_acc": 0.5}, step=1)
tracker.end_run(run)
"""


def test_several_writers_open_a_new_sqlite_store_at_once(tmp_path):
    uri = f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}"
    processes = [subprocess.Popen([sys.executable, "-c", WRITER, uri], cwd=tmp_path, env=subprocess_env(),
                                  text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in range(3)]
    results = [finish(p, 120) for p in processes]
    assert all(code == 0 for code, _ in results), [out[-1500:] for _, out in results]
    trains = Tracker(uri, "nslab").find_runs("tags.`nslab.kind` = 'train'")
    assert len(trains) == 3 and {r.info.status for r in trains} == {"FINISHED"}


def test_a_trial_worker_killed_mid_epoch_is_retried_into_its_own_run(local_ray, tmp_path):
    """The study runs in this process's Ray; a thread kills its trial's worker process (SIGKILL, by the PID its
    run records) in the middle of its third epoch."""
    from orchestrator.config.study import load_study
    from orchestrator.study.driver import run_study

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = write_study(tmp_path, uri, study={"trials": 1, "max_failures": 2}, confirm=None, baseline=None,
                         experiment={"train": {"epochs": 3}, "data": {"train_limit": 1000},
                                     "attack": {"name": "pgd", "eps": 0.2, "steps": 4}})
    victims: list = []

    def kill_a_running_trial() -> None:
        def past_its_second_epoch():  # reported with a checkpoint
            return next((run for run in runs(uri) if run.data.tags.get("nslab.role") == "search"
                         and run.info.status == "RUNNING" and "nslab.worker" in run.data.tags
                         and len(epochs_logged(uri, run)) >= 2), None)

        victim = wait_for(past_its_second_epoch, what="a search trial past its second epoch")
        time.sleep(0.7)  # into the next epoch
        os.kill(int(victim.data.tags["nslab.worker"].rsplit(":", 1)[1]), signal.SIGKILL)
        victims.append(victim)

    killer = threading.Thread(target=kill_a_running_trial, daemon=True)
    killer.start()
    outcome = run_study(load_study(config), "kill-worker")
    killer.join(timeout=60)
    (victim,) = victims
    search = [r for r in runs(uri) if r.data.tags["nslab.role"] == "search"]
    assert len(search) == 1 and outcome.rows[0]["status"] == "COMPLETE"  # one run per trial: the retry continued
    (killed,) = search
    assert killed.info.run_id == victim.info.run_id and killed.info.status == "FINISHED"
    assert "nslab.resumed_from_epoch" in killed.data.tags and epochs_logged(uri, killed) == [1, 2, 3]


def test_a_checkpoint_cut_short_gives_way_to_the_previous_one(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["pipelines.train", "--config", str(REPO / "configs/experiment/quick.yaml"), "--tracking-uri", uri,
            "--runs-dir", str(tmp_path / "runs"), "--name", "cut", "--set", "train.epochs=3", "--set", "method=pgd_at",
            "--set", "data.train_limit=600", "--set", "attack.steps=5", "--set", "data.val_size=100",
            "--set", "eval.attacks=[{name: fgsm, eps: 0.2}]", "--set", "eval.examples=64",
            "--set", "eval.check_examples=16", "--set", "eval.sensitivity_examples=64"]  # the fault, not the checks
    folder = tmp_path / "runs" / "cut"
    first = start(args, tmp_path)
    try:
        wait_for(lambda: (folder / "checkpoint.prev.pt").exists(), what="a second checkpoint")
    finally:
        kill_group(first)
    checkpoint = folder / "checkpoint.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:20000])  # a write cut short
    code, output = finish(start(args, tmp_path), 300)
    assert code == 0, output[-3000:]
    assert "is truncated" in output and "using the previous checkpoint" in output
    (run,) = Tracker(uri, "nslab").find_runs("tags.`nslab.kind` = 'train'")
    assert run.info.status == "FINISHED"
    steps = [m.step for m in Tracker(uri, "nslab").client.get_metric_history(run.info.run_id, "val/robust_acc")]
    assert sorted(steps) == [1, 2, 3]


@pytest.mark.parametrize(("override", "message"), [
    ({"storage": {"ray": "{tmp}/a-file/ray"}}, "Ray results folder (storage.ray) {tmp}/a-file/ray: {tmp}/a-file "
                                               "is not a directory"),
    ({"storage": {"ray": "/proc/nslab-cannot-write"}}, "is not writable"),
    ({"tracking": {"uri": "sqlite:///{tmp}/a-file/mlflow.db"}}, "MLflow store folder"),
    ({"experiment": {"dataset": "mnist", "data": {"root": "{tmp}/no-data"}}}, "MNIST not found in {tmp}/no-data"),
])
def test_unusable_paths_are_one_line_before_ray_starts(tmp_path, override, message):
    (tmp_path / "a-file").write_text("not a folder")
    text = yaml.safe_dump(override).replace("{tmp}", str(tmp_path))
    config = write_study(tmp_path, f"sqlite:///{tmp_path / 'mlflow.db'}")
    data = {**yaml.safe_load(config.read_text()), **yaml.safe_load(text)}
    config.write_text(yaml.safe_dump(data))
    started = time.time()
    result = run_module(["pipelines.study", "--config", str(config)], tmp_path, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
    assert message.replace("{tmp}", str(tmp_path)) in lines[0]
    assert "Ray" not in result.stdout and time.time() - started < 60
    assert not any((tmp_path / "ray").rglob("*"))  # no Ray experiment was started
