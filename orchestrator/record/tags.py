"""Every MLflow tag name nslab writes or searches by, in one place (docs/studies.md, "What is recorded").

    from orchestrator.record import tags
    tracker.start_run(name, tags={tags.KIND: tags.Kind.STUDY, tags.STUDY: name})
    runs = tracker.find_runs(f"tags.`{tags.KIND}` = '{tags.Kind.STUDY}'")

A tag is how a person (the MLflow UI's filter box) and nslab (`--resume`, the analyses, the screenshot tool)
find a run, so a name written twice with a difference is a run that is never found again.
"""

from __future__ import annotations

from enum import StrEnum


class Kind(StrEnum):
    """What a run is (the tag KIND)."""

    STUDY = "study"
    TRIAL = "trial"
    TRAIN = "train"
    EVALUATE = "evaluate"


# MLflow's own
PARENT = "mlflow.parentRunId"

# what a run is and where it belongs
KIND = "nslab.kind"  # a Kind
STUDY = "nslab.study"  # the study's name, on the parent and on every trial
ANALYSIS = "nslab.analysis"  # compare | stabilize | methods | sensitivity | study (analysis reports)
ROLE = "nslab.role"  # a trial's Role (search, baseline, warmup, confirm, fixed)
ARM = "nslab.arm"
TRIAL_ID = "nslab.trial_id"  # Ray Tune's trial id
LABEL = "nslab.label"  # the trial's readable name ("sns-03", "baseline s2")
REPLICATE = "nslab.replicate"

# how it ran
STATUS = "nslab.status"  # nslab's Status (COMPLETE, STOPPED_EARLY, FAILED, ...); MLflow's status says less
STOPPED_EARLY = "nslab.stopped_early"  # where the scheduler stopped it ("asha after epoch 4")
FINAL = "nslab.final"  # the run's final evaluation is recorded
FAILURE = "nslab.failure_reason"  # one line: why a run failed
EVAL_FLAGS = "eval.flags"  # gradient-masking checks that tripped
OVERRIDES = "nslab.overrides"  # the trial's searched values, JSON
CHECKPOINT_DIR = "nslab.checkpoint_dir"
CHECKPOINT = "nslab.checkpoint"  # the checkpoint a train run writes or an evaluate run reads
SOURCE_RUN = "nslab.source_run_id"  # the run that wrote an evaluated checkpoint
DEVICE = "nslab.device"
WORKER = "nslab.worker"
FORKED_FROM = "nslab.forked_from"
RESUMED_FROM_EPOCH = "nslab.resumed_from_epoch"
ORPHANED = "nslab.orphaned"
ERROR = "nslab.error"  # why a study's parent run ended FAILED or KILLED

# provenance
GIT_COMMIT = "nslab.git_commit"
CONFIG_HASH = "nslab.config_hash"
CONFIG_PATH = "nslab.config_path"
FLAGS = "nslab.flags"  # a study's command-line overrides, JSON
RAY_EXPERIMENT = "nslab.ray_experiment"

# the verdict, short enough for a runs-table column
VERDICT = "nslab.verdict"
