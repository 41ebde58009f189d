"""Benchmark 4, orchestration overhead: a study of K trials (Ray Tune + Optuna + MLflow, as
`python -m pipelines.study` runs it) against the same K trainings back to back in one process, at
equal concurrency (1 trial at a time, 1 torch thread each).

    python -m bench --only orchestration --quick

The study variant is what a user waits for: local Ray start, `run_study` (trials in Ray workers,
MLflow runs, per-epoch checkpoints and sensitivity tables, the final tables and plots) and Ray
shutdown. The bare variant is `ns_core.experiment.run_experiment` on the same experiments (the
study's fixed `points_to_evaluate`, so both train exactly the same configurations). Targets:
study/bare <= 1.10 for trials of about 30 s; per-trial overhead <= 2 s, where a trial's
overhead is its wall time seen by the driver minus the same training run bare (it bounds the
trial's setup from above: it also holds its logging and checkpoints).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import torch

from bench.harness import REPO, Context, interleave, make_case, result

NAME = "orchestration"
STUDY_CONFIG = REPO / "configs" / "study" / "quick.yaml"
POINTS = [(0.01, 0.1), (0.03, 0.2), (0.05, 0.1), (0.02, 0.3), (0.04, 0.15), (0.01, 0.25)]  # (sns.lam, fraction)


def workload(ctx: Context) -> dict:
    """Experiment overrides giving trials of ~30 s (full), ~6 s (quick), ~2 s (tiny) on one CPU thread."""
    train_limit, epochs = ctx.pick((256, 1), (2000, 2), (None, 6))
    steps = ctx.pick(2, 10, 10)
    return {"data.train_limit": train_limit, "train.epochs": epochs, "sns.warmup_epochs": min(1, epochs - 1),
            "sns.warmup_share": None, "train.eps_ramp_epochs": 0,
            "data.val_size": ctx.pick(64, 200, 200), "train.val_attack": {"name": "pgd", "eps": 0.2, "steps": steps},
            "train.probe_size": 128, "data.test_limit": 500, "attack.steps": steps,
            "train.device": "cpu" if not ctx.cuda else "auto"}


def make_study(ctx: Context, trials: int, concurrency: int, root: Path):
    """configs/study/quick.yaml with `workload`, K fixed points, and tracking/storage under `root`."""
    from orchestrator.config.loader import apply_overrides
    from orchestrator.config.study import load_study, resolve_locations

    study = load_study(STUDY_CONFIG)
    study.experiment = apply_overrides(study.experiment, workload(ctx))
    study.study.trials, study.study.concurrency, study.study.scheduler = trials, concurrency, "none"
    study.study.resources.cpu, study.study.resources.gpu = 1, (1 / concurrency if ctx.cuda else 0)
    study.study.points_to_evaluate = [{"sns.lam": lam, "sns.fraction": frac} for lam, frac in POINTS[:trials]]
    study.search_space = {k: v for k, v in study.search_space.items() if k in ("sns.lam", "sns.fraction")}
    study.baseline, study.confirm = None, None  # the trials alone: what Ray Tune and MLflow add to each
    study.tracking.uri = f"sqlite:///{root / 'mlflow.db'}"
    study.tracking.experiment = "nslab-bench"
    study.storage.ray = str(root / "ray_results")
    return resolve_locations(study)


def run_study_once(study) -> dict:
    """Start a local Ray, run the study, shut Ray down; seconds of each part and each trial's row."""
    from orchestrator.execution.ray_session import ray_session

    start = time.perf_counter()
    with ray_session():
        from orchestrator.study.driver import run_study

        ray_up = time.perf_counter()
        inside = time.perf_counter()
        outcome = run_study(study, f"bench-{uuid.uuid4().hex[:8]}")
        outcome.seconds = time.perf_counter() - inside
    end = time.perf_counter()
    rows = [{"status": r["status"], "wall_seconds": r["wall_seconds"], "train_seconds": r["train_seconds"],
             "params": {k.removeprefix("param."): v for k, v in r.items() if k.startswith("param.")}}
            for r in outcome.rows]
    return {"total_s": end - start, "ray_init_s": ray_up - start, "run_study_s": outcome.seconds,
            "ray_shutdown_s": end - ray_up - outcome.seconds, "rows": rows}


def run_bare_once(study) -> list[dict]:
    """The same experiments as the study's trials, back to back in this process; seconds per training."""
    from ns_core.objectives import TrainingCollapsed
    from ns_core.training import TrainingDiverged
    from orchestrator.config.loader import apply_overrides
    from orchestrator.run import build_trainer

    out = []
    for point in study.study.points_to_evaluate:
        start = time.perf_counter()
        status = "TERMINATED"
        try:
            build_trainer(apply_overrides(study.experiment, point)).fit()
        except (TrainingCollapsed, TrainingDiverged) as err:  # a study records these as failed trials
            status = type(err).__name__
        out.append({"params": point, "seconds": time.perf_counter() - start, "status": status})
    return out


def warm_up(study) -> None:
    """Untimed: the driver's imports, the MLflow store (a user's mlflow.db already exists) and one tiny
    training in this process, so neither variant pays one-time costs the other does not."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import orchestrator.study.driver  # noqa: F401  (Ray Tune, Optuna)
    from orchestrator.config.experiment import smoke_experiment
    from orchestrator.record.tracking import Tracker
    from orchestrator.run import build_trainer

    Tracker(study.tracking.uri, study.tracking.experiment)
    build_trainer(smoke_experiment(study.experiment)).fit()


def in_trial_overhead(study_runs: list[dict], bare_runs: list[list[dict]]) -> list[float]:
    """Each trial's running time seen by the driver minus the median bare time of the same configuration."""
    bare: dict[tuple, list[float]] = {}
    for run in bare_runs:
        for item in run:
            bare.setdefault(_key(item["params"]), []).append(item["seconds"])
    overheads = []
    for run in study_runs:
        for row in run["rows"]:
            key = _key(row["params"])
            if row["wall_seconds"] is not None and key in bare:
                overheads.append(row["wall_seconds"] - statistics.median(bare[key]))
    return overheads


def _key(params: dict) -> tuple:
    return tuple(sorted((k, round(float(v), 6)) for k, v in params.items()))


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def run(ctx: Context) -> dict:
    start = time.perf_counter()
    trials, reps = ctx.pick(2, 2, 3), ctx.study_repetitions(1, 2, 2)
    torch.set_num_threads(1)  # the bare trainings get what each trial gets (resources.cpu = 1)
    with tempfile.TemporaryDirectory(prefix="nslab-bench-") as tmp:
        root = Path(tmp)
        warm_up(make_study(ctx, trials, 1, root))
        study_runs: list[dict] = []
        bare_runs: list[list[dict]] = []
        variants = {"study": lambda: study_runs.append(run_study_once(make_study(ctx, trials, 1, root))),
                    "bare": lambda: bare_runs.append(run_bare_once(make_study(ctx, trials, 1, root)))}
        times = interleave(variants, reps, 0, torch.device("cpu"))
    torch.set_num_threads(ctx.threads)
    times["run_study_only"] = [r["run_study_s"] for r in study_runs]
    bare_per_trial = [i["seconds"] for r in bare_runs for i in r]
    case = make_case(f"{trials} trials, concurrency 1", times,
                     ratios={"study/bare": ("study", "bare", 1.10),
                             "run_study_only/bare": ("run_study_only", "bare", None)},
                     params={"trials": trials, "concurrency": 1, "threads_per_trial": 1, "workload": workload(ctx),
                             "points": [{"sns.lam": lam, "sns.fraction": f} for lam, f in POINTS[:trials]],
                             "median_bare_trial_s": _median(bare_per_trial)})
    # per-trial overhead: what the study adds per trial beyond its training, Ray's start/stop left out
    per_trial = [(s["run_study_s"] - b) / trials for s, b in zip(study_runs, times["bare"], strict=True)]
    in_trial = in_trial_overhead(study_runs, bare_runs)
    between = [(r["run_study_s"] - sum(row["wall_seconds"] or 0 for row in r["rows"])) / trials for r in study_runs]
    ray_fixed = [r["ray_init_s"] + r["ray_shutdown_s"] for r in study_runs]
    checks = [
        _check(case, "per-trial overhead (s)", per_trial, "≤ 2 s", 2.0),
        _check(case, "  of which inside the trial (s)", in_trial),
        _check(case, "  of which outside trials (s)", between),
        _check(case, "Ray start + stop per study (s)", ray_fixed),
    ]
    notes = ["study = init_ray + run_study + ray.shutdown in this process, as `python -m pipelines.study` pays "
             "it (minus the CLI's imports, warmed up here for both variants); run_study_only leaves Ray's "
             "start and stop out",
             "per-trial overhead = (run_study - bare) / K: inside the trial (trial wall seen by the driver - "
             "the same training bare: MLflow child run, per-epoch tables, checkpoints, plots) plus outside "
             "trials ((run_study - sum of trial walls) / K: new worker process and its imports per trial, "
             "MLflow parent run, final tables and plots)"]
    if ctx.mode != "full":
        notes.append(f"{ctx.mode} mode: trials are far shorter than the ~30 s the target assumes, so fixed "
                     "costs weigh more; read the full-mode figure against the target")
    return result(ctx, NAME, "study of K trials vs the same trainings back to back in one process", [case], notes,
                  time.perf_counter() - start, extra={"checks": checks, "study_runs": study_runs,
                                                      "bare_runs": bare_runs})


def _check(case: dict, name: str, values: list[float], target_text: str = "—", target: float | None = None) -> dict:
    value = _median(values)
    spread = f" (range {min(values):.2f}-{max(values):.2f})" if len(values) > 1 else ""
    return {"case": case["case"], "name": name, "value": value, "all": values, "target_text": target_text,
            "value_text": f"{value:.2f} s{spread}", "passed": None if target is None else bool(value <= target)}
