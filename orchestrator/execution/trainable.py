"""The Ray Tune trainable: one trial = one run of orchestrator.run.run_experiment, a child MLflow run.

Tune calls `train_trial(settings)` in a worker process (and another working directory: every path in the
settings is absolute) with the trial's TrialSettings (execution/trial_settings.py): its role, label, experiment
and overrides, where it records, and the shared warm-up checkpoints it may fork from. Roles: `search` (a
trial of an arm), `baseline` (the untuned baseline), `warmup` (a shared warm-up: trains to `until`, keeping a
checkpoint at each epoch in `keep_epochs`), `confirm` and `method` (fixed configurations evaluated on the
test split). Its torch threads are its Tune CPU request.

It reads top to bottom, resume first: a checkpoint Tune restored carries the trainer state and the child
run id, so a retried or resumed trial reopens its own run (found by its trial-id tag when there is no
checkpoint yet) instead of making a duplicate, and logs only the epochs that run does not hold. A trial
whose run already finished (it ended just before the study was interrupted) reports its recorded result
instead of training again. A trial with a shared warm-up forks from the warm-up's checkpoint at its own
warm-up length. A diverged or collapsed run is closed FAILED with a `failure_reason` tag and the trial
raises `TrialFailed`; a retry sees the tag and fails again at once instead of re-training into the same NaN.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
from pathlib import Path

import torch
from ray import tune

from ns_core.checkpoint import CheckpointError, load_checkpoint
from ns_core.training import Trainer
from orchestrator.execution.trial_outcome import EPOCH, PROGRESS, RUN_ID, report_values
from orchestrator.execution.trial_settings import Role, TrialSettings
from orchestrator.execution.warmup import fork_point
from orchestrator.record import tags
from orchestrator.record.tracking import Tracker
from orchestrator.results import FAILURES, failure_kind
from orchestrator.run import run_experiment

log = logging.getLogger(__name__)
STATE_FILE = "trainer.pt"  # an nslab checkpoint (ns_core.checkpoint), loadable with weights_only=True
META_FILE = "nslab.json"  # {"mlflow_run_id", "trial_id", "epoch"}


class TrialFailed(RuntimeError):
    """Training failed in a way a retry cannot fix (the loss diverged, or training collapsed)."""


def train_trial(settings: TrialSettings) -> None:
    context = tune.get_context()
    torch.set_num_threads(max(1, int(context.get_trial_resources().required_resources.get("CPU", 1))))
    for quiet in ("ray.train", "ray.tune"):  # the driver prints one line per trial
        logging.getLogger(quiet).setLevel(logging.WARNING)
    logging.getLogger("ns_core").setLevel(logging.ERROR)  # masking flags are in the record and the tables
    experiment = settings.experiment_config()
    trial_id = context.get_trial_id()
    record = settings.record
    tracker = Tracker(record.tracking_uri, record.mlflow_experiment)

    # 1. Resume first: Tune's checkpoint -> trainer state + run id; else the run tagged with this trial id.
    state, run_id = restore(tune.get_checkpoint())
    run_id = run_id or find_trial_run(tracker, record.parent_run_id, trial_id)
    if run_id:
        run = tracker.get_run(run_id)
        reason = run.data.tags.get(tags.FAILURE, "")
        if run.info.status == "FAILED" and failure_kind(reason):
            raise TrialFailed(reason)
        if run.data.tags.get(tags.FINAL) == "1":  # finished before the interruption: report, do not retrain
            tune.report(report_values({**run.data.metrics, EPOCH: experiment.train.epochs, PROGRESS: 1.0}, run_id,
                                      final=True))
            return
        tracker.reopen(run_id)
    else:
        run_tags = {tags.TRIAL_ID: trial_id, tags.ROLE: settings.role, tags.KIND: tags.Kind.TRIAL,
                    tags.STUDY: record.study, tags.LABEL: settings.label,
                    tags.OVERRIDES: json.dumps(dict(settings.overrides))}
        if settings.arm:
            run_tags[tags.ARM] = settings.arm
        if settings.replicate is not None:  # a replicated study's runs, grouped by the search that chose them
            run_tags[tags.REPLICATE] = str(settings.replicate)
        run_id = tracker.start_run(settings.label, parent_run_id=record.parent_run_id, tags=run_tags)
    tracker.set_tags(run_id, {tags.CHECKPOINT_DIR: persistent_trial_dir(context),
                              tags.DEVICE: "cuda" if torch.cuda.is_available() else "cpu",
                              tags.WORKER: f"{socket.gethostname()}:{os.getpid()}"})

    # 2. A fresh trial with a shared warm-up forks from the warm-up's state at its own warm-up length.
    fork = fork_point(experiment, settings.forks) if state is None else None
    if fork is not None:
        epoch, path = fork
        state = load_checkpoint(Path(path) / STATE_FILE)
        tracker.set_tags(run_id, {tags.FORKED_FROM: f"{path} (after epoch {epoch})"})
        log.info("trial %s forks from the shared warm-up after epoch %d", trial_id, epoch)
    elif state is not None:
        tracker.set_tags(run_id, {tags.RESUMED_FROM_EPOCH: state["epoch"]})

    # 3. Train through the one run path; each epoch reports to Tune with a checkpoint.
    keep = set(settings.keep_epochs)

    def report(metrics: dict, trainer: Trainer, final: bool) -> None:
        result = report_values({**metrics, PROGRESS: trainer.epoch / experiment.train.epochs}, run_id, final)
        if final:
            tracker.set_tags(run_id, {tags.FINAL: "1"})
        if settings.role == Role.WARMUP and trainer.epoch not in keep and trainer.epoch != settings.until:
            tune.report(result)
            return
        with tempfile.TemporaryDirectory(prefix="nslab-ckpt-") as directory:
            trainer.save_checkpoint(Path(directory) / STATE_FILE)
            meta = {RUN_ID: run_id, "trial_id": trial_id, "epoch": trainer.epoch}
            (Path(directory) / META_FILE).write_text(json.dumps(meta))
            tune.report(result, checkpoint=tune.Checkpoint.from_directory(directory))

    if state is not None and state["epoch"] >= (settings.until or experiment.train.epochs):
        return  # nothing left to train (a warm-up resumed after its last epoch)
    try:
        run_experiment(experiment, tracker, run_id, state=state, on_epoch=report, until=settings.until,
                       evaluate=settings.evaluate, params=settings.run_params(),
                       attacks=list(settings.final_suite) if settings.final_suite else None,
                       examples=settings.examples, objective=settings.objective,
                       per_example={"configuration": settings.configuration, "seed": settings.seed}
                       if settings.role == Role.CONFIRM else None)
    except FAILURES as err:  # recorded FAILED by the run path
        raise TrialFailed(f"{type(err).__name__}: {err}") from None
    if settings.role == Role.WARMUP:
        tracker.end_run(run_id, "FINISHED")


def persistent_trial_dir(context) -> str:
    """Where Tune keeps this trial's checkpoints for good (its storage path), not its temporary session dir."""
    try:
        return context.get_storage().trial_fs_path
    except Exception:  # a developer API of Ray's: fall back to the session's trial dir
        return context.get_trial_dir()


def restore(checkpoint) -> tuple[dict | None, str | None]:
    """(trainer state, MLflow run id) from a Tune checkpoint, or (None, None). A damaged state file (a write
    cut short) gives way to the trial's previous checkpoint (Tune keeps two), else to a fresh start of the
    same run; either way with a warning, and its logged epochs stay without repeats."""
    if checkpoint is None:
        return None, None
    run_id = None
    for candidate in [checkpoint, *_older(checkpoint)]:
        with candidate.as_directory() as directory:
            try:
                run_id = json.loads((Path(directory) / META_FILE).read_text())[RUN_ID]
                state = load_checkpoint(Path(directory) / STATE_FILE)
            except (CheckpointError, OSError, ValueError, KeyError) as err:
                log.warning("trial checkpoint %s is unusable (%s); trying the one before it", candidate.path, err)
                continue
        if candidate is not checkpoint:
            log.warning("resuming from the older checkpoint %s", candidate.path)
        return state, run_id
    log.warning("no usable trial checkpoint: the trial restarts from its first epoch in the same MLflow run")
    return None, run_id


def _older(checkpoint) -> list:
    """The trial's other kept checkpoints, newest first (Tune names them checkpoint_000NNN)."""
    import pyarrow.fs

    parent, _, name = checkpoint.path.rstrip("/").rpartition("/")
    try:
        infos = checkpoint.filesystem.get_file_info(pyarrow.fs.FileSelector(parent))
    except OSError:
        return []
    names = sorted((i.base_name for i in infos if i.base_name.startswith("checkpoint_") and i.base_name < name),
                   reverse=True)
    return [tune.Checkpoint(f"{parent}/{n}", filesystem=checkpoint.filesystem) for n in names]


def find_trial_run(tracker: Tracker, parent_run_id: str, trial_id: str) -> str | None:
    """The child run this trial made before (a restart without a checkpoint), if any."""
    runs = tracker.find_runs(f"tags.`{tags.TRIAL_ID}` = '{trial_id}' and tags.`{tags.PARENT}` = '{parent_run_id}'")
    return runs[-1].info.run_id if runs else None  # find_runs is newest first: keep the oldest
