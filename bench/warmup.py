"""Benchmark, shared warm-ups: the epochs (and wall time) of one study with and without them.

    python -m bench --only warmup --quick

The demo study (configs/study/quick.yaml: a PGD-AT baseline and SNS trials whose warm-up length is searched)
at a smaller budget, run whole with `study.share_warmup` on and off, interleaved. Without sharing every SNS
trial retrains its own PGD-AT warm-up; with it one warm-up trial trains the longest warm-up once and every
trial forks from its own length (the baseline continues the longest). Target: epochs trained with sharing <=
baseline epochs + sum over SNS trials of (epochs - warm-up). Confirmation is left out (its seeds share no
warm-up: each seed trains its own).
"""

from __future__ import annotations

import tempfile
import time
import uuid
from pathlib import Path

import torch

from bench.harness import REPO, Context, interleave, make_case, result

NAME = "warmup"
POINTS = [(0.3, 0.2, 1), (0.1, 0.3, 2), (0.5, 0.1, 3), (0.05, 0.25, 2), (0.2, 0.15, 1), (1.0, 0.2, 3)]


def make_study(ctx: Context, root: Path, share: bool, trials: int):
    from orchestrator.config.loader import apply_overrides
    from orchestrator.config.search_space import ParamSpec
    from orchestrator.config.study import load_study, resolve_locations

    study = load_study(REPO / "configs" / "study" / "quick.yaml")
    epochs = ctx.pick(2, 4, 10)
    steps = ctx.pick(2, 5, 10)
    study.experiment = apply_overrides(study.experiment, {
        "data.train_limit": ctx.pick(256, 1000, None), "data.val_size": ctx.pick(64, 200, 500),
        "train.epochs": epochs, "attack.steps": steps, "train.val_attack": {"name": "pgd", "eps": 0.2, "steps": steps},
        "train.eps_ramp_epochs": 0, "sns.warmup_share": None,
        "train.device": "auto" if ctx.cuda else "cpu"})
    study.search_space = {"sns.lam": study.search_space["sns.lam"], "sns.fraction": study.search_space["sns.fraction"],
                          "sns.warmup_epochs": ParamSpec(type="int", low=1, high=min(3, epochs - 1))}
    study.study.points_to_evaluate = [{"sns.lam": lam, "sns.fraction": f, "sns.warmup_epochs": min(w, epochs - 1)}
                                      for lam, f, w in POINTS[:trials]]
    study.study.trials, study.study.concurrency, study.study.share_warmup = trials, 2, share
    study.study.scheduler = "none"
    study.study.resources.gpu = 0.5 if ctx.cuda else 0
    study.confirm = None
    study.tracking.uri, study.tracking.experiment = f"sqlite:///{root / 'mlflow.db'}", "nslab-bench"
    study.storage.ray = str(root / "ray_results")
    return resolve_locations(study)


def run_once(study) -> dict:
    from orchestrator.execution.ray_session import ray_session

    start = time.perf_counter()
    with ray_session():
        from orchestrator.study.driver import run_study

        outcome = run_study(study, f"bench-{uuid.uuid4().hex[:8]}")
    warmups = [r["param.sns.warmup_epochs"] for r in outcome.rows if r["role"] == "search"]
    epochs = study.experiment.train.epochs
    return {"seconds": time.perf_counter() - start, "epochs_trained": outcome.epochs_trained,
            "epochs_without_sharing": outcome.epochs_unshared,
            "target_epochs": epochs + sum(epochs - w for w in warmups), "warmups": warmups,
            "statuses": [r["status"] for r in outcome.rows]}


def run(ctx: Context) -> dict:
    start = time.perf_counter()
    trials = ctx.pick(2, 4, 6)
    runs: dict[str, list[dict]] = {"shared": [], "unshared": []}
    with tempfile.TemporaryDirectory(prefix="nslab-bench-") as tmp:
        root = Path(tmp)
        variants = {name: (lambda name=name: runs[name].append(run_once(make_study(ctx, root, name == "shared",
                                                                                   trials))))
                    for name in runs}
        times = interleave(variants, ctx.study_repetitions(1, 1, 2), 0, torch.device("cpu"))
    case = make_case(f"{trials} SNS trials + baseline", times,
                     ratios={"shared/unshared wall": ("shared", "unshared", None)},
                     params={"trials": trials, "concurrency": 2, "points": POINTS[:trials]})
    shared, unshared = runs["shared"][-1], runs["unshared"][-1]
    checks = [
        {"case": case["case"], "name": "epochs trained, shared warm-ups", "value": shared["epochs_trained"],
         "value_text": f"{shared['epochs_trained']} (target {shared['target_epochs']})",
         "target_text": "≤ baseline + Σ(epochs − warm-up)",
         "passed": shared["epochs_trained"] <= shared["target_epochs"]},
        {"case": case["case"], "name": "epochs trained, no sharing", "value": unshared["epochs_trained"],
         "value_text": str(unshared["epochs_trained"]), "target_text": "—", "passed": None},
    ]
    notes = ["epochs trained = every epoch any trial trained, the shared warm-up's once; without sharing each "
             "trial trains all its epochs", "the same fixed points (sns.lam, fraction, warm-up) in both variants"]
    return result(ctx, NAME, "study epochs and wall time with and without shared warm-ups", [case], notes,
                  time.perf_counter() - start, extra={"checks": checks, "runs": runs})
