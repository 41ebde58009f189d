"""The Ray Tune trainable: one trial = one run of orchestrator.run.run_experiment, a child MLflow run.

Tune calls `train_trial(config)` in a worker process (and another working directory: every path in
`config` is absolute). `config` holds the trial's experiment, any values Optuna sampled (keyed by
dotted path, e.g. "sns.lam") and the orchestration settings:

    {"experiment": {...ExperimentConfig...}, "sns.lam": 0.012,
     "nslab": {"role": "search", "label": "...", "tracking_uri": "sqlite:////abs/mlflow.db",
               "mlflow_experiment": "nslab-quick", "parent_run_id": "...", "study": "quick-...", "cpus": 1,
               "search_space": {...}, "warmups": {"2": "/abs/ray_results/.../checkpoint_000001"},
               "evaluate": false, "until": null, "keep_epochs": []}}

Roles: `search` (an Optuna trial), `baseline` (the study's reference), `warmup` (the shared warm-up of a
base method: trains to `until`, keeping a checkpoint at each epoch in `keep_epochs`), `confirm` and
`method` (fixed configurations evaluated on the test split).

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

from ns_core.attacks import Attack
from ns_core.checkpoint import CheckpointError, load_checkpoint
from ns_core.objectives import TrainingCollapsed
from ns_core.training import Trainer, TrainingDiverged
from orchestrator.config import apply_overrides, validate
from orchestrator.experiment_config import ExperimentConfig
from orchestrator.run import FAILURE_TAG, run_experiment
from orchestrator.study_config import ParamSpec
from orchestrator.tracking import PARENT_TAG, Tracker

log = logging.getLogger(__name__)
STATE_FILE = "trainer.pt"  # an nslab checkpoint (ns_core.checkpoint), loadable with weights_only=True
META_FILE = "nslab.json"  # {"mlflow_run_id", "trial_id", "epoch"}
TRIAL_ID_TAG = "nslab.trial_id"
ROLE_TAG = "nslab.role"
FINAL_TAG = "nslab.final"


class TrialFailed(RuntimeError):
    """Training failed in a way a retry cannot fix (the loss diverged, or training collapsed)."""


def sampled_params(config: dict) -> dict:
    """The values Optuna chose for this trial, decoded to config values ({"sns.lam": 0.012, ...})."""
    space = config["nslab"].get("search_space", {})
    return {path: ParamSpec(**spec).decode(config[path]) for path, spec in space.items() if path in config}


def trial_experiment(config: dict) -> ExperimentConfig:
    experiment = validate(ExperimentConfig, config["experiment"])
    sampled = sampled_params(config)
    return apply_overrides(experiment, sampled) if sampled else experiment


def train_trial(config: dict) -> None:
    settings = config["nslab"]
    torch.set_num_threads(max(1, int(settings["cpus"])))
    for quiet in ("ray.train", "ray.tune"):  # the driver prints one line per trial
        logging.getLogger(quiet).setLevel(logging.WARNING)
    logging.getLogger("ns_core").setLevel(logging.ERROR)  # masking flags are in the record and the tables
    experiment = trial_experiment(config)
    sampled = sampled_params(config)
    trial_id = tune.get_context().get_trial_id()
    tracker = Tracker(settings["tracking_uri"], settings["mlflow_experiment"])

    # 1. Resume first: Tune's checkpoint -> trainer state + run id; else the run tagged with this trial id.
    state, run_id = restore(tune.get_checkpoint())
    run_id = run_id or find_trial_run(tracker, settings["parent_run_id"], trial_id)
    if run_id:
        run = tracker.get_run(run_id)
        if run.info.status == "FAILED" and run.data.tags.get(FAILURE_TAG, "").startswith(("TrainingDiverged",
                                                                                           "TrainingCollapsed",
                                                                                           "CatastrophicOverfitting")):
            raise TrialFailed(run.data.tags[FAILURE_TAG])
        if run.data.tags.get(FINAL_TAG) == "1":  # finished before the interruption: report, do not retrain
            tune.report({**run.data.metrics, "final": 1.0, "mlflow_run_id": run_id})
            return
        tracker.reopen(run_id)
    else:
        run_id = tracker.start_run(
            settings.get("label") or f"trial-{trial_id}", parent_run_id=settings["parent_run_id"],
            params={f"sampled.{k}": v for k, v in sampled.items()},
            tags={TRIAL_ID_TAG: trial_id, ROLE_TAG: settings["role"], "nslab.kind": "trial",
                  "nslab.study": settings["study"], "nslab.sampled": json.dumps(sampled),
                  "nslab.label": settings.get("label") or ""})
    tracker.set_tags(run_id, {"nslab.checkpoint_dir": tune.get_context().get_trial_dir(),
                              "nslab.device": "cuda" if torch.cuda.is_available() else "cpu",
                              "nslab.worker": f"{socket.gethostname()}:{os.getpid()}"})

    # 2. A fresh trial with a shared warm-up forks from the warm-up's state at its own warm-up length.
    fork = warmup_for(experiment, settings.get("warmups") or {}) if state is None else None
    if fork is not None:
        epoch, path = fork
        state = load_checkpoint(Path(path) / STATE_FILE)
        tracker.set_tags(run_id, {"nslab.forked_from": f"{path} (after epoch {epoch})"})
        log.info("trial %s forks from the shared warm-up after epoch %d", trial_id, epoch)
    elif state is not None:
        tracker.set_tags(run_id, {"nslab.resumed_from_epoch": state["epoch"]})

    # 3. Train through the one run path; each epoch reports to Tune with a checkpoint.
    until, keep = settings.get("until"), set(settings.get("keep_epochs") or [])

    def report(metrics: dict, trainer: Trainer, final: bool) -> None:
        result = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
        result.update(mlflow_run_id=run_id, final=float(final))
        if final:
            tracker.set_tags(run_id, {FINAL_TAG: "1"})
        if settings["role"] == "warmup" and trainer.epoch not in keep and trainer.epoch != until:
            tune.report(result)
            return
        with tempfile.TemporaryDirectory(prefix="nslab-ckpt-") as directory:
            trainer.save_checkpoint(Path(directory) / STATE_FILE)
            meta = {"mlflow_run_id": run_id, "trial_id": trial_id, "epoch": trainer.epoch}
            (Path(directory) / META_FILE).write_text(json.dumps(meta))
            tune.report(result, checkpoint=tune.Checkpoint.from_directory(directory))

    if state is not None and state["epoch"] >= (until or experiment.train.epochs):
        return  # nothing left to train (a warm-up resumed after its last epoch)
    extra = {"role": settings["role"], **({"label": settings["label"]} if settings.get("label") else {})}
    try:
        run_experiment(experiment, tracker, run_id, state=state, on_epoch=report, until=until,
                       evaluate=bool(settings.get("evaluate")), extra_params=extra,
                       attacks=[Attack.from_dict(a) for a in settings["attacks"]] if settings.get("attacks") else None,
                       examples=settings.get("examples"))
    except (TrainingDiverged, TrainingCollapsed) as err:  # recorded FAILED by the run path
        raise TrialFailed(f"{type(err).__name__}: {err}") from None
    if settings["role"] == "warmup":
        tracker.end_run(run_id, "FINISHED")


def warmup_for(experiment: ExperimentConfig, warmups: dict[str, str]) -> tuple[int, str] | None:
    """(epoch, checkpoint) of the shared warm-up this trial forks from: its own warm-up length for SNS, the
    longest for the base method itself (its trajectory is the warm-up's); None when there is none to take."""
    available = {int(k): v for k, v in warmups.items()}
    if not available:
        return None
    epoch = experiment.sns.warmup_epochs if experiment.method == "sns" else max(available)
    if epoch == 0:
        return None  # SNS from the first epoch: nothing to share
    if epoch not in available:
        raise ValueError(f"no shared warm-up after epoch {epoch}; the study kept {sorted(available)}")
    return epoch, available[epoch]


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
                run_id = json.loads((Path(directory) / META_FILE).read_text())["mlflow_run_id"]
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
    runs = tracker.find_runs(f"tags.`{TRIAL_ID_TAG}` = '{trial_id}' and tags.`{PARENT_TAG}` = '{parent_run_id}'")
    return runs[-1].info.run_id if runs else None  # find_runs is newest first: keep the oldest
