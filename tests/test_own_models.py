"""Any classifier in, any trained model in: a torchvision ResNet-18 (on the 8x8 digits) and a user factory without
`default_layers` (on a user dataset, both named by import path) train (SNS, layers given and proposed) and run a
study in Ray workers; --dry-run finds every broken model, layer, dataset and
resume before a run exists; a plain state_dict trained outside nslab gets a sensitivity report."""

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from conftest import REPO, TINY_STUDY

from ns_core.data import load_dataset
from ns_core.evaluation import CHECK_SCHEMA
from ns_core.evaluation import SCHEMA as EVAL_SCHEMA
from ns_core.models import create_model
from ns_core.sensitivity import SENSITIVITY_SCHEMA
from orchestrator.record.tracking import Tracker
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
    assert err.startswith("error: no study 'never-ran' to resume at") and len(err.splitlines()) == 1


def test_the_dry_run_builds_a_torchvision_model_and_says_which_layers_it_proposes(tmp_path, capsys):
    assert train.main(["--config", QUICK, "--runs-dir", str(tmp_path), "--dry-run", *RESNET]) == 0
    out = capsys.readouterr().out
    assert ("layers ['net.layer1', 'net.layer2', 'net.layer3', 'net.layer4'] (proposed by nslab (set sns.layers "
            "to choose))") in out


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
@pytest.mark.parametrize(("model", "given"), [(RESNET, ["net.layer3", "net.layer4"]), (OWN, ["act2"])],
                         ids=["torchvision-resnet18", "factory-without-default-layers"])
def test_own_models_train_sns_with_layers_given_and_proposed_and_run_a_study(model, given, local_ray, tmp_path,
                                                                            capsys):
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
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump({"base": str(TINY_STUDY), "study": {"trials": 1, "share_warmup": False},
                                      "confirm": None,
                                      "tracking": {"uri": uri, "experiment": "own"},
                                      "storage": {"ray": str(tmp_path / "ray")}}))
    capsys.readouterr()
    assert study.main(["--config", str(config), *_study(model), "--name", "own"]) == 0
    assert f"sns arm: layers {proposed} proposed by nslab" in capsys.readouterr().out
    trials = Tracker(uri, "own").find_runs("tags.`nslab.kind` = 'trial'")
    assert len(trials) >= 2 and {r.info.status for r in trials} == {"FINISHED"}
