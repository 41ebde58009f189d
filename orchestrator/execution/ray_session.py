"""The one place nslab starts and stops Ray, asks it for resources, and tames its repeated warnings.

    with ray_session(address=None):        # $RAY_ADDRESS / address: join that cluster; else a local Ray
        ...                                # studies, confirmations and analyses run their Tune trials here

A local Ray listens on 127.0.0.1 only (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, set before Ray is imported:
Ray 2.60 binds to the external interface otherwise) and uses every core; it is shut down on exit. A
session that joined an existing cluster leaves it running. Never `ray stop`: it kills every Ray on the
machine, other people's too.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

log = logging.getLogger(__name__)


class OnceFilter(logging.Filter):
    """Lets each distinct warning through once per process (Ray repeats some every few seconds)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key = record.getMessage()[:120]
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


_ONCE = OnceFilter()


def quiet_repeats() -> None:
    """Install the once-filter on the loggers whose warnings repeat during a study."""
    for name in ("ray.tune", "ray.tune.execution.experiment_state", "ray.tune.execution.tune_controller",
                 "ray.tune.execution.insufficient_resources_manager", "ray.train", "ray.air"):
        logger = logging.getLogger(name)
        if _ONCE not in logger.filters:
            logger.addFilter(_ONCE)


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[bool]:
    """Connect to `address` or $RAY_ADDRESS, else start a local Ray; yields True when it started one."""
    target = address or os.environ.get("RAY_ADDRESS")
    if not target:  # read when ray is first imported
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        # Ray starts workers at nice 15: any busy process at the usual priority (a browser, an editor, pytest)
        # then starves the trials, which do all the work of a local study, until Tune waits on them for minutes
        os.environ.setdefault("RAY_worker_niceness", "0")
    # experiment state is snapshotted at most this often (Tune's default waits >= 10 s, so a killed driver
    # would resume trials from older checkpoints than they had)
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "5")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")  # the 5 s is on purpose
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's console boxes: nslab prints its own trial lines
    import ray

    quiet_repeats()
    if ray.is_initialized():
        yield False
        return
    if target:
        ray.init(address=target, logging_level=logging.WARNING)
    else:
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
                 logging_level=logging.WARNING, _node_ip_address="127.0.0.1")
    try:
        yield not target
    finally:
        if not target:
            ray.shutdown()


def gpus_available() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0))


def trial_resources(cpu: float, gpu: float, keep_gpu: bool = False) -> dict[str, float]:
    """cpu/gpu per trial; a GPU request on a cluster without GPUs drops to 0 (else trials wait forever)."""
    if gpu > 0 and not keep_gpu and gpus_available() == 0:
        log.warning("trials ask for %.3g GPU each but the Ray cluster has none: running on CPUs (pass --keep-gpu "
                    "on an autoscaling cluster whose GPU workers are not up yet)", gpu)
        gpu = 0.0
    return {"cpu": cpu, "gpu": gpu}
