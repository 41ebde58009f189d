"""Shared fixtures and the two test tiers.

`make test` runs every test. `make test-fast` (NSLAB_TEST_TIER=fast, `-m "not slow"`) is the edit loop: no
Ray, no Python subprocess, no training beyond a few steps; a test that starts Ray or a pipeline process in that
tier fails with a line saying to mark it slow, so the tier stays honest.

Every test runs with NSLAB_MEMORY_FORMAT=contiguous (unless it sets the format itself): the format a process
picks by timing must not decide a float path, or two runs of one study could differ. Ray workers inherit it,
and PYTHONPATH with this folder (tests/user_models.py is a researcher's own model, named by import path).
"""

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # local Ray on 127.0.0.1 (before Ray's import)
os.environ["NSLAB_MEMORY_FORMAT"] = os.environ.get("NSLAB_MEMORY_FORMAT") or "contiguous"
os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests")])
# One torch thread in every process the tests start (pipeline subprocesses, Ray workers), as in this one: two test
# workers on two cores, each process with two spinning OpenMP threads, ran a 23-second fault test in 135 s.
os.environ["OMP_NUM_THREADS"] = "1"
FAST = os.environ.get("NSLAB_TEST_TIER") == "fast"

from orchestrator.config.experiment import ExperimentConfig  # noqa: E402
from orchestrator.config.loader import apply_overrides, load_config  # noqa: E402
from orchestrator.run import build_trainer  # noqa: E402

torch.set_num_threads(1)  # deterministic speed on a shared 2-core box; Ray trials set their own
QUICK = REPO / "configs" / "experiment" / "quick.yaml"
TINY_STUDY = REPO / "configs" / "study" / "tiny.yaml"
TRAINED_EPS = 0.15
RAY = Path(sys.executable).parent / "ray"


SLOW_FIXTURES = {"trained_models", "local_ray", "ray_head"}  # they train for seconds or start Ray: users are slow


# The files that take longest (about a minute or more each), longest first. `make test` hands whole files to two
# workers in collection order (--dist loadfile --no-loadscope-reorder): started first, they run side by side while
# the many short files fill in around them, instead of one of them starting last on a worker of its own.
LONGEST_FIRST = ["test_faults_driver.py", "test_sequential.py", "test_reproducible.py", "test_faults_server.py",
                 "test_study.py", "test_own_models.py", "test_faults.py", "test_analyze.py"]


def pytest_collection_modifyitems(items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order within a file is kept


@pytest.fixture(autouse=True)
def drop_cli_log_handlers():
    """A pipeline's main() run in this process points the root logger at the test's captured stderr, which
    pytest closes after the test: drop that handler, or every later log line prints 'Logging error'."""
    yield
    root = logging.getLogger()
    for handler in [h for h in root.handlers if type(h) is logging.StreamHandler]:  # not pytest's own subclasses
        root.removeHandler(handler)


@pytest.fixture(scope="session", autouse=True)
def fast_tier_guard():
    """In the fast tier, starting Ray or a Python subprocess (a pipeline, a server) is a test-tier mistake,
    reported as such."""
    if not FAST:
        yield
        return
    import ray

    popen = subprocess.Popen.__init__

    def refuse(*args, **kwargs):
        raise RuntimeError("the fast tier starts no Ray and no subprocess: mark this test @pytest.mark.slow")

    def no_python(self, command, *args, **kwargs):  # `git` or `uname` (platform info) are fine; a pipeline is not
        program = Path(str(command[0] if isinstance(command, list | tuple) else str(command).split()[0])).name
        if program.startswith("python") or program in ("ray", "mlflow", Path(sys.executable).name):
            refuse()
        popen(self, command, *args, **kwargs)

    patch = pytest.MonkeyPatch()
    patch.setattr(subprocess.Popen, "__init__", no_python)
    patch.setattr(ray, "init", refuse)
    yield
    patch.undo()


def tiny_experiment(method: str = "pgd_at", epochs: int = 1, train_limit: int = 256, **overrides) -> ExperimentConfig:
    """A seconds-long experiment: a few hundred mnist5k digits, PGD-3 training, 64 validation digits."""
    base = load_config(QUICK, ExperimentConfig)
    return apply_overrides(base, {
        "method": method, "name": f"tiny-{method}", "attack.steps": 3, "train.epochs": epochs,
        "train.eps_ramp_epochs": 0, "train.batch_size": 64, "train.probe_size": 64,
        "train.val_attack": {"name": "pgd", "eps": 0.2, "steps": 3}, "data.train_limit": train_limit,
        "data.val_size": 64, "data.test_limit": 256, "eval.examples": 64, "eval.check_examples": 32,
        "eval.sensitivity_examples": 64, "sns.warmup_epochs": min(1, epochs - 1),
        "eval.attacks": [{"name": "fgsm", "eps": 0.2}, {"name": "pgd", "eps": 0.2, "steps": 3}], **overrides})


@pytest.fixture
def make_experiment():
    return tiny_experiment


@pytest.fixture(scope="module")
def make_experiment_module():
    return tiny_experiment


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """A LeNet-5 checkpoint after a few PGD-AT steps: a valid nslab checkpoint for input-handling tests."""
    experiment = tiny_experiment("pgd_at", train_limit=128, **{"attack.eps": TRAINED_EPS, "attack.steps": 1,
                                                                "train.val_attack": {"name": "fgsm", "eps": 0.15}})
    trainer = build_trainer(experiment)
    trainer.fit()
    path = tmp_path_factory.mktemp("checkpoint") / "pgd_at.pt"
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="session")
def trained_models(tmp_path_factory):
    """Standard, PGD-AT and SNS LeNet-5s trained for a few seconds on 2,000 mnist5k digits at Linf eps 0.15
    (PGD-AT: ~90% clean, ~55% PGD), with their checkpoints: {method: (trainer, checkpoint path)}."""
    folder = tmp_path_factory.mktemp("trained")
    out = {}
    for method in ("standard", "pgd_at", "sns"):
        experiment = tiny_experiment(method, epochs=4, train_limit=2000, **{
            "attack.eps": TRAINED_EPS, "attack.steps": 5, "sns.warmup_epochs": 2, "sns.lam": 0.1, "train.lr": 3e-3,
            "data.val_size": 200, "train.val_attack": {"name": "pgd", "eps": TRAINED_EPS, "steps": 5}})
        trainer = build_trainer(experiment)
        trainer.fit()
        path = folder / f"{method}.pt"
        trainer.save_checkpoint(path)
        out[method] = (trainer, path)
    return out


@pytest.fixture(scope="session")
def local_ray():
    """One local Ray (2 CPUs, 127.0.0.1) for every in-process study of the session."""
    from orchestrator.execution.ray_session import ray_session

    with ray_session(num_cpus=2):
        yield


def subprocess_env(**extra: str) -> dict:
    """The environment a pipeline subprocess gets: this checkout importable, no inherited cluster or store."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    return {**env, **extra}


def run_module(args: list[str], cwd: Path, timeout: int = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=subprocess_env(**env), capture_output=True,
                          text=True, timeout=timeout)


# ---- a real Ray cluster head, for `ray job submit` ------------------------------------------------------


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


@pytest.fixture(scope="module")
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
