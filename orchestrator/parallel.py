"""Independent jobs as parallel Ray core tasks: the analyses' trainings, on a laptop or a cluster.

    outcomes = run_tasks(train_one, [{"seed": 0}, {"seed": 1}], cpus_per_task=1, gpus_per_task=0)
    for outcome in outcomes:
        print(outcome.value if outcome.ok else outcome.error)

Without an address a private local Ray instance is started (and shut down afterwards); with one
(`auto`, `ray://host:10001`) the tasks go to that cluster and the cluster stays up. Each task gets
`cpus_per_task` torch threads. A GPU request on a cluster without GPUs would leave the tasks
pending forever (DESIGN.md field notes), so it drops to 0 with a warning. A failing task is
reported as an outcome with its error; the other tasks go on.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class TaskOutcome:
    """A task's return value, or the error that ended it (type: message)."""

    index: int
    value: Any = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def _call(fn: Callable[..., Any], threads: int, kwargs: dict[str, Any]) -> Any:
    import torch

    torch.set_num_threads(max(1, threads))
    return fn(**kwargs)


def _start_ray(address: str | None, num_cpus: int | None) -> bool:
    """Connect to `address`, or start a private local instance; True if we started (and must stop) it."""
    import ray

    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
        return False
    # a private instance listens on 127.0.0.1 only (Ray 2.60 binds to the external interface by default)
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING,
             _node_ip_address="127.0.0.1")
    return True


def run_tasks(fn: Callable[..., Any], kwargs_list: Sequence[dict[str, Any]], *, cpus_per_task: int = 1,
              gpus_per_task: float = 0, address: str | None = None, num_cpus: int | None = None,
              on_done: Callable[[TaskOutcome], None] | None = None) -> list[TaskOutcome]:
    """Run fn(**kwargs) for every kwargs as a Ray task; outcomes in input order.

    `fn` must be a module-level function (workers import it by name). `on_done` is called on the
    driver as each task finishes, in completion order (log progress, write results early).
    """
    if not address:  # read when ray is first imported: keeps a local instance off the external interface
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if cpus_per_task < 1:
        raise ValueError(f"cpus_per_task must be >= 1, got {cpus_per_task}")
    started = _start_ray(address, num_cpus)
    try:
        if gpus_per_task > 0 and ray.cluster_resources().get("GPU", 0) == 0:
            log.warning("gpus_per_task=%s asked for, but this Ray cluster has no GPU: running on CPUs "
                        "(a GPU task would stay pending forever)", gpus_per_task)
            gpus_per_task = 0
        remote = ray.remote(num_cpus=cpus_per_task, num_gpus=gpus_per_task, max_retries=0)(_call)
        pending = {remote.remote(fn, cpus_per_task, dict(kwargs)): i for i, kwargs in enumerate(kwargs_list)}
        outcomes: dict[int, TaskOutcome] = {}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            index = pending.pop(done[0])
            try:
                outcome = TaskOutcome(index, value=ray.get(done[0]))
            except ray.exceptions.RayTaskError as err:
                cause = getattr(err, "cause", None) or err
                outcome = TaskOutcome(index, error=f"{type(cause).__name__}: {cause}".splitlines()[0])
            except ray.exceptions.RayError as err:  # worker died, out of memory, ...
                outcome = TaskOutcome(index, error=f"{type(err).__name__}: {err}".splitlines()[0])
            outcomes[index] = outcome
            if on_done is not None:
                on_done(outcome)
        return [outcomes[i] for i in range(len(kwargs_list))]
    finally:
        if started:
            ray.shutdown()
