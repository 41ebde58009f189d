"""The pipelines as users run them: --help and usage through `nslab`, --dry-run everywhere, one-line errors for
bad input, and a train smoke run in a subprocess evaluated by the evaluate pipeline (own models:
tests/test_own_models.py)."""

import os
import shlex
import sys

import pyarrow.parquet as pq
import pytest
from conftest import REPO, run_module

from ns_core.evaluation import CHECK_SCHEMA
from ns_core.evaluation import SCHEMA as EVAL_SCHEMA
from orchestrator.record.tracking import Tracker
from pipelines import _common, analyze, cli, evaluate, study, tracking_server, train


@pytest.mark.parametrize("module", [study, train, evaluate, analyze, tracking_server])
def test_help(module, capsys):
    with pytest.raises(SystemExit) as exit_:
        module.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: python -m {module.__name__}")
    if module not in (analyze, tracking_server):
        assert "--dry-run" in out and "--smoke-test" in out


@pytest.mark.parametrize("command", ["study", "train", "evaluate", "analyze", "tracking-server"])
def test_nslab_subcommands_print_their_own_usage(command, capsys, monkeypatch):
    monkeypatch.setattr(_common, "THROUGH_NSLAB", False)
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "--help"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith(f"usage: nslab {command}")


def test_nslab_without_a_subcommand_prints_help_and_exits_2_and_knows_its_version(capsys, monkeypatch):
    monkeypatch.setattr(_common, "THROUGH_NSLAB", False)
    assert cli.main([]) == 2
    err = capsys.readouterr().err
    assert all(name in err for name in ("study", "train", "evaluate", "analyze", "tracking-server", "demo"))
    assert cli.main(["--help"]) == 0 and "tracking-server" in capsys.readouterr().out
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"nslab {cli.nslab_version()}" and cli.nslab_version()[0].isdigit()
    assert cli.main(["nope"]) == 2 and "unknown subcommand 'nope'" in capsys.readouterr().err
    assert cli.main(["demo", "--dry-run"]) == 0
    assert "name: quick" in capsys.readouterr().out


def test_dry_runs_validate_and_print_settings(capsys, tmp_path, checkpoint):
    assert study.main(["--config", str(REPO / "configs/study/quick.yaml"), "--dry-run", "--smoke-test"]) == 0
    out = capsys.readouterr().out
    assert "trials: 2" in out and "dry run" in out and "PGD-AT, tuned over 2 trials; SNS, tuned over 2 trials" in out
    assert "# sns arm: data 256 train / 64 validation / 128 test, input (1, 28, 28), 10 classes; layers" in out
    assert "confirmation on seeds [1, 2], up to 2 seeds until decided" in out
    assert train.main(["--config", str(REPO / "configs/experiment/quick.yaml"), "--dry-run",
                       "--set", "sns.lambda=0.3", "--runs-dir", str(tmp_path)]) == 0
    assert "lam: 0.3" in capsys.readouterr().out
    assert evaluate.main(["--smoke-test", "--dry-run", "--attacks", "pgd:8/255:10:linf:2"]) == 0
    assert "pgd-linf-eps0.0313725-s3-r2" in capsys.readouterr().out  # 8/255, steps capped at 3
    assert evaluate.main(["--checkpoint", str(checkpoint), "--dry-run", "--attacks", "autoattack:0.15"]) == 0
    out = capsys.readouterr().out
    assert "nslab checkpoint v2: lenet5 (pgd_at) on mnist5k" in out and "autoattack-linf-eps0.15" in out


@pytest.mark.parametrize(("args", "message"), [
    (["--checkpoint", "{tmp}/none.pt", "--dry-run"], "does not exist"),
    (["--checkpoint", "{tmp}", "--dry-run"], "is a directory"),
    (["--checkpoint", "{tmp}/text.pt", "--dry-run"], "not a PyTorch checkpoint (not a zip archive)"),
    (["--checkpoint", "{tmp}/cut.pt", "--dry-run"], "is truncated (a write cut short?)"),
    (["--checkpoint", "{tmp}/plain.pt", "--dry-run"], "not an nslab checkpoint"),
    (["--checkpoint", "{tmp}/newer.pt", "--dry-run"], "written by a newer nslab (format version 99"),
    (["--checkpoint", "{ckpt}", "--attacks", "pgd:8/0"], "EPS must be a number or a fraction like 8/255"),
    (["--checkpoint", "{ckpt}", "--attacks", "pgd:8"], "did you mean 8/255"),
    (["--checkpoint", "{ckpt}", "--attacks", "pgd:40:10:l2", "--examples", "8"], "exceeds the diameter"),
    (["--checkpoint", "{ckpt}", "--examples", "0"], "argument --examples: must be >= 1, got 0"),
    (["--checkpoint", "{ckpt}", "--data-root", "{tmp}", "--set", "x"], "unrecognized arguments: --set x"),
])
def test_bad_input_to_evaluate_is_one_line_and_never_suggests_unsafe_loading(args, message, tmp_path, checkpoint,
                                                                              capsys):
    import torch

    (tmp_path / "text.pt").write_text("not a checkpoint")
    (tmp_path / "cut.pt").write_bytes(checkpoint.read_bytes()[:30000])
    torch.save({"weights": torch.zeros(2)}, tmp_path / "plain.pt")
    state = torch.load(checkpoint, weights_only=True)
    torch.save({**state, "version": 99}, tmp_path / "newer.pt")
    argv = [a.format(tmp=tmp_path, ckpt=checkpoint) for a in args]
    argv += ["--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    assert _exit_code(evaluate.main, argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], err
    assert "weights_only" not in err and "Traceback" not in err


def _exit_code(main, argv) -> int:
    """A pipeline's exit code, whether it returns it or argparse exits with it."""
    try:
        return main(argv)
    except SystemExit as exit_:
        return exit_.code


@pytest.mark.slow
def test_train_then_evaluate_smoke(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run_module(["pipelines.train", "--config", str(REPO / "configs/experiment/quick.yaml"), "--smoke-test",
                         "--tracking-uri", uri, "--runs-dir", str(tmp_path / "runs")], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = tmp_path / "runs" / "quick-smoke" / "checkpoint.pt"
    assert checkpoint.is_file()
    assert "worst_case" in result.stdout and "top-5 neurons" in result.stdout and "masking checks" in result.stdout
    tracker = Tracker(uri, "nslab")
    (run,) = tracker.find_runs("tags.`nslab.kind` = 'train'")
    assert run.info.status == "FINISHED" and run.data.tags["checkpoint"] == str(checkpoint)
    artifacts = tracker.list_artifacts(run.info.run_id, "sensitivity")
    assert {"sensitivity/epoch_001.parquet", "sensitivity/epoch_002.parquet", "sensitivity/final_test.parquet"} <= set(
        artifacts)
    assert {"test/clean_acc", "test/robust_acc", "test/sensitivity_all"} <= set(run.data.metrics)

    assert evaluate.main(["--checkpoint", str(checkpoint), "--attacks", "fgsm:0.2", "pgd:0.2:3", "apgd_ce:0.2:5",
                          "--examples", "64", "--tracking-uri", uri, "--out", str(tmp_path / "eval")]) == 0
    out = capsys.readouterr().out
    assert "gradient-masking checks:" in out and "large_eps_linf" in out
    table = pq.read_table(tmp_path / "eval" / "robust_accuracy.parquet")
    assert table.schema.equals(EVAL_SCHEMA) and table.column("n").to_pylist() == [64] * 5
    assert pq.read_table(tmp_path / "eval" / "checks.parquet").schema.equals(CHECK_SCHEMA)
    (evaluation,) = tracker.find_runs("tags.`nslab.kind` = 'evaluate'")
    assert evaluation.data.tags["source_run_id"] == run.info.run_id and evaluation.info.status == "FINISHED"
    assert tracker.read_table(evaluation.info.run_id, "eval/robust_accuracy.parquet").num_rows == 5
    assert "eval.flags" in evaluation.data.tags


@pytest.mark.slow
def test_evaluate_smoke_trains_a_throwaway_model(tmp_path, capsys):
    assert evaluate.main(["--smoke-test", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]) == 0
    assert "ok      robust_le_clean" in capsys.readouterr().out


def test_a_failed_train_ends_its_run_failed_with_the_reason(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["--config", str(REPO / "configs/experiment/quick.yaml"), "--smoke-test", "--tracking-uri", uri,
            "--runs-dir", str(tmp_path / "runs"), "--set", "train.optimizer=sgd", "--set", "train.lr=1e6"]
    assert train.main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "TrainingDiverged: loss became nan" in err[0]
    (run,) = Tracker(uri, "nslab").find_runs("tags.`nslab.kind` = 'train'")
    assert run.info.status == "FAILED" and run.data.tags["nslab.failure_reason"].startswith("TrainingDiverged")


def test_the_printed_ui_command_works_from_a_shell_without_the_venv(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    program, *args = shlex.split(Tracker(uri, "nslab").ui_command())
    assert os.path.isabs(program) and os.access(program, os.X_OK)  # not a bare `mlflow` that PATH may not have
    assert os.path.dirname(program) == os.path.dirname(sys.executable)  # the mlflow of nslab's own environment
    assert args[:3] == ["ui", "--backend-store-uri", uri]
