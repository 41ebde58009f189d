"""Any classifier in, any trained model in: a torchvision ResNet-18 (on the 8x8 digits) and a user factory without
`default_layers` (on a user dataset, both named by import path) train (SNS, layers given and proposed) and run a
study in Ray workers; --dry-run finds every broken model, layer, dataset and
resume before a run exists; a plain state_dict trained outside nslab gets a sensitivity report."""

import pyarrow.parquet as pq
import pytest
import torch
import torchvision
import yaml
from conftest import REPO, TINY_STUDY
from torch import nn
from user_models import classes_only_mlp

from analyses.loading import load_checkpoints, load_external
from ns_core.adapters import Adaptation, adaptation_of
from ns_core.checkpoint import load_model, save_checkpoint
from ns_core.data import load_dataset
from ns_core.evaluation import CHECK_SCHEMA
from ns_core.evaluation import SCHEMA as EVAL_SCHEMA
from ns_core.models import create_model
from ns_core.sensitivity import SENSITIVITY_SCHEMA
from orchestrator.config.experiment import ExperimentConfig
from orchestrator.config.loader import load_config, parse_set
from orchestrator.record.tracking import Tracker
from orchestrator.run import build_trainer, preflight
from pipelines import analyze, study, train

QUICK = str(REPO / "configs" / "experiment" / "quick.yaml")
RESNET = ["--set", "model=torchvision.models:resnet18", "--set", "dataset=digits", "--set", "data.val_size=null",
          "--set", "data.train_limit=128",
          "--set", "attack.eps=0.1", "--set", "eval.attacks=[{name: pgd, eps: 0.1, steps: 2}]"]
OWN = ["--set", "model=user_models:tiny_cnn_no_layers", "--set", "dataset=user_models:blobs", "--set",
       "data.val_size=null", "--set", "attack.eps=0.1", "--set", "eval.attacks=[{name: pgd, eps: 0.1, steps: 2}]"]


def exit_code(main, argv) -> int:
    try:
        return main(argv)
    except SystemExit as exit_:
        return exit_.code


@pytest.mark.parametrize(("args", "message"), [
    (["--set", "model=user_models:wrong_logits"], "returned (2, 11) for a batch of 2 inputs"),
    (["--set", "model=user_models:no_contract"], "the factory must take (input_shape, num_classes) as keyword"),
    (["--set", "sns.layers=[relu9]"], "unknown layer 'relu9'"),
    (["--set", "model=user_models:shared_relu_cnn", "--set", "sns.layers=[relu]"], "runs 2 times per forward"),
    (["--set", "dataset=mnist", "--set", "data.root=/nonexistent/nslab"], "MNIST not found in /nonexistent/nslab"),
])
def test_a_dry_run_finds_what_would_fail_at_run_time_in_one_line_and_creates_no_run(args, message, tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for main, argv in ((train.main, ["--config", QUICK, "--runs-dir", str(tmp_path), *args]),
                       (study.main, ["--config", str(TINY_STUDY), *_study(args)])):
        for dry in (["--dry-run"], []):
            assert exit_code(main, [*argv, *dry, "--tracking-uri", uri]) == 2
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "mlflow.db").exists()  # refused before any MLflow run was created


def _study(args: list[str]) -> list[str]:
    """The same overrides for a study config: experiment fields live under `experiment.`."""
    return [a if a == "--set" else f"experiment.{a}" for a in args]


def test_resume_with_nothing_to_resume_is_one_line_in_the_dry_run(tmp_path, capsys):
    argv = ["--config", str(TINY_STUDY), "--name", "never-ran", "--resume", "--storage", str(tmp_path / "ray"),
            "--dry-run"]
    assert exit_code(study.main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --resume: no study 'never-ran' in --storage") and len(err.splitlines()) == 1


def test_the_dry_run_builds_a_torchvision_model_and_says_which_layers_it_proposes(tmp_path, capsys):
    assert train.main(["--config", QUICK, "--runs-dir", str(tmp_path), "--dry-run", *RESNET]) == 0
    out = capsys.readouterr().out
    assert ("layers ['layer1', 'layer2', 'layer3', 'layer4'] (proposed by nslab (set sns.layers "
            "to choose))") in out


def test_layers_are_named_as_the_model_names_them_for_torchvision_resnet18(tmp_path, capsys):
    """No wrapper shows through: sns.layers, the dry run, the trainer's hooks and the state_dict keys are
    torchvision's own; a few SNS steps train through the hooked stages."""
    layers = ["--set", "sns.layers=[layer1, layer2]"]
    assert train.main(["--config", QUICK, "--runs-dir", str(tmp_path), "--dry-run", *RESNET, *layers]) == 0
    assert "layers ['layer1', 'layer2'] (the config's)" in capsys.readouterr().out
    experiment = load_config(QUICK, ExperimentConfig, parse_set([*RESNET, *layers][1::2] + [
        "train.epochs=1", "sns.warmup_epochs=0", "sns.lam=1.0", "attack.steps=1", "train.batch_size=16",
        "data.train_limit=32", "data.val_size=16", "train.probe_size=16", "train.val_attack={name: fgsm, eps: 0.1}",
        "train.eps_ramp_epochs=0"]))
    assert preflight(experiment).layers == ["layer1", "layer2"]
    trainer = build_trainer(experiment)
    assert isinstance(trainer.model, torchvision.models.ResNet) and trainer.layers == ["layer1", "layer2"]
    assert set(trainer.model.state_dict()) == set(torchvision.models.resnet18(num_classes=10).state_dict())
    trainer.fit()
    assert trainer.history[-1]["train/sns_reg"] > 0 and list(trainer.last_sensitivity.absolute) == ["layer1", "layer2"]


def _digits_logits(model: nn.Module, n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    x, _ = load_dataset("digits").test.take(n)
    with torch.no_grad():
        return x, model.eval()(x)


def test_an_own_model_analysed_from_its_checkpoint_gives_the_logits_it_was_trained_to_give(tmp_path):
    """The adapter's decisions are recorded with the checkpoint and replayed: nslab's for a training, and any
    other recorded one (here: none at all) is not replaced by nslab's when it loads."""
    experiment = load_config(QUICK, ExperimentConfig, parse_set([
        "model=user_models:classes_only_mlp", "dataset=digits", "method=pgd_at", "train.epochs=1",
        "attack.steps=1", "data.train_limit=64", "data.val_size=16", "train.probe_size=16", "train.eps_ramp_epochs=0"]))
    trainer = build_trainer(experiment)
    trainer.fit()
    assert adaptation_of(trainer.model) == Adaptation(mean=(0.1307,), std=(0.3081,))  # an MLP: no stem to fit
    trainer.save_checkpoint(tmp_path / "nslab.pt")
    (item,) = load_checkpoints([tmp_path / "nslab.pt"], device="cpu")
    x, trained = _digits_logits(trainer.model.cpu())
    assert torch.equal(item.model(x), trained) and item.metadata["adaptation"]["mean"] == [0.1307]
    assert item.built == "built with the normalization in front"

    # a checkpoint that records another adaptation (here: none) loads with it, not with nslab's decisions
    unwrapped = load_external("user_models:classes_only_mlp", tmp_path / "nslab.pt", "digits", device="cpu",
                              eps=0.1).model  # the same weights, built as the factory builds them
    assert adaptation_of(unwrapped) == Adaptation()
    state = trainer.state_dict()
    state.update(model=unwrapped.state_dict(), metadata={**state["metadata"],
                                                         "adaptation": Adaptation().to_dict()})
    save_checkpoint(state, tmp_path / "bare.pt")
    model, _ = load_model(tmp_path / "bare.pt", "cpu")
    x, expected = _digits_logits(unwrapped)
    assert torch.equal(model(x), expected) and not torch.allclose(expected, trained)


def test_a_checkpoint_from_before_the_record_loads_under_the_models_own_keys(tmp_path):
    """Format 2 wrapped an adapted classifier (keys `net.*`, `normalize.*`) and recorded no adaptation: nslab's
    decisions, the only ones then, are replayed and the weights land under the model's own keys."""
    model = create_model("user_models:classes_only_cnn", (1, 8, 8), 10).eval()
    weights = {f"net.{key}": value for key, value in model.state_dict().items()}
    weights.update({"normalize.mean": model.nslab_mean, "normalize.std": model.nslab_std})
    metadata = {"model": "user_models:classes_only_cnn", "input_shape": [1, 8, 8], "num_classes": 10}
    torch.save({"format": "nslab-checkpoint", "version": 2, "model": weights, "metadata": metadata},
               tmp_path / "v2.pt")
    loaded, _ = load_model(tmp_path / "v2.pt", "cpu")
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(loaded(x), model(x)) and adaptation_of(loaded) == adaptation_of(model)


def test_a_bare_state_dict_of_a_num_classes_only_factory_is_analysed_as_the_users_own_module(tmp_path, capsys):
    """A user's MLP trained on raw [0, 1] inputs: nothing is put in front of it unless a flag asks."""
    torch.manual_seed(0)
    own = classes_only_mlp(10)
    torch.save(own.state_dict(), tmp_path / "mlp.pt")
    x, expected = _digits_logits(own)
    item = load_external("user_models:classes_only_mlp", tmp_path / "mlp.pt", "digits", device="cpu", eps=0.1)
    assert torch.equal(item.model(x), expected) and item.built == "built as its factory builds it"
    assert check_layers_of(item) == ["act1"]
    normalized = load_external("user_models:classes_only_mlp", tmp_path / "mlp.pt", "digits", device="cpu",
                               eps=0.1, adapt=["normalize"])
    assert torch.allclose(normalized.model(x), own((x - 0.1307) / 0.3081), atol=1e-6)
    argv = ["sensitivity", "--model", "user_models:classes_only_mlp", "--state-dict", str(tmp_path / "mlp.pt"),
            "--dataset", "digits", "--eps", "0.1", "--dry-run"]
    assert analyze.main(argv) == 0
    out = capsys.readouterr().out
    assert "built as its factory builds it); layers ['act1']" in out and "net." not in out
    assert analyze.main([*argv, "--normalize"]) == 0
    assert "built with the normalization in front" in capsys.readouterr().out


def check_layers_of(item) -> list[str]:
    from analyses.loading import check_layers

    return check_layers(item.model, None)


def _cifar_stem_resnet18(channels: int) -> nn.Module:
    """A ResNet-18 as people train it on small images: a 3x3 first convolution at stride 1, no max-pool."""
    net = torchvision.models.resnet18(num_classes=10)
    net.conv1 = nn.Conv2d(channels, 64, 3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    return net


def test_a_resnet18_state_dict_of_another_stem_names_the_flag_that_builds_it_as_trained(tmp_path, capsys):
    torch.manual_seed(0)
    own = _cifar_stem_resnet18(1)
    torch.save(own.state_dict(), tmp_path / "cifar_stem.pt")
    argv = ["sensitivity", "--model", "torchvision.models:resnet18", "--state-dict", str(tmp_path / "cifar_stem.pt"),
            "--dataset", "digits", "--eps", "0.1", "--dry-run"]
    assert analyze.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "3x3 convolution (the small-input CIFAR stem)" in err
    assert "pass --cifar-stem" in err and "conv1" in err
    assert analyze.main([*argv, "--cifar-stem"]) == 0
    item = load_external("torchvision.models:resnet18", tmp_path / "cifar_stem.pt", "digits", device="cpu", eps=0.1,
                         adapt=["cifar_stem"])
    x, expected = _digits_logits(own)
    assert torch.allclose(item.model(x), expected, atol=1e-6)

    imagenet = torchvision.models.resnet18(num_classes=10)  # the 7x7 stem, refitted to 1 channel by its trainer
    imagenet.conv1 = nn.Conv2d(1, 64, 7, stride=2, padding=3, bias=False)
    torch.save(imagenet.state_dict(), tmp_path / "imagenet_stem.pt")
    argv[argv.index(str(tmp_path / "cifar_stem.pt"))] = str(tmp_path / "imagenet_stem.pt")
    assert analyze.main([*argv, "--adapt"]) == 2
    err = capsys.readouterr().err
    assert "7x7 convolution (the ImageNet stem)" in err and "drop --cifar-stem" in err
    assert analyze.main(argv) == 0


def test_a_plain_state_dict_trained_outside_nslab_gets_a_sensitivity_report(tmp_path, capsys):
    """A user's own training loop (plain torch), its weights saved with torch.save(model.state_dict())."""
    data = load_dataset("digits")
    model = create_model("user_models:tiny_cnn_no_layers", data.input_shape, data.num_classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = data.train.take(256)
    for _ in range(20):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    weights = tmp_path / "weights.pt"
    torch.save(model.state_dict(), weights)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = ["sensitivity", "--model", "user_models:tiny_cnn_no_layers", "--state-dict", str(weights), "--dataset",
            "digits", "--eps", "8/255", "--examples", "128", "--attacks", "fgsm:8/255", "pgd:8/255:5",
            "--out", str(tmp_path / "out"), "--tracking-uri", uri]
    assert analyze.main(argv) == 0
    out = capsys.readouterr().out
    assert "act1" in out and "top-5 neurons" in out and "gradient-masking checks" in out
    files = tmp_path / "out"
    assert pq.read_table(files / "sensitivity" / "test.parquet").schema.remove_metadata().equals(SENSITIVITY_SCHEMA)
    top = pq.read_table(files / "sensitivity" / "top_neurons.parquet").to_pylist()
    assert {r["layer"] for r in top} == {"act1", "act2", "act3"} and top[0]["rank"] == 0
    assert pq.read_table(files / "eval" / "robust_accuracy.parquet").schema.equals(EVAL_SCHEMA, check_metadata=False)
    assert pq.read_table(files / "eval" / "checks.parquet").schema.equals(CHECK_SCHEMA, check_metadata=False)
    (run,) = Tracker(uri, "nslab-analysis").find_runs("tags.`nslab.analysis` = 'sensitivity'")
    assert run.info.status == "FINISHED" and "eval.flags" in run.data.tags and "test/robust_acc" in run.data.metrics
    assert (files / "plots" / "sensitivity_per_layer.png").is_file()
    bad = tmp_path / "bad.pt"
    torch.save({"fc9.weight": torch.zeros(2)}, bad)
    argv[argv.index(str(weights))] = str(bad)
    assert analyze.main(argv) == 2
    assert "does not fit the model (missing" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize(("model", "given", "in_a_study"), [(RESNET, ["layer3", "layer4"], False),
                                                             (OWN, ["act2"], True)],
                         ids=["torchvision-resnet18", "factory-without-default-layers"])
def test_own_models_train_sns_with_layers_given_and_proposed_and_in_a_study(model, given, in_a_study, local_ray,
                                                                           tmp_path, capsys):
    """Both train with the layers given and proposed; the factory's model also runs a study (the study path is
    the same for torchvision's ResNet-18, whose study costs CPU-minutes and shows nothing more)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for layers in (given, None):
        extra = ["--set", f"sns.layers={layers}"] if layers else []
        name = "given" if layers else "proposed"
        assert train.main(["--config", QUICK, "--smoke-test", "--tracking-uri", uri, "--runs-dir", str(tmp_path),
                           "--name", name, *model, *extra]) == 0
    tracker = Tracker(uri, "nslab")
    runs = {r.info.run_name: r for r in tracker.find_runs("tags.`nslab.kind` = 'train'")}
    assert {r.info.status for r in runs.values()} == {"FINISHED"}
    assert yaml.safe_load(runs["given"].data.params["sns.layers"]) == given
    proposed = yaml.safe_load(runs["proposed"].data.params["sns.layers"])
    assert proposed and proposed != given and all(isinstance(p, str) for p in proposed)
    if not in_a_study:
        return
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump({"base": str(TINY_STUDY), "confirm": None,
                                      "study": {"trials": 1, "concurrency": 1, "share_warmup": False},
                                      "tracking": {"uri": uri, "experiment": "own"},
                                      "storage": {"ray": str(tmp_path / "ray")}}))
    capsys.readouterr()
    assert study.main(["--config", str(config), *_study(model), "--name", "own"]) == 0
    assert f"sns arm: layers {proposed} proposed by nslab" in capsys.readouterr().out
    trials = Tracker(uri, "own").find_runs("tags.`nslab.kind` = 'trial'")
    assert len(trials) >= 2 and {r.info.status for r in trials} == {"FINISHED"}
