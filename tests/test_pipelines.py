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
    assert "nslab checkpoint v3: lenet5 (pgd_at) on mnist5k" in out and "autoattack-linf-eps0.15" in out


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
    assert run.info.status == "FINISHED" and run.data.tags["nslab.checkpoint"] == str(checkpoint)
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
    assert evaluation.data.tags["nslab.source_run_id"] == run.info.run_id and evaluation.info.status == "FINISHED"
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


# ---- bad input at the command line: one line naming what is wrong and the fix, exit code 2 -------------------


def _one_line(main, argv, capsys) -> str:
    """Run a pipeline that must refuse its input: exit code 2 and a single line on stderr, which is returned."""
    assert _exit_code(main, argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    return lines[0]


def test_a_missing_dataset_suggests_download_which_every_data_pipeline_takes(tmp_path, capsys, monkeypatch):
    """The fix the message names exists: --download reaches torchvision (asked only then), and a download that
    fails (no network here) is one line too."""
    from urllib.error import URLError

    from torchvision import datasets

    asked = []

    def offline(self):
        asked.append(self.root)
        raise URLError("offline in this test")

    monkeypatch.setattr(datasets.MNIST, "download", offline)
    config = ["--config", str(REPO / "configs/experiment/quick.yaml"), "--dry-run", "--set", "dataset=mnist",
              "--set", f"data.root={tmp_path / 'data'}", "--runs-dir", str(tmp_path / "runs")]
    line = _one_line(train.main, config, capsys)
    assert "MNIST not found in" in line and "--download" in line and not asked
    line = _one_line(train.main, [*config, "--download"], capsys)
    assert line.startswith("error: the download failed (offline in this test); MNIST not found in") and asked
    study_config = ["--config", str(REPO / "configs/study/tiny.yaml"), "--dry-run", "--set", "experiment.dataset=mnist",
                    "--set", f"experiment.data.root={tmp_path / 'study-data'}"]
    assert "--download" in _one_line(study.main, study_config, capsys)
    assert "the download failed" in _one_line(study.main, [*study_config, "--download"], capsys)
    assert evaluate.build_parser().parse_args(["--checkpoint", "x.pt", "--download"]).download
    external = ["sensitivity", "--state-dict", str(tmp_path / "w.pt"), "--model", "lenet5", "--dataset", "mnist",
                "--data-root", str(tmp_path / "analysis-data"), "--eps", "0.3", "--dry-run"]
    assert "--download" in _one_line(analyze.main, external, capsys)
    assert "the download failed" in _one_line(analyze.main, [*external, "--download"], capsys)
    assert all(analyze.build_parser().parse_args([command, "--download"]).download
               for command in ("methods", "compare", "stabilize"))


def test_a_set_typo_is_blamed_on_the_flag_not_the_file(capsys, tmp_path):
    line = _one_line(train.main, ["--config", str(REPO / "configs/experiment/quick.yaml"), "--set", "sns.lamm=1",
                                  "--dry-run", "--runs-dir", str(tmp_path)], capsys)
    assert line.startswith("config error: 'sns.lamm' is not a field; sns has: lam")
    assert line.endswith("did you mean 'sns.lam'? (from --set sns.lamm=1)") and "quick.yaml" not in line
    line = _one_line(study.main, ["--config", str(REPO / "configs/study/tiny.yaml"), "--set", "sns.lam=1",
                                  "--dry-run"], capsys)
    assert line.endswith("did you mean 'experiment.sns.lam'? (from --set sns.lam=1)")


def test_a_study_file_given_to_train_is_one_short_line_naming_the_command(capsys, tmp_path):
    line = _one_line(train.main, ["--config", str(REPO / "configs/study/quick.yaml"), "--dry-run", "--runs-dir",
                                  str(tmp_path)], capsys)
    assert "is a study config, not an experiment config; run it with python -m pipelines.study" in line
    assert "unknown key" not in line and len(line) < 300


@pytest.mark.parametrize(("flag", "message"), [
    ("search_space.sns.lam.hihg=1", "config error: 'search_space.sns.lam.hihg' is not a field; an entry has: type, "
                                    "low, high, log, step, choices; did you mean 'search_space.sns.lam.high'? "
                                    "(from --set search_space.sns.lam.hihg=1)"),
    ("search_space.sns.lamm.high=1", "config error: search_space: 'sns.lamm' is not a field; sns has: lam"),
    ("search_space.sns.lam.high=0.0001", "config error: search_space.sns.lam: low must be < high (got low=0.001, "
                                         "high=0.0001) (from --set search_space.sns.lam.high=0.0001)"),
    ("search_space.sns.fraction.high=1.5", "sns.fraction=1.5 is not valid: sns.fraction: must be <= 1"),
    ("search_space=3", "'search_space' is a mapping; name one of its entries"),
])
def test_a_bad_search_space_flag_is_one_line_naming_the_flag(flag, message, capsys):
    line = _one_line(study.main, ["--config", str(REPO / "configs/study/tiny.yaml"), "--set", flag, "--dry-run"],
                     capsys)
    assert message in line and "tiny.yaml" not in line, line
    assert line.endswith(f"(from --set {flag})"), line


def test_resume_with_nothing_to_resume_says_where_it_looked(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = _one_line(study.main, ["--config", str(REPO / "configs/study/tiny.yaml"), "--resume", "--dry-run"], capsys)
    assert line == (f"error: --resume: no study tiny-* in ray_results in the current directory ({tmp_path}/ray_results;"
                    " --storage PATH looks elsewhere); run the command in the directory the study ran in, or start one "
                    "without --resume")
    line = _one_line(study.main, ["--config", str(REPO / "configs/study/tiny.yaml"), "--name", "tiny-1",
                                  "--confirm-only", "--storage", str(tmp_path / "elsewhere"), "--dry-run"], capsys)
    assert line == (f"error: --confirm-only: no study 'tiny-1' in --storage {tmp_path}/elsewhere; run the command in "
                    "the directory the study ran in, or start it without --confirm-only")


def _recorded_study(tmp_path, status: str, confirmed: bool) -> list[str]:
    """A study as a finished (or interrupted) run leaves it: its launch file and phases under the Ray results, its
    parent run in MLflow; returns the resume command's arguments."""
    import json

    from orchestrator.record import tags
    from orchestrator.study.driver import LAUNCH_FILE

    name, uri = "tiny-20260101-000000", f"sqlite:///{tmp_path / 'mlflow.db'}"
    folder = tmp_path / "ray" / name
    (folder / "search").mkdir(parents=True)
    if confirmed:
        (folder / "confirm").mkdir()
    (folder / LAUNCH_FILE).write_text(json.dumps({"config": "tiny.yaml", "overrides": {}, "origins": {},
                                                  "smoke": False}))
    tracker = Tracker(uri, "nslab-tiny")
    parent = tracker.start_run(name, tags={tags.KIND: tags.Kind.STUDY, tags.STUDY: name,
                                           tags.VERDICT: "SNS beats PGD-AT (+2.1 points, 3 seeds)"})
    tracker.end_run(parent, status)
    return ["--config", str(REPO / "configs/study/tiny.yaml"), "--storage", str(tmp_path / "ray"), "--tracking-uri",
            uri, "--resume", "--dry-run"]


@pytest.mark.parametrize(("status", "confirmed", "says"), [
    ("FINISHED", True, "is finished (MLflow parent run {run}: SNS beats PGD-AT (+2.1 points, 3 seeds)); --resume "
                       "would train nothing, only read its finished trials back and write the same record again"),
    ("FINISHED", False, "finished its search without a confirmation (MLflow parent run {run}); --resume or "
                        "--confirm-only runs the confirmation on the test split"),
    ("KILLED", True, "was interrupted (MLflow parent run {run} is KILLED); --resume continues it where it stopped"),
])
def test_resume_dry_run_says_whether_the_study_is_finished_and_what_resume_would_do(status, confirmed, says, tmp_path,
                                                                                     capsys):
    argv = _recorded_study(tmp_path, status, confirmed)
    assert study.main(argv) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    run = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "nslab-tiny").find_runs("attributes.status != ''")[0]
    assert last.startswith("# study tiny-20260101-000000 ") and says.format(run=run.info.run_id) in last, last


def test_an_auth_server_keeps_a_checked_password_for_a_minute_unless_told_otherwise(tmp_path, capsys, monkeypatch):
    """MLflow itself reads the cache setting nslab writes (its scrypt check costs 0.1 CPU-s a request); the
    setting without --auth is one line, not a silently ignored flag."""
    from mlflow.server.auth.config import read_auth_config

    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", "admin-password-0123")
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(tmp_path / "basic_auth.ini"))
    for flags, seconds in (([], 60), (["--auth-cache-seconds", "0"], 0), (["--auth-cache-seconds", "5"], 5)):
        assert tracking_server.main(["--store", str(tmp_path), "--auth", "--dry-run", *flags]) == 0
        assert read_auth_config().auth_cache_ttl_seconds == seconds
    capsys.readouterr()
    assert tracking_server.main(["--store", str(tmp_path), "--auth-cache-seconds", "30", "--dry-run"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "--auth-cache-seconds applies only with --auth" in lines[0]
    with pytest.raises(SystemExit) as exit_:
        tracking_server.main(["--store", str(tmp_path), "--auth", "--auth-cache-seconds", "-1"])
    assert exit_.value.code == 2 and "must be >= 0, got -1" in capsys.readouterr().err
