"""The pipelines as users run them: --help and --dry-run everywhere, train and evaluate smoke runs in
subprocesses, and a study interrupted with Ctrl+C (SIGINT) that --resume finishes without duplicate runs."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from ns_core.evaluation import SCHEMA as EVAL_SCHEMA
from orchestrator.tracking import Tracker
from orchestrator.trial import TRIAL_ID_TAG
from pipelines import cli, evaluate, study, train

REPO = Path(__file__).resolve().parent.parent


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    return {**env, "PYTHONPATH": str(REPO)}


def _run(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("module", [study, train, evaluate])
def test_help(module, capsys):
    with pytest.raises(SystemExit) as exit_:
        module.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "--dry-run" in out and "--smoke-test" in out and "python -m pipelines." in out


def test_cli_lists_subcommands_and_forwards(capsys):
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("study", "train", "evaluate", "analyze", "demo"))
    assert cli.main(["nope"]) == 2
    assert cli.main(["demo", "--dry-run"]) == 0
    assert "name: quick" in capsys.readouterr().out


def test_dry_runs_validate_and_print_settings(capsys, tmp_path):
    assert study.main(["--config", str(REPO / "configs/study/quick.yaml"), "--dry-run", "--smoke-test"]) == 0
    out = capsys.readouterr().out
    assert "trials: 2" in out and "dry run" in out
    assert train.main(["--config", str(REPO / "configs/experiment/quick.yaml"), "--dry-run",
                       "--set", "sns.lambda=0.3"]) == 0
    assert "lam: 0.3" in capsys.readouterr().out
    assert evaluate.main(["--smoke-test", "--dry-run", "--attacks", "pgd:8/255:10:linf:2"]) == 0
    assert "pgd-linf-eps0.0313725-s3-r2" in capsys.readouterr().out  # 8/255, steps capped at 3
    assert evaluate.main(["--checkpoint", str(tmp_path / "none.pt"), "--dry-run"]) == 2
    assert evaluate.main(["--checkpoint", str(tmp_path / "none.pt"), "--attacks", "pgd"]) == 2


@pytest.mark.slow
def test_train_then_evaluate_smoke(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = _run(["pipelines.train", "--config", str(REPO / "configs/experiment/quick.yaml"), "--smoke-test",
                   "--tracking-uri", uri, "--runs-dir", str(tmp_path / "runs")], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = tmp_path / "runs" / "quick-smoke" / "checkpoint.pt"
    assert checkpoint.is_file()
    assert "worst_case" in result.stdout and "top-5 neurons" in result.stdout
    tracker = Tracker(uri, "nslab")
    (run,) = tracker.find_runs("tags.`nslab.kind` = 'train'")
    assert run.info.status == "FINISHED" and run.data.tags["checkpoint"] == str(checkpoint)
    artifacts = tracker.list_artifacts(run.info.run_id, "sensitivity")
    assert {"sensitivity/epoch_001.parquet", "sensitivity/epoch_002.parquet"} <= set(artifacts)

    result = _run(["pipelines.evaluate", "--checkpoint", str(checkpoint), "--attacks", "fgsm:0.2", "pgd:0.2:3",
                   "--examples", "64", "--tracking-uri", uri, "--out", str(tmp_path / "eval")], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    table = pq.read_table(tmp_path / "eval" / "robust_accuracy.parquet")
    assert table.schema.remove_metadata().equals(EVAL_SCHEMA) and table.column("n").to_pylist() == [64] * 4
    (evaluation,) = tracker.find_runs("tags.`nslab.kind` = 'evaluate'")
    assert evaluation.data.tags["source_run_id"] == run.info.run_id
    assert tracker.read_table(evaluation.info.run_id, "eval/robust_accuracy.parquet").num_rows == 4


@pytest.mark.slow
def test_evaluate_smoke_trains_a_throwaway_model(tmp_path, capsys):
    assert evaluate.main(["--smoke-test", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]) == 0
    assert "sanity robust_le_clean: ok" in capsys.readouterr().out


def _epochs_reported(ray_dir: Path) -> list[int]:
    """Per trial directory, how many epoch results Tune has written so far (most first)."""
    counts = []
    for results in ray_dir.glob("trial_*/result.json"):
        try:
            counts.append(sum(1 for line in results.read_text().splitlines() if line.strip()))
        except OSError:
            counts.append(0)
    return sorted(counts, reverse=True)


@pytest.mark.slow
def test_interrupted_study_resumes_to_its_budget_without_duplicate_runs(tmp_path):
    config = tmp_path / "resume.yaml"
    config.write_text(yaml.safe_dump({
        "base": str(REPO / "configs/study/tiny.yaml"),
        "study": {"trials": 3, "concurrency": 1},
        "experiment": {"sns": {"warmup_epochs": 1}, "train": {"epochs": 3, "collapse_patience": 5}},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "test-resume"},
        "storage": {"ray": str(tmp_path / "ray")}}))
    command = [sys.executable, "-m", "pipelines.study", "--config", str(config), "--name", "resumable"]
    first = subprocess.Popen(command, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    ray_dir = tmp_path / "ray" / "resumable"
    deadline = time.time() + 240
    try:  # Ctrl+C once the first trial is done and the second has a checkpoint (mid-training)
        while time.time() < deadline and first.poll() is None:
            counts = _epochs_reported(ray_dir)
            if len(counts) >= 2 and counts[0] >= 3 and counts[1] >= 1:
                break
            time.sleep(0.2)
        assert first.poll() is None, "the study finished before it could be interrupted"
        first.send_signal(signal.SIGINT)
        output, _ = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 130, output[-3000:]
    assert "--resume" in output

    second = _run([*command[2:], "--resume"], cwd=tmp_path)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]

    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "test-resume")
    (parent,) = tracker.find_runs("tags.`nslab.kind` = 'study'")
    assert parent.info.status == "FINISHED"
    children = tracker.children(parent.info.run_id)
    trial_ids = [c.data.tags[TRIAL_ID_TAG] for c in children]
    assert len(trial_ids) == 3 == len(set(trial_ids)), trial_ids  # one run per trial, none duplicated
    resumed = [c for c in children if "nslab.resumed_from_epoch" in c.data.tags]
    assert resumed, "no trial continued from its checkpoint"  # the interrupted one reopened its own run
    for child in children:
        assert child.info.status == "FINISHED"
        steps = {m.step for m in tracker.client.get_metric_history(child.info.run_id, "robust_acc")}
        assert steps == {1, 2, 3}
    trials = tracker.read_table(parent.info.run_id, "study/trials.parquet")
    assert trials.column("status").to_pylist() == ["TERMINATED"] * 3
    assert sorted(trials.column("trial_id").to_pylist()) == sorted(trial_ids)
