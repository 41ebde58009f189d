"""The CUDA paths of ns_core, end to end on a GPU (skipped where there is none; CI has none).

Training on CUDA uses what the CPU path does not: bf16 autocast, the fused optimizer, the probed memory
format and tensors kept on the device. These tests check that those paths train a model as well as the
CPU does (same seed, same budget: accuracies within noise, not bit-equal: bf16 rounds) and that the
evaluation cascade, our attacks and AutoAttack's reference stages run on CUDA tensors.

It needs ns_core and torch only (no Ray, MLflow or Optuna), so it also runs on a bare GPU machine:

    python -m pytest tests/cuda --noconftest -q
"""

import pytest
import torch

from ns_core.attacks import Attack
from ns_core.data import load_dataset
from ns_core.evaluation import evaluate_robustness
from ns_core.models import create_model
from ns_core.objectives import create_objective
from ns_core.training import TrainConfig, Trainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
EPS = 0.2


def train(device: str, method: str = "pgd_at", epochs: int = 4) -> Trainer:
    torch.manual_seed(0)
    data = load_dataset("mnist5k", val_size=500, train_limit=2000, test_limit=500)
    attack = Attack("pgd", EPS, steps=5)
    config = TrainConfig(epochs=epochs, batch_size=64, optimizer="adam", lr=2e-3, weight_decay=0.0, seed=0,
                         device=device, val_attack=Attack("pgd", EPS, steps=10), probe_size=128, progress=False)
    extra = {"lam": 0.1, "fraction": 0.1, "warmup_epochs": 2} if method == "sns" else {}
    objective = create_objective(method, attack=attack, eps_ramp_epochs=2, **extra)  # from scratch eps 0.2 stalls
    trainer = Trainer(create_model("lenet5", data.input_shape, 10), objective, data, config)
    trainer.fit()
    return trainer


@pytest.fixture(scope="module")
def trained():
    return {device: train(device) for device in ("cuda", "cpu")}


def test_training_on_cuda_matches_the_cpu_within_noise(trained):
    gpu, cpu = trained["cuda"], trained["cpu"]
    assert next(gpu.model.parameters()).is_cuda and gpu.amp
    assert gpu.train_split.x.is_cuda  # the dataset lives on the device: batches are drawn by index
    assert isinstance(gpu.optimizer, torch.optim.Adam) and gpu.optimizer.defaults.get("fused")
    for key in ("val/clean_acc", "val/robust_acc"):
        g, c = gpu.history[-1][key], cpu.history[-1][key]
        assert abs(g - c) < 0.06, f"{key}: cuda {g:.3f} vs cpu {c:.3f}"
    assert gpu.history[-1]["val/clean_acc"] > 0.85 and gpu.history[-1]["val/robust_acc"] > 0.4


def test_the_evaluation_cascade_runs_on_cuda_and_orders_the_attacks(trained):
    trainer = trained["cuda"]
    suite = [Attack("fgsm", EPS), Attack("pgd", EPS, steps=20), Attack("autoattack", EPS)]
    test = load_dataset("mnist5k", val_size=500, test_limit=500).test
    report = evaluate_robustness(trainer.model, test, suite, max_examples=200, check_examples=100, cascade=False)
    alone = {row["attack"]: row["alone_accuracy"] for row in report.rows if row["alone_accuracy"] is not None}
    assert {"fgsm", "pgd", "apgd_ce", "apgd_t", "fab_t", "square"} <= set(alone)
    assert alone["apgd_ce"] <= alone["pgd"] + 0.03 and alone["pgd"] <= alone["fgsm"] + 0.03
    assert alone["fgsm"] <= report.clean_accuracy
    assert report.robust_accuracy <= min(alone.values())
    assert report.flags == [], report.summary()


def test_sns_trains_on_cuda_with_its_regularizer_active():
    trainer = train("cuda", method="sns")
    assert trainer.objective.regularizer_active
    assert trainer.last_selection and all(v.is_cuda for v in trainer.last_selection.values())
    assert trainer.history[-1]["train/sns_reg"] > 0 and trainer.history[-1]["val/clean_acc"] > 0.8
