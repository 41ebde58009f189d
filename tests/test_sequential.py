"""Decisive, stable verdicts on real Ray, Optuna and MLflow: a tiny study whose answer is clear (SNS on its
PGD-AT base against plain training at Linf eps 0.2: tens of robust points apart) but which starts from one
confirmation seed, so it must add seeds before it may decide; run twice, once per memory format
(NSLAB_MEMORY_FORMAT), which changes every float rounding of the training. The seed-to-seed spread, not the
rounding, decides: both runs give the same verdict. The second runs as a `ray job submit` job on a real Ray
cluster head (127.0.0.1, its own ports, stopped by PID)."""

import json
import os
import subprocess
import sys

import pytest
import yaml
from conftest import RAY, REPO, TINY_STUDY

from orchestrator.record.tracking import Tracker

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def verdicts(local_ray, ray_head, tmp_path_factory):
    """{memory format: (parent run, tracking URI)} of the same study run once per format: in this process's
    local Ray (contiguous, the test session's format), and as a `ray job submit` job on a real `ray start --head`
    cluster (channels_last, through the job's runtime environment): the cluster path users take."""
    from orchestrator.config.study import load_study
    from orchestrator.study.driver import run_study

    tmp = tmp_path_factory.mktemp("sequential")
    config = tmp / "study.yaml"
    config.write_text(yaml.safe_dump({
        "base": str(TINY_STUDY),
        "study": {"trials": 1, "concurrency": 1, "share_warmup": False,  # one trial actor per search: imports cost
                  "points_to_evaluate": [{"sns.lam": 0.05, "sns.fraction": 0.2}]},
        "experiment": {"data": {"train_limit": 1500, "test_limit": 1000},  # the whole test split: steadier seeds
                       "train": {"epochs": 3, "eps_ramp_epochs": 1,
                                 "val_attack": {"name": "pgd", "eps": 0.2, "steps": 3}},
                       "eval": {"attacks": [{"name": "fgsm", "eps": 0.2}, {"name": "pgd", "eps": 0.2, "steps": 5}],
                                "examples": None}},
        "baseline": {"method": "standard"},
        "confirm": {"seeds": 1, "max_seeds": 4},  # the interval counts the 1,000 test examples too: up to 4 seeds
        "tracking": {"experiment": "sequential"}, "storage": {"ray": str(tmp / "ray")}}))
    out = {}
    uri = f"sqlite:///{tmp / 'contiguous' / 'mlflow.db'}"
    outcome = run_study(load_study(config, {"tracking.uri": uri}), "seq-contiguous")
    out["contiguous"] = Tracker(uri, "sequential").get_run(outcome.parent_run_id), uri
    uri = f"sqlite:///{tmp / 'channels_last' / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "token"  # Ray 2.60 clusters started here use token auth (~/.ray/auth_token)
    job = subprocess.run(
        [str(RAY), "job", "submit", "--address", ray_head, "--working-dir", str(REPO), "--runtime-env-json",
         json.dumps({"env_vars": {"NSLAB_MEMORY_FORMAT": "channels_last"}}), "--", sys.executable, "-m",
         "pipelines.study", "--config", str(config), "--name", "seq-channels-last", "--tracking-uri", uri],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=480)
    assert job.returncode == 0 and "succeeded" in job.stdout + job.stderr, job.stdout[-4000:] + job.stderr[-2000:]
    assert "undecided after 1 seed" in job.stdout  # one seed has no interval: a second is added
    assert "verdict (test split, paired by seed):" in job.stdout  # the study's own report, from the job's driver
    (parent,) = Tracker(uri, "sequential").find_runs("tags.`nslab.kind` = 'study'")
    out["channels_last"] = parent, uri
    return out


def test_confirmation_adds_seeds_until_the_answer_is_decided(verdicts):
    parent, uri = verdicts["contiguous"]
    table = Tracker(uri, "sequential").read_table(parent.info.run_id, "study/confirmation.parquet").to_pylist()
    seeds = sorted({r["seed"] for r in table})
    assert seeds in ([1, 2], [1, 2, 3], [1, 2, 3, 4]) and len(table) == 2 * len(seeds)  # one seed, then one a round
    assert all(r["robust_diff"] > 0.1 for r in table if r["configuration"] == "sns")  # a gap of tens of points
    verdict = parent.data.tags["mlflow.note.content"]
    assert f"SNS beats STANDARD after {len(seeds)} seeds" in verdict
    tracker = Tracker(uri, "sequential")  # every confirmation run logged its per-example outcome: the interval uses it
    runs = [r for r in tracker.children(parent.info.run_id) if r.data.tags.get("nslab.role") == "confirm"]
    assert len(runs) == len(table)
    for run in runs:
        examples = tracker.read_table(run.info.run_id, "confirm/examples.parquet")
        assert examples.column_names == ["configuration", "seed", "example", "clean_correct", "robust_correct",
                                         "broken_by"]
        assert examples.num_rows == 1000 and examples.column("robust_correct").to_pylist().count(True) == round(
            1000 * run.data.metrics["test/robust_acc"])
    assert "test examples ±" in verdict and "not recorded" not in verdict
    assert "SNS, tuned over 1 trial, vs an untuned STANDARD baseline" in verdict


def test_the_memory_format_changes_the_rounding_not_the_verdict(verdicts):
    decisions = {}
    for fmt, (parent, uri) in verdicts.items():
        (row,) = Tracker(uri, "sequential").read_table(parent.info.run_id, "study/verdicts.parquet").to_pylist()
        decisions[fmt] = row["decision"]
    assert decisions == {"contiguous": "beats", "channels_last": "beats"}
