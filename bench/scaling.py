"""Benchmark 5, parallel scaling: study throughput (trials per hour) at concurrency 1 against 2, with
one CPU (one torch thread) per trial so that two trials do not fight over threads.

    python -m bench --only scaling --quick

The same study as benchmark 4 (configs/study/quick.yaml, fixed points, fixed workload), run whole at
each concurrency, interleaved. Throughput counts the trials a study finished per hour of its wall
time, end to end (Ray start and stop included) and inside `run_study` alone. On 2 cores the ideal
speedup is 2; other work on the machine (see machine.load_average) takes its share. On CUDA each
trial gets 1/concurrency of the GPU.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from bench.harness import Context, interleave, make_case, result
from bench.orchestration import make_study, run_study_once, warm_up, workload

NAME = "scaling"


def run(ctx: Context) -> dict:
    start = time.perf_counter()
    trials, reps = ctx.pick(2, 4, 4), ctx.pick(1, 1, 2)
    levels = (1, 2)
    runs: dict[int, list[dict]] = {c: [] for c in levels}
    with tempfile.TemporaryDirectory(prefix="nslab-bench-") as tmp:
        root = Path(tmp)
        warm_up(make_study(ctx, trials, 1, root))

        def variant(concurrency: int):
            return lambda: runs[concurrency].append(run_study_once(make_study(ctx, trials, concurrency, root)))

        times = interleave({f"concurrency_{c}": variant(c) for c in levels}, reps, 0, torch.device("cpu"))
    for c in levels:
        times[f"run_study_concurrency_{c}"] = [r["run_study_s"] for r in runs[c]]
    case = make_case(f"{trials} trials", times,
                     ratios={"speedup (c1/c2 wall)": ("concurrency_1", "concurrency_2", None),
                             "speedup run_study only": ("run_study_concurrency_1", "run_study_concurrency_2", None)},
                     params={"trials": trials, "cpus_per_trial": 1, "threads_per_trial": 1, "levels": list(levels),
                             "workload": workload(ctx)})
    checks = []
    for c in levels:
        per_hour = [3600 * trials / t for t in times[f"concurrency_{c}"]]
        inside = [3600 * trials / t for t in times[f"run_study_concurrency_{c}"]]
        done = [sum(row["status"] == "TERMINATED" for row in r["rows"]) for r in runs[c]]
        checks.append({"case": case["case"], "name": f"trials/hour at concurrency {c}",
                       "value_text": f"{_median(per_hour):.0f} (run_study only: {_median(inside):.0f})",
                       "target_text": "—", "passed": None, "value": _median(per_hour),
                       "run_study_only": _median(inside), "finished_trials": done})
    notes = ["speedup = paired ratio of study wall times at concurrency 1 and 2 (ideal 2 on 2 free cores); "
             "it is a reference figure, the issue sets no target for it",
             "each trial: resources.cpu = 1 and torch.set_num_threads(1) (orchestrator.trial)"]
    return result(ctx, NAME, "study throughput at concurrency 1 vs 2", [case], notes, time.perf_counter() - start,
                  extra={"checks": checks, "study_runs": {str(c): r for c, r in runs.items()}})


def _median(values: list[float]) -> float:
    import statistics

    return statistics.median(values) if values else float("nan")
