"""Trainer: seeding, checkpoint resume, divergence and collapse errors, callbacks, and that PGD-AT works."""

import math

import pytest
import torch

from ns_core.attacks import pgd
from ns_core.data import load_dataset
from ns_core.experiment import ExperimentSpec, build_trainer, load_model, run_experiment
from ns_core.objectives import TrainingCollapsed
from ns_core.training import TrainConfig, TrainingDiverged
from ns_core.utils import make_generator


def weights(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_same_seed_same_result_and_another_seed_differs(make_spec):
    runs = [build_trainer(make_spec("sns", epochs=2, warmup_epochs=1, lam=0.1)) for _ in range(2)]
    histories = [trainer.fit() for trainer in runs]
    assert torch.equal(weights(runs[0].model), weights(runs[1].model))
    drop_time = lambda h: [{k: v for k, v in e.items() if k != "epoch_seconds"} for e in h]  # noqa: E731
    assert drop_time(histories[0]) == drop_time(histories[1])
    other = make_spec("sns", epochs=2, warmup_epochs=1, lam=0.1)
    other.train.seed = 1
    assert not torch.equal(weights(build_trainer(other).model), weights(runs[0].model))


def test_callback_gets_every_epoch_with_the_documented_metrics(make_spec):
    seen = []
    trainer = build_trainer(make_spec("sns", epochs=2, warmup_epochs=1, lam=0.1),
                            callbacks=[lambda metrics, tr: seen.append((metrics, tr.epoch))])
    trainer.fit()
    assert [epoch for _, epoch in seen] == [1, 2]
    keys = {"epoch", "train_loss", "train_ce_adv", "lr", "epoch_seconds", "clean_acc", "robust_acc",
            "sensitivity_all", "sensitivity_selected", "relative_sensitivity_all"}
    assert keys <= set(seen[0][0])
    assert "train_sns_reg" not in seen[0][0] and "train_sns_reg" in seen[1][0]  # warm-up, then SNS
    assert seen[1][0]["sensitivity_selected"] >= seen[1][0]["sensitivity_all"]
    assert all(0.0 <= m["robust_acc"] <= m["clean_acc"] + 0.05 for m, _ in seen)


def test_checkpoint_resume_equals_uninterrupted_training(make_spec, tmp_path):
    straight = build_trainer(make_spec("sns", epochs=2, warmup_epochs=1, lam=0.1))
    straight.fit()

    first = build_trainer(make_spec("sns", epochs=2, warmup_epochs=1, lam=0.1))
    first.config.epochs = 1
    first.fit()
    path = first.save_checkpoint(tmp_path / "ckpt.pt")
    resumed = build_trainer(make_spec("sns", epochs=2, warmup_epochs=1, lam=0.1))
    resumed.load_checkpoint(path)
    assert resumed.epoch == 1 and len(resumed.history) == 1
    resumed.fit()
    assert torch.allclose(weights(resumed.model), weights(straight.model), atol=1e-6)
    assert resumed.history[-1]["robust_acc"] == pytest.approx(straight.history[-1]["robust_acc"], abs=1e-6)


def test_load_model_rebuilds_the_network_from_a_checkpoint(make_spec, tmp_path):
    trainer = build_trainer(make_spec("standard", epochs=1))
    trainer.fit()
    path = trainer.save_checkpoint(tmp_path / "m.pt")
    model, meta = load_model(path, device="cpu")
    x = trainer.val[0][:16]
    trainer.model.eval()
    assert torch.equal(model(x), trainer.model(x))
    assert meta["model"] == "lenet5" and meta["dataset"] == "mnist5k" and meta["num_classes"] == 10
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "missing.pt")


def test_nan_loss_raises_training_diverged(make_spec):
    spec = make_spec("pgd_at", epochs=1)
    spec.train = TrainConfig(**{**spec.train.__dict__, "optimizer": "sgd", "lr": 1e12, "momentum": 0.0})
    with pytest.raises(TrainingDiverged, match="lower the learning rate"):
        build_trainer(spec).fit()


def test_sns_at_chance_after_warmup_raises_training_collapsed(make_spec):
    spec = make_spec("sns", epochs=4, warmup_epochs=0, lam=1e4, fraction=1.0)
    spec.train.collapse_patience = 1
    with pytest.raises(TrainingCollapsed, match="lower sns.lambda"):
        build_trainer(spec).fit()


def test_bad_train_config_is_a_clear_error():
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="lbfgs")
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="linear")


@pytest.mark.slow
def test_pgd_at_is_clearly_more_robust_than_standard_training_on_mnist5k():
    """The claim every robustness tool must reproduce: PGD-AT beats standard training under PGD."""
    data = load_dataset("mnist5k")
    x_test, y_test = data.test.tensors[0][:500], data.test.tensors[1][:500]
    robust = {}
    for method, params in [("standard", {}), ("pgd_at", {"eps": 0.2, "steps": 7})]:
        spec = ExperimentSpec(method=method, method_params=params, train=TrainConfig(
            epochs=4, batch_size=64, optimizer="adam", lr=2e-3, weight_decay=0.0, val_size=64, val_steps=2,
            progress=False))
        model = run_experiment(spec, data=data).trainer.model.eval()
        x_adv = pgd(model, x_test, y_test, eps=0.2, steps=20, generator=make_generator(0, "cpu"))
        with torch.no_grad():
            robust[method] = float((model(x_adv).argmax(1) == y_test).float().mean())
            clean = float((model(x_test).argmax(1) == y_test).float().mean())
        assert clean > 0.8, (method, clean)
    assert robust["pgd_at"] > robust["standard"] + 0.3, robust
    assert not math.isnan(robust["pgd_at"])
