"""Benchmark 5, parallel scaling: study throughput (trials per hour) at concurrency 1 against 2, with
one CPU (one torch thread) per trial so that two trials do not fight over threads.

    python -m bench --only scaling --quick

The same study as benchmark 4 (configs/study/quick.yaml, fixed points, fixed workload), run whole at
each concurrency, interleaved. Throughput counts the trials a study finished per hour of its wall
time, end to end (Ray start and stop included) and inside `run_study` alone. On 2 cores the ideal
speedup is 2; other work on the machine (see machine.load_average) takes its share. On CUDA each
trial gets 1/concurrency of the GPU. Target: throughput at concurrency 2 / concurrency 1
>= 1.8 for trials of about 30 s (full mode; quick mode's 6 s trials are dominated by Ray's start).

Where the time goes is split into what the trials' own training takes (each trial's train_seconds:
it rises at concurrency 2 when the two trainings contend for memory bandwidth or the driver's cores)
and the fixed cost around them (Ray start and stop, Tune and MLflow bookkeeping, the driver).
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
    trials, reps = ctx.pick(2, 4, 4), ctx.study_repetitions(1, 1, 2)
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
    speedup = _median([a / b for a, b in zip(times["concurrency_1"], times["concurrency_2"], strict=True)])
    checks = [{"case": case["case"], "name": "throughput c2 / c1", "value_text": f"{speedup:.2f}",
               "target_text": "≥ 1.8", "passed": bool(speedup >= 1.8), "value": speedup}]
    for c in levels:
        per_hour = [3600 * trials / t for t in times[f"concurrency_{c}"]]
        inside = [3600 * trials / t for t in times[f"run_study_concurrency_{c}"]]
        done = [sum(row["status"] == "TERMINATED" for row in r["rows"]) for r in runs[c]]
        checks.append({"case": case["case"], "name": f"trials/hour at concurrency {c}",
                       "value_text": f"{_median(per_hour):.0f} (run_study only: {_median(inside):.0f})",
                       "target_text": "—", "passed": None, "value": _median(per_hour),
                       "run_study_only": _median(inside), "finished_trials": done})
    checks.append(_time_split(case["case"], runs))
    notes = ["speedup = paired ratio of study wall times at concurrency 1 and 2 (ideal 2 on 2 free cores)",
             "each trial: resources.cpu = 1 and torch.set_num_threads(1) (orchestrator.execution.trainable)",
             "time split: median per-trial training seconds at c1 and c2 (contention) and the seconds of each "
             "study's wall time not spent inside a training (fixed cost: Ray, Tune, MLflow, driver)"]
    return result(ctx, NAME, "study throughput at concurrency 1 vs 2", [case], notes, time.perf_counter() - start,
                  extra={"checks": checks, "study_runs": {str(c): r for c, r in runs.items()}})


def _time_split(case: str, runs: dict[int, list[dict]]) -> dict:
    """Per-trial training seconds at each concurrency and the study seconds outside the trainings."""
    train = {c: _median([row["train_seconds"] for r in rs for row in r["rows"] if row["train_seconds"]])
             for c, rs in runs.items()}
    fixed = {}
    for c, rs in runs.items():
        # wall time minus the trainings' share of it: at concurrency c, c trainings overlap
        fixed[c] = _median([r["total_s"] - sum(row["train_seconds"] or 0 for row in r["rows"]) / c for r in rs])
    text = (f"training per trial {train[1]:.1f} s (c1) vs {train[2]:.1f} s (c2, x{train[2] / train[1]:.2f}); "
            f"outside training {fixed[1]:.1f} s (c1) vs {fixed[2]:.1f} s (c2)")
    return {"case": case, "name": "where the time goes", "value_text": text, "target_text": "—", "passed": None,
            "train_seconds": train, "fixed_seconds": fixed}


def _median(values: list[float]) -> float:
    import statistics

    return statistics.median(values) if values else float("nan")
