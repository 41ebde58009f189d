"""Shared fixtures: small, seeded, CPU-sized experiments on the embedded mnist5k digits, and a few models
trained once per session (seconds) for the evaluation and pipeline tests."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from orchestrator.config import apply_overrides, load_config
from orchestrator.experiment_config import ExperimentConfig
from orchestrator.run import build_trainer

torch.set_num_threads(1)  # deterministic speed on a shared 2-core box; Ray trials set their own
REPO = Path(__file__).resolve().parent.parent
QUICK = REPO / "configs" / "experiment" / "quick.yaml"
TRAINED_EPS = 0.15


def tiny_experiment(method: str = "pgd_at", epochs: int = 1, train_limit: int = 256, **overrides) -> ExperimentConfig:
    """A seconds-long experiment: a few hundred mnist5k digits, PGD-3 training, 64 validation digits."""
    base = load_config(QUICK, ExperimentConfig)
    return apply_overrides(base, {
        "method": method, "name": f"tiny-{method}", "attack.steps": 3, "train.epochs": epochs,
        "train.batch_size": 64, "train.probe_size": 64, "train.val_attack": {"name": "pgd", "eps": 0.2, "steps": 3},
        "data.train_limit": train_limit, "data.val_size": 64, "data.test_limit": 256, "eval.examples": 64,
        "eval.check_examples": 32, "eval.sensitivity_examples": 64, "sns.warmup_epochs": min(1, epochs - 1),
        "eval.attacks": [{"name": "fgsm", "eps": 0.2}, {"name": "pgd", "eps": 0.2, "steps": 3}], **overrides})


@pytest.fixture
def make_experiment():
    return tiny_experiment


@pytest.fixture(scope="module")
def make_experiment_module():
    return tiny_experiment


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
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


def subprocess_env(**extra: str) -> dict:
    """The environment a pipeline subprocess gets: this checkout importable, no inherited cluster or store."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    return {**env, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]), **extra}


def run_module(args: list[str], cwd: Path, timeout: int = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=subprocess_env(**env), capture_output=True,
                          text=True, timeout=timeout)
