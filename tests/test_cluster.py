"""The cluster path: ray_cluster.yaml passes Ray's own cluster-config validation (no cloud calls), and a
study runs as a `ray job submit` job on a real `ray start --head` with its own temp dir and ports on
127.0.0.1, which the test stops by PID (never `ray stop`: other people's Ray may share the machine)."""

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # local Ray on 127.0.0.1 (before Ray's import)

import contextlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from orchestrator.tracking import Tracker

REPO = Path(__file__).resolve().parent.parent
RAY = Path(sys.executable).parent / "ray"


def test_cluster_config_passes_ray_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())
    config = prepare_config(raw)  # merges Ray's AWS defaults, as `ray up` does before it calls the cloud
    validate_config(config)  # jsonschema of ray-schema.json + Ray's own consistency checks
    head = config["available_node_types"][config["head_node_type"]]
    workers = [t for name, t in config["available_node_types"].items() if name != config["head_node_type"]]
    assert "GPU" not in head.get("resources", {}) and workers and workers[0]["max_workers"] >= 1
    assert any("pip install" in c and "-e ." in c for c in config["setup_commands"])
    assert "." in config["file_mounts"].values()
    starts = " ".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    assert "pipelines.tracking_server" in starts and "--auth" in starts  # the head's MLflow lets only its users in
    assert "PASSWORD=" not in starts and "mlflow.env" in starts  # credentials from a mounted file, never a command


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _session_pids(marker: str) -> set[int]:
    """Processes whose command line names our private temp dir, and all their descendants."""
    procs = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            command = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            parent = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        procs[int(entry)] = (command, parent)
    found = {pid for pid, (command, _) in procs.items() if marker in command}
    while True:
        children = {pid for pid, (_, parent) in procs.items() if parent in found} - found
        if not children:
            return found
        found |= children


def _stop(marker: str) -> None:
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        for pid in _session_pids(marker):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.time() + wait
        while _session_pids(marker) and time.time() < deadline:
            time.sleep(0.5)


@pytest.fixture
def ray_head():
    """`ray start --head` on 127.0.0.1 with its own temp dir and free ports; yields the dashboard URL."""
    temp_dir = tempfile.mkdtemp(prefix="nsray", dir="/tmp")  # short: Unix socket paths are limited to 107 bytes
    ports = _free_ports(9)
    low = 20000 + (os.getpid() % 300) * 100
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    command = [str(RAY), "start", "--head", "--node-ip-address", "127.0.0.1", "--temp-dir", temp_dir,
               "--num-cpus", "2", "--num-gpus", "0", "--disable-usage-stats",
               "--port", str(ports[0]), "--dashboard-port", str(ports[1]), "--ray-client-server-port", str(ports[2]),
               "--node-manager-port", str(ports[3]), "--object-manager-port", str(ports[4]),
               "--dashboard-agent-listen-port", str(ports[5]), "--dashboard-agent-grpc-port", str(ports[6]),
               "--metrics-export-port", str(ports[7]), "--runtime-env-agent-port", str(ports[8]),
               "--min-worker-port", str(low), "--max-worker-port", str(low + 99),
               "--include-dashboard=true", "--dashboard-host", "127.0.0.1"]
    try:
        started = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
        assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
        yield f"http://127.0.0.1:{ports[1]}"
    finally:
        _stop(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_study_runs_as_a_ray_job(ray_head, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "token"  # Ray 2.60 clusters started here use token auth (~/.ray/auth_token)
    job = subprocess.run(
        [str(RAY), "job", "submit", "--address", ray_head, "--working-dir", str(REPO), "--",
         sys.executable, "-m", "pipelines.study", "--config", "configs/study/tiny.yaml", "--smoke-test",
         "--tracking-uri", uri, "--storage", str(tmp_path / "ray"), "--name", "job", "--no-confirm"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=480)
    assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-2000:]
    assert "succeeded" in job.stdout + job.stderr and "Pareto front" in job.stdout
    tracker = Tracker(uri, "nslab-tiny")
    (parent,) = tracker.find_runs("tags.`nslab.kind` = 'study'")
    assert parent.info.status == "FINISHED"
    roles = [c.data.tags["nslab.role"] for c in tracker.children(parent.info.run_id)]
    assert (roles.count("search"), roles.count("baseline"), roles.count("confirm")) == (2, 1, 0)
