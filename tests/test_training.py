"""Trainer: seeding, resume and fork equal to uninterrupted training, divergence and collapse errors, the
validation split (never the test split), memory formats that change nothing (that PGD-AT works: test_evaluation)."""


import pytest
import torch

from ns_core import performance
from ns_core.checkpoint import load_checkpoint, load_model
from ns_core.data import Split
from ns_core.objectives import TrainingCollapsed
from ns_core.training import TrainConfig, TrainingDiverged
from orchestrator.config.loader import apply_overrides
from orchestrator.run import build_trainer, load_data


def weights(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def no_time(history):
    return [{k: v for k, v in e.items() if not k.startswith("time/")} for e in history]


def test_same_seed_same_result_and_another_seed_differs(make_experiment):
    experiment = make_experiment("sns", epochs=2, **{"sns.lam": 0.1})
    runs = [build_trainer(experiment) for _ in range(2)]
    histories = [trainer.fit() for trainer in runs]
    assert torch.equal(weights(runs[0].model), weights(runs[1].model))
    assert no_time(histories[0]) == no_time(histories[1])
    other = build_trainer(apply_overrides(experiment, {"train.seed": 1}))
    assert not torch.equal(weights(other.model), weights(runs[0].model))


def test_callback_gets_every_epoch_with_the_documented_metrics(make_experiment):
    seen = []
    trainer = build_trainer(make_experiment("sns", epochs=2, **{"sns.lam": 0.1}))
    trainer.callbacks.append(lambda metrics, tr: seen.append((metrics, tr.epoch)))
    trainer.fit()
    assert [epoch for _, epoch in seen] == [1, 2]
    keys = {"epoch", "train/loss", "train/ce_adv", "train/lr", "time/epoch_seconds", "val/clean_acc",
            "val/robust_acc", "val/sensitivity_all", "val/sensitivity_selected", "val/relative_sensitivity_all"}
    assert keys <= set(seen[0][0])
    assert "train/sns_reg" not in seen[0][0] and "train/sns_reg" in seen[1][0]  # warm-up, then SNS
    assert seen[1][0]["val/sensitivity_selected"] >= seen[1][0]["val/sensitivity_all"]
    assert all(0.0 <= m["val/robust_acc"] <= m["val/clean_acc"] + 0.05 for m, _ in seen)


class Untouchable(Split):
    """A test split that fails the test the moment anything reads it."""

    def __getattribute__(self, name):
        if name in ("take", "batches", "images", "to", "subset", "x", "y"):
            raise AssertionError(f"the test split was read ({name}) during training or validation")
        return super().__getattribute__(name)


def test_training_and_validation_never_read_the_test_split(make_experiment):
    experiment = make_experiment("sns", epochs=2, **{"sns.lam": 0.1})
    data = load_data(experiment)
    test = Split(data.test.x, data.test.y)
    object.__setattr__(test, "__class__", Untouchable)  # armed after construction (Split checks x and y)
    trapped = type(data)(data.name, data.train, data.val, test, data.num_classes)
    trainer = build_trainer(experiment, trapped)
    trainer.fit()
    assert trainer.epoch == 2 and len(trainer.val) == 64


def test_checkpoint_resume_equals_uninterrupted_training(make_experiment, tmp_path):
    experiment = make_experiment("sns", epochs=2, **{"sns.lam": 0.1})
    straight = build_trainer(experiment)
    straight.fit()
    first = build_trainer(experiment)
    first.fit(until=1)
    first.save_checkpoint(tmp_path / "ckpt.pt")
    resumed = build_trainer(experiment)
    resumed.load_state_dict(load_checkpoint(tmp_path / "ckpt.pt"))
    assert resumed.epoch == 1 and len(resumed.history) == 1
    resumed.fit()
    assert torch.equal(weights(resumed.model), weights(straight.model))
    assert no_time(resumed.history) == no_time(straight.history)


def test_a_fork_of_the_base_methods_warmup_ends_with_the_weights_of_a_run_from_scratch(make_experiment):
    """Shared warm-ups: SNS after w epochs of PGD-AT (forked from a PGD-AT run's state) is bit for bit SNS
    trained from scratch with warm-up w."""
    sns = make_experiment("sns", epochs=3, **{"sns.lam": 0.3, "sns.warmup_epochs": 2})
    scratch = build_trainer(sns)
    scratch.fit()
    base = build_trainer(apply_overrides(sns, {"method": "pgd_at"}))
    base.fit(until=2)
    fork = build_trainer(sns)
    fork.load_state_dict(base.state_dict())
    fork.fit()
    assert torch.equal(weights(fork.model), weights(scratch.model))
    assert fork.history[-1]["train/sns_reg"] == scratch.history[-1]["train/sns_reg"]


def test_memory_format_changes_speed_not_results(make_experiment, monkeypatch):
    experiment = make_experiment("pgd_at", epochs=1)
    results = {}
    for fmt in ("contiguous", "channels_last"):
        monkeypatch.setenv("NSLAB_MEMORY_FORMAT", fmt)
        trainer = build_trainer(experiment)
        assert trainer.memory_format == performance.FORMATS[fmt]
        trainer.fit()
        results[fmt] = (weights(trainer.model), trainer.history[-1])
    torch.testing.assert_close(results["contiguous"][0], results["channels_last"][0], rtol=0, atol=1e-4)
    for key in ("val/clean_acc", "val/robust_acc"):
        assert results["contiguous"][1][key] == pytest.approx(results["channels_last"][1][key], abs=0.02)


def test_load_model_rebuilds_the_network_from_a_checkpoint(make_experiment, tmp_path):
    trainer = build_trainer(make_experiment("standard", epochs=1))
    trainer.fit()
    trainer.save_checkpoint(tmp_path / "m.pt")
    model, meta = load_model(tmp_path / "m.pt", device="cpu")
    x = trainer.val.take(16)[0]
    trainer.model.eval()
    torch.testing.assert_close(model(x), trainer.model(x))
    assert meta["model"] == "lenet5" and meta["dataset"] == "mnist5k" and meta["num_classes"] == 10
    assert meta["config"]["method"] == "standard"


def test_nan_loss_raises_training_diverged(make_experiment):
    experiment = make_experiment("pgd_at", epochs=1, **{"train.optimizer": "sgd", "train.lr": 1e12,
                                                        "train.momentum": 0.0})
    with pytest.raises(TrainingDiverged, match="lower the learning rate"):
        build_trainer(experiment).fit()


def test_sns_at_chance_after_warmup_raises_training_collapsed(make_experiment):
    experiment = make_experiment("sns", epochs=4, **{"sns.warmup_epochs": 0, "sns.lam": 1e4, "sns.fraction": 1.0,
                                                     "sns.collapse_patience": 1})
    with pytest.raises(TrainingCollapsed, match="lower sns.lambda"):
        build_trainer(experiment).fit()


def test_bad_train_config_is_a_clear_error():
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="lbfgs")
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="linear")
