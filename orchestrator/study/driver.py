"""A study: two arms searched alike by Ray Tune + Optuna (the baseline and the method), then a sequential
confirmation of each arm's best on fresh seeds; everything recorded in MLflow.

    with ray_session():
        outcome = run_study(load_study("configs/study/quick.yaml"), name="quick-20260101-120000")

Phases, each a Tune experiment under <storage.ray>/<name>/ (so --resume restores whichever was running):

1. warmup: when no searched path shapes the base-method trajectory (orchestrator/execution/warmup.py), one trial of the
   base method trains the longest warm-up the search space allows, keeping a checkpoint after each length;
2. search-baseline, search-<method>: each arm's trials (the same searcher, multi-fidelity scheduler, trial
   count and maximum epochs; the baseline arm over the shared recipe paths, the method's arm over those and
   its own), choosing on the validation split only; an untuned baseline is the single phase `baseline`;
3. confirm-1, confirm-2, ...: each arm's best on fresh seeds, evaluated on the test split, until decided
   (orchestrator/study/confirmation.py).

One MLflow parent run per study holds every trial as a child run, the study's tables (trials, Pareto front,
importances, compute, rung correlations, confirmation), their plots, a Markdown report and the verdict. This
module is the study's life: start or resume, its parent run, the phases in order. The search's rows are
orchestrator/study/rows.py, the outcome and its record orchestrator/study/outcome.py, the confirmation
orchestrator/study/confirmation.py.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from orchestrator.config.loader import settings_text
from orchestrator.config.study import StudyFile
from orchestrator.execution import warmup
from orchestrator.execution.phases import (
    TrialLog,
    exists,
    known_trial_ids,
    run_search,
    run_warmups,
    warmup_checkpoints,
)
from orchestrator.execution.ray_session import trial_resources
from orchestrator.execution.search import arm_sampler, trial_label
from orchestrator.execution.trial_settings import Record, Role, TrialSettings
from orchestrator.record import tags
from orchestrator.record.tracking import Tracker, config_hash, flatten, git_commit
from orchestrator.study.confirmation import design_summary, run_confirmation
from orchestrator.study.outcome import StudyOutcome, record_outcome
from orchestrator.study.rows import collect

log = logging.getLogger(__name__)
LAUNCH_FILE = "nslab-study.json"  # how the study was started: config, command-line overrides, smoke mode


def study_dir(study: StudyFile, name: str) -> str:
    return f"{study.storage.ray.rstrip('/')}/{name}"


def read_launch(path: str) -> dict | None:
    """How the study at `path` was started ({"config", "overrides", "origins", "smoke"}), if it exists."""
    file = Path(path) / LAUNCH_FILE
    return json.loads(file.read_text()) if file.is_file() else None


def run_study(study: StudyFile, name: str, resume: bool = False, keep_gpu: bool = False,
              launch: dict | None = None, confirm: bool = True, confirm_only: bool = False) -> StudyOutcome:
    """Run (or resume) the study `name` on the current Ray cluster and record it in MLflow. Ctrl+C ends the
    parent run KILLED and raises KeyboardInterrupt once Tune has saved its state (--resume continues).
    `launch`: how it was started (config path, command-line overrides), kept with the study for --resume."""
    path = study_dir(study, name)
    started = read_launch(path) is not None
    if (resume or confirm_only) and not started:
        raise FileNotFoundError(f"no study to {'resume' if resume else 'confirm'} at {path}; run it without "
                                f"{'--resume' if resume else '--confirm-only'} first")
    if not (resume or confirm_only) and Path(path).exists():
        raise ValueError(f"study {name!r} already exists at {path}; pass --resume to continue it or --name NEW "
                         "for a fresh one")
    if confirm_only and not exists(path, "search"):
        raise FileNotFoundError(f"study {name!r} has not finished its search at {path}; --resume it first")
    tracker = Tracker(study.tracking.uri, study.tracking.experiment)
    parent = _parent_run(tracker, study, name, resume or confirm_only, launch or {})
    if not started and "://" not in path:
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / LAUNCH_FILE).write_text(json.dumps(launch or {}, indent=1))
    record = Record(study.tracking.uri, study.tracking.experiment, parent, name)
    s = study.study
    resources = trial_resources(s.resources.cpu, s.resources.gpu, keep_gpu)
    arms = study.arm_list()
    searches = f", {s.replicates} searches side by side" if s.replicates > 1 else ""
    log.info("study %s: %s%s; %d at a time, objectives %s; MLflow parent run %s", name,
             " and ".join(a.describe() for a in arms), searches, s.concurrency,
             ", ".join(f"{o.metric} ({o.mode})" for o in s.objectives), parent)
    if confirm and study.confirm is not None:
        log.info("%s", design_summary(study, path))  # what the confirmation risks and finds (nslab power)
    try:
        if not confirm_only:
            search(study, record, path, resources, search_warmup(study, record, path, resources))
        outcome = collect(study, name, path, tracker, parent)
        if confirm and study.confirm is not None:
            outcome.confirmation = run_confirmation(study, outcome.rows, outcome.pareto, record, path, resources)
    except BaseException as err:
        tracker.set_tags(parent, {tags.ERROR: f"{type(err).__name__}: {err}"[:5000]})
        tracker.end_run(parent, "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        raise
    outcome.seconds = time.time() - tracker.get_run(parent).info.start_time / 1000  # the whole study, resumes included
    close_orphans(tracker, parent, path)
    record_outcome(study, outcome, tracker)
    return outcome


def search_warmup(study: StudyFile, record: Record, path: str,
                  resources: dict[str, float]) -> tuple[str, dict[int, str]] | None:
    """(trajectory key, {epoch: checkpoint}) of the search's shared warm-up (orchestrator/execution/warmup.py
    `search_warmup_plan`), trained once before the search; None when its trials share none."""
    lengths = warmup.search_warmup_plan(study)
    if lengths is None:
        return None
    experiment = study.experiment
    trial = warmup.warmup_trial(experiment, lengths, record, "warmup")
    grid = run_warmups([trial], path, "warmup", resources, study.study.max_failures, widen=not study.study.reproducible)
    checkpoints = warmup_checkpoints(grid).get("warmup")
    if not checkpoints:
        raise RuntimeError(f"the shared warm-up failed ({grid[0].error}); see {path}/warmup")
    return warmup.trajectory_key(experiment), checkpoints


def search(study: StudyFile, record: Record, path: str, resources: dict[str, float],
           forks: tuple[str, dict[int, str]] | None) -> None:
    """The search phase: every replicate's arms in one Tune experiment (an untuned baseline is one fixed trial
    of each), each trial forking from the shared warm-up when it shares its trajectory."""
    searches = []
    for replicate in replicates(study):
        samplers = []
        for arm in study.arm_list(replicate):
            shares = forks is not None and forks[0] == warmup.trajectory_key(arm.experiment)
            template = TrialSettings(role=Role.SEARCH if arm.tuned else Role.BASELINE,
                                     label=trial_label(arm.name, None, replicate), replicate=replicate,
                                     experiment=arm.experiment.model_dump(mode="json"), record=record, arm=arm.name,
                                     forks=forks[1] if shares else {}, objective=study.study.objectives[0].metric)
            samplers.append(arm_sampler(study, arm, template))
        searches.append(samplers)
    objectives = [o.metric for o in study.study.objectives]
    total = sum(s.trials for samplers in searches for s in samplers)
    run_search(study, searches, path, resources, callbacks=[TrialLog(
        record.tracking_uri, record.mlflow_experiment, objectives, total, "search")])


def replicates(study: StudyFile) -> list[int | None]:
    """The searches' replicate numbers: [None] for a study of one search (its labels carry no replicate)."""
    count = study.study.replicates
    return list(range(1, count + 1)) if count > 1 else [None]


def close_orphans(tracker: Tracker, parent: str, path: str) -> int:
    """End the runs of trials Tune never recorded: a driver killed within seconds of starting a trial loses it
    from the experiment state, and the resumed study runs that configuration again as a new trial. The lost
    run stays in the record, KILLED, with the reason as a tag."""
    known = known_trial_ids(path)
    orphans = [run for run in tracker.children(parent) if run.data.tags.get(tags.TRIAL_ID) not in known]
    for run in orphans:
        tracker.set_tags(run.info.run_id, {tags.ORPHANED: "the driver died before Ray Tune recorded this trial; the "
                                                       "resumed study ran its configuration again as another trial"})
        if run.info.status == "RUNNING":
            tracker.end_run(run.info.run_id, "KILLED")
    return len(orphans)


def study_hash(study: StudyFile) -> str:
    """Hash of what defines the study's results (not where they are stored), to refuse a changed resume."""
    shape = {"study", "experiment", "search_space", "baseline"}
    if study.arms is not None:  # a two-arm study's hash stays what it was, so its --resume still matches
        shape |= {"arms", "control", "compare"}
    return config_hash(study.model_dump(mode="json", include=shape))


def _parent_run(tracker: Tracker, study: StudyFile, name: str, resume: bool, launch: dict) -> str:
    if resume:
        runs = tracker.find_runs(f"tags.`{tags.STUDY}` = '{name}' and tags.`{tags.KIND}` = '{tags.Kind.STUDY}'")
        if runs:
            saved = runs[0].data.tags.get(tags.CONFIG_HASH)
            if saved and saved != study_hash(study):
                raise ValueError(f"the config of study {name!r} changed since it started (hash {saved} -> "
                                 f"{study_hash(study)}); resume it with the config and flags it started with")
            return tracker.reopen(runs[0].info.run_id)
        log.warning("no MLflow parent run tagged %s=%s in %s: starting a new one", tags.STUDY, name,
                    tracker.tracking_uri)
    parent = tracker.start_run(name, params=flatten(study.model_dump(mode="json")), tags={
        tags.STUDY: name, tags.KIND: tags.Kind.STUDY, tags.GIT_COMMIT: git_commit(),
        tags.CONFIG_HASH: study_hash(study), tags.CONFIG_PATH: launch.get("config", ""),
        tags.FLAGS: json.dumps(launch.get("overrides", {})), tags.RAY_EXPERIMENT: study_dir(study, name)})
    tracker.log_text(parent, settings_text(study), "study/config.yaml")
    return parent
