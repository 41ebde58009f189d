"""Shared fixtures: small, seeded, CPU-sized experiments on the embedded mnist5k digits."""

import pytest
import torch

from ns_core.experiment import ExperimentSpec
from ns_core.training import TrainConfig

torch.set_num_threads(1)  # deterministic speed on a shared 2-core box; Ray trials set their own


def tiny_spec(method: str = "pgd_at", epochs: int = 1, train_limit: int = 256, **method_params) -> ExperimentSpec:
    """A seconds-long experiment: a few hundred mnist5k digits, PGD-3 training, a small validation set."""
    params = {} if method == "standard" else {"eps": 0.2, "steps": 3, **method_params}
    return ExperimentSpec(
        dataset="mnist5k", model="lenet5", method=method, method_params=params,
        train=TrainConfig(epochs=epochs, batch_size=64, optimizer="adam", lr=2e-3, weight_decay=0.0,
                          val_size=128, val_eps=0.2, val_steps=3, probe_size=64, progress=False),
        train_limit=train_limit, test_limit=256,
    )


@pytest.fixture
def make_spec():
    return tiny_spec
