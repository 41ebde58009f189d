"""Faults injected into real components (local Ray, Optuna, SQLite MLflow or a real `mlflow server` on
127.0.0.1), each followed by a check of the record: run counts, statuses, and every epoch logged exactly once.

- several writers opening one new SQLite store at the same moment;
- a trial's worker process killed (SIGKILL, by PID) mid-epoch (the study in this process's Ray);
- the driver killed (SIGKILL) mid-search and again between confirmation seeds, then the same command (flags
  included) with --resume;
- an authenticated tracking server stopped mid-study and restarted; a client without credentials refused;
- a checkpoint cut short before a resume;
- storage and data paths that cannot be used (one line, before Ray starts).
"""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import REPO, TINY_STUDY, run_module, subprocess_env

from orchestrator.tracking import Tracker
from pipelines import tracking_server, train

pytestmark = pytest.mark.slow


def write_study(tmp_path: Path, uri: str, name: str = "study.yaml", **blocks) -> Path:
    data = {"base": str(TINY_STUDY), "tracking": {"uri": uri, "experiment": "faults"},
            "storage": {"ray": str(tmp_path / "ray")}, **blocks}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def start(args: list[str], cwd: Path, **env: str) -> subprocess.Popen:
    """A pipeline in a process group of its own: killing the group takes its local Ray's agents with it."""
    return subprocess.Popen([sys.executable, "-m", *args], cwd=cwd, env=subprocess_env(**env), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def kill_group(process: subprocess.Popen) -> None:
    """SIGKILL a process started by `start` and everything in its group (its Ray's processes), by PID."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)


def finish(process: subprocess.Popen, timeout: float = 400) -> tuple[int, str]:
    try:
        output, _ = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            kill_group(process)
    return process.returncode, output


def wait_for(condition, timeout: float = 240, every: float = 0.5, what: str = "condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def runs(uri: str) -> list:
    try:
        return Tracker(uri, "faults").find_runs("tags.`nslab.kind` = 'trial'")
    except Exception:  # the store may not exist yet, or the server may be down
        return []


def epochs_logged(uri: str, run, metric: str = "val/robust_acc") -> list[int]:
    return sorted(m.step for m in Tracker(uri, "faults").client.get_metric_history(run.info.run_id, metric))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A real `mlflow server` (python -m pipelines.tracking_server) on 127.0.0.1, stopped by its PID."""

    def __init__(self, store: Path, auth: bool = False, **env: str) -> None:
        self.store, self.auth, self.env, self.port = store, auth, env, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        args = ["pipelines.tracking_server", "--store", str(self.store), "--port", str(self.port), "--workers", "1"]
        self.process = subprocess.Popen([sys.executable, "-m", *args, *(["--auth"] if self.auth else [])],
                                        env=subprocess_env(**self.env), stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, start_new_session=True)
        wait_for(self.healthy, timeout=90, what="the MLflow server")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)  # its own process group: the server and its workers
            self.process.wait(timeout=30)
        self.process = None


WRITER = """
import sys
from orchestrator.tracking import Tracker
from pipelines import tracking_server, train
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
    from orchestrator.study import run_study
    from orchestrator.study_config import load_study

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


def test_a_killed_driver_resumes_mid_search_and_between_seeds_with_the_flags_it_started_with(tmp_path):
    """Started with flags that change the config, killed twice, continued by the same command plus --resume."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = write_study(tmp_path, uri, study={"share_warmup": False})
    command = ["pipelines.study", "--config", str(config), "--name", "kill-driver", "--trials", "2",
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
        "confirm.seeds": 1, "confirm.max_seeds": 2, "study.trials": 2}
    everything = tracker.children(parent.info.run_id)
    for run in everything:  # finished, or lost with a driver before Tune recorded it: closed and tagged
        assert run.info.status == "FINISHED" or (run.info.status == "KILLED" and "nslab.orphaned" in run.data.tags), (
            run.info.run_name, run.info.status, run.data.tags.get("failure_reason"))
    children = [c for c in everything if "nslab.orphaned" not in c.data.tags]
    labels = [c.info.run_name for c in children]
    assert len(labels) == len(set(labels)), labels  # one run per trial, none duplicated
    confirms = sorted(label for label in labels if label.startswith("confirm-"))
    assert confirms == ["confirm-baseline-s1", "confirm-baseline-s2", "confirm-sns-s1", "confirm-sns-s2"]
    assert sorted(label for label in labels if label.startswith(("sns-", "baseline"))) == ["baseline", "sns-01",
                                                                                             "sns-02"]
    for child in children:
        if child.data.tags["nslab.role"] != "warmup":
            assert epochs_logged(uri, child) == [1, 2], child.info.run_name
    table = tracker.read_table(parent.info.run_id, "study/confirmation.parquet")
    assert sorted(table.column("seed").to_pylist()) == [1, 1, 2, 2]


def test_an_authenticated_server_goes_down_mid_study_lets_only_its_users_in_and_nothing_is_lost(tmp_path, capsys):
    admin = {"MLFLOW_AUTH_ADMIN_PASSWORD": "admin-password-0123"}
    server = Server(tmp_path / "server", auth=True, **admin)
    server.start()
    try:
        with pytest.MonkeyPatch.context() as env:
            for key, value in (("MLFLOW_TRACKING_USERNAME", "admin"), ("NSLAB_NEW_PASSWORD", "alice-password-0123"),
                               ("MLFLOW_TRACKING_PASSWORD", admin["MLFLOW_AUTH_ADMIN_PASSWORD"])):
                env.setenv(key, value)
            assert tracking_server.main(["--add-user", "alice", "--tracking-uri", server.uri]) == 0
        alice = {"MLFLOW_TRACKING_USERNAME": "alice", "MLFLOW_TRACKING_PASSWORD": "alice-password-0123",
                 "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}  # an integer: retries after 1, 3, 7, 15, 31, 63 s
        config = write_study(tmp_path, server.uri, study={"trials": 1, "share_warmup": False}, confirm=None,
                             experiment={"train": {"epochs": 3}, "data": {"train_limit": 512}})
        study = start(["pipelines.study", "--config", str(config), "--name", "outage"], tmp_path, **alice)
        try:
            os.environ.update(alice)
            wait_for(lambda: study.poll() is not None or any(len(epochs_logged(server.uri, r)) >= 1 for r in runs(
                server.uri) if r.data.tags.get("nslab.role") == "search"), what="a logged epoch")
            assert study.poll() is None, f"the study ended before the outage: {finish(study)[1][-3000:]}"
            server.stop()
            time.sleep(2)  # trials keep training; their MLflow calls retry with backoff
            server.start()
            code, output = finish(study)
            trials = runs(server.uri)
        finally:
            kill_group(study)
            for key in alice:
                os.environ.pop(key, None)
        assert code == 0, output[-3000:]
        assert "alice-password" not in output
        roles = sorted(r.data.tags["nslab.role"] for r in trials)
        assert roles == ["baseline", "search"] and {r.info.status for r in trials} == {"FINISHED"}
        for run in trials:
            if run.data.tags["nslab.role"] != "warmup":
                os.environ.update(alice)
                try:
                    assert epochs_logged(server.uri, run) == [1, 2, 3], run.info.run_name
                finally:
                    for key in alice:
                        os.environ.pop(key, None)
        capsys.readouterr()
        assert train.main(["--config", str(REPO / "configs/experiment/quick.yaml"), "--smoke-test", "--tracking-uri",
                           server.uri, "--runs-dir", str(tmp_path / "r")]) == 2  # no credentials in this process
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and f"the MLflow server {server.uri} refused the request: not authenticated" in lines[0]
    finally:
        server.stop()


def test_a_checkpoint_cut_short_gives_way_to_the_previous_one(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["pipelines.train", "--config", str(REPO / "configs/experiment/quick.yaml"), "--tracking-uri", uri,
            "--runs-dir", str(tmp_path / "runs"), "--name", "cut", "--set", "train.epochs=3", "--set", "method=pgd_at",
            "--set", "data.train_limit=600", "--set", "attack.steps=5", "--set", "data.val_size=100",
            "--set", "eval.attacks=[{name: fgsm, eps: 0.2}]", "--set", "eval.examples=64"]
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
