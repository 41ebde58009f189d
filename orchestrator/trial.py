"""The Ray Tune trainable: one trial = one ns_core Trainer run, logged as a child MLflow run of the study.

Tune calls `train_trial(config)` in a worker process (and another working directory: every path in
`config` is absolute). `config` holds the study's fixed experiment, the values Optuna sampled
(keyed by dotted path, e.g. "sns.lam") and the orchestration settings:

    {"experiment": {...ExperimentConfig...}, "sns.lam": 0.012, "sns.fraction": 0.2,
     "nslab": {"tracking_uri": "sqlite:////abs/mlflow.db", "mlflow_experiment": "nslab-quick",
               "parent_run_id": "...", "study": "quick-...", "cpus": 1, "search_space": {...}}}

It reads top to bottom, resume first: a checkpoint Tune restored carries the trainer state and the
child run id, so a retried or resumed trial reopens its own run (and, without a checkpoint, finds it by
its trial-id tag) instead of making a duplicate. Every epoch: metrics and a sensitivity table to MLflow,
then `tune.report(metrics, checkpoint=...)`. The last epoch first evaluates on the test split and
closes the run, because Tune may stop the trial at its last report. A diverged or collapsed run is
closed FAILED with a `failure_reason` tag and the trial raises `TrialFailed`; a retry sees the tag and
fails again at once instead of re-training into the same NaN.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import torch
from ray import tune

from ns_core.experiment import build_trainer, load_data
from ns_core.objectives import TrainingCollapsed
from ns_core.training import TrainingDiverged
from orchestrator.artifacts import RunLogger
from orchestrator.config import ExperimentConfig, ParamSpec, apply_overrides
from orchestrator.tracking import PARENT_TAG, Tracker

log = logging.getLogger(__name__)
STATE_FILE = "trainer.pt"  # Trainer.state_dict(), loadable with weights_only=True
META_FILE = "nslab.json"  # {"mlflow_run_id", "trial_id", "epoch"}
TRIAL_ID_TAG = "nslab.trial_id"
FAILURE_TAG = "failure_reason"


class TrialFailed(RuntimeError):
    """Training failed in a way a retry cannot fix (the loss diverged, or SNS collapsed)."""


def sampled_params(config: dict) -> dict:
    """The values Optuna chose for this trial, decoded to config values ({"sns.lam": 0.012, ...})."""
    space = config["nslab"]["search_space"]
    return {path: ParamSpec(**spec).decode(config[path]) for path, spec in space.items() if path in config}


def train_trial(config: dict) -> None:
    settings = config["nslab"]
    torch.set_num_threads(max(1, int(settings["cpus"])))
    for quiet in ("ns_core", "ray.train", "ray.tune"):  # the driver prints one line per trial
        logging.getLogger(quiet).setLevel(logging.WARNING)
    sampled = sampled_params(config)
    experiment = apply_overrides(ExperimentConfig.model_validate(config["experiment"]), sampled)
    spec = experiment.to_spec()
    context = tune.get_context()
    trial_id = context.get_trial_id()
    tracker = Tracker(settings["tracking_uri"], settings["mlflow_experiment"])

    # 1. Resume first: Tune's checkpoint -> trainer state + run id; else the run tagged with this trial id.
    state, run_id = restore(tune.get_checkpoint())
    run_id = run_id or find_trial_run(tracker, settings["parent_run_id"], trial_id)
    if run_id:
        refuse_known_failure(tracker, run_id)
        tracker.reopen(run_id)
    else:
        run_id = tracker.start_run(
            f"trial-{trial_id}", parent_run_id=settings["parent_run_id"], params=experiment.model_dump(),
            tags={TRIAL_ID_TAG: trial_id, "nslab.kind": "trial", "nslab.study": settings["study"],
                  "nslab.sampled": json.dumps(sampled)})
    tracker.set_tags(run_id, {"nslab.checkpoint_dir": context.get_trial_dir(),
                              "nslab.device": "cuda" if torch.cuda.is_available() else "cpu"})

    # 2. Build through the registries and train; each epoch logs, checkpoints and reports (below).
    data = load_data(spec)
    logger = RunLogger(tracker, run_id)

    def on_epoch(metrics: dict, trainer) -> None:
        logger.log_epoch(metrics, trainer)
        last = trainer.epoch >= spec.train.epochs
        result = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
        if last:  # before the report: Tune may stop the trial as soon as it has the last result
            _, final = logger.log_final(trainer, data, spec)
            result.update(final)
            tracker.end_run(run_id, "FINISHED")
        result.update(mlflow_run_id=run_id, final=float(last))
        with tempfile.TemporaryDirectory(prefix="nslab-ckpt-") as directory:
            torch.save(trainer.state_dict(), Path(directory) / STATE_FILE)
            meta = {"mlflow_run_id": run_id, "trial_id": trial_id, "epoch": trainer.epoch}
            (Path(directory) / META_FILE).write_text(json.dumps(meta))
            tune.report(result, checkpoint=tune.Checkpoint.from_directory(directory))

    trainer = build_trainer(spec, callbacks=[on_epoch], data=data)
    if state is not None:
        trainer.load_state_dict(state)
        tracker.set_tags(run_id, {"nslab.resumed_from_epoch": trainer.epoch})
        log.info("trial %s resumes after epoch %d (run %s)", trial_id, trainer.epoch, run_id)
    if trainer.epoch >= spec.train.epochs:
        return  # it had finished (and closed its run) when the study was interrupted
    try:
        trainer.fit()
    except (TrainingDiverged, TrainingCollapsed) as err:
        reason = f"{type(err).__name__}: {err}"
        tracker.set_tags(run_id, {FAILURE_TAG: reason})
        tracker.end_run(run_id, "FAILED")
        raise TrialFailed(reason) from None
    except Exception as err:  # a bug or a lost resource: record it, let Tune retry (max_failures)
        tracker.set_tags(run_id, {"error": f"{type(err).__name__}: {err}"[:5000]})
        tracker.end_run(run_id, "FAILED")
        raise


def restore(checkpoint) -> tuple[dict | None, str | None]:
    """(trainer state, MLflow run id) from a Tune checkpoint, or (None, None)."""
    if checkpoint is None:
        return None, None
    with checkpoint.as_directory() as directory:
        state = torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True)
        meta = json.loads((Path(directory) / META_FILE).read_text())
    return state, meta["mlflow_run_id"]


def find_trial_run(tracker: Tracker, parent_run_id: str, trial_id: str) -> str | None:
    """The child run this trial made before (a restart without a checkpoint), if any."""
    runs = tracker.find_runs(f"tags.`{TRIAL_ID_TAG}` = '{trial_id}' and tags.`{PARENT_TAG}` = '{parent_run_id}'")
    return runs[-1].info.run_id if runs else None  # find_runs is newest first: keep the oldest


def refuse_known_failure(tracker: Tracker, run_id: str) -> None:
    run = tracker.get_run(run_id)
    reason = run.data.tags.get(FAILURE_TAG)
    if run.info.status == "FAILED" and reason:
        raise TrialFailed(reason)

