"""Fault injection for the tests: a pipeline in a process group of its own (killed with everything it started,
by PID), a real `mlflow server` stopped and restarted, and readers of the record the faults must leave intact
(run counts, statuses, every epoch logged exactly once). Used by test_faults*.py."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml
from conftest import TINY_STUDY, subprocess_env

from orchestrator.record.tracking import Tracker


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
