"""Run a fair hyperparameter study of (SNS) adversarial training: the baseline and the method searched alike by
Ray Tune + Optuna, then each arm's best confirmed on fresh seeds until the answer is decided; all in MLflow.

    python -m pipelines.study --config configs/study/quick.yaml [--name NAME] [--resume]
    python -m pipelines.study --config configs/study/quick.yaml --dry-run       # validate and print settings
    python -m pipelines.study --config configs/study/tiny.yaml --smoke-test     # a few tiny trials
    python -m pipelines.study --config configs/study/quick.yaml --trials 3 --set confirm.max_seeds=6
    python -m pipelines.study --config configs/study/quick.yaml --name quick-... --confirm-only

The search chooses on the validation split; only the confirmation reads the test split. Flags that change the
config (--trials, --set, --storage, --tracking-uri) go through the config loader with the YAML's checks, and
are recorded with the study: the same command plus --resume continues it (so does --resume alone). The same
line works behind `ray job submit --address http://HEAD:8265 --working-dir . -- ...`: with RAY_ADDRESS set (or
--address) it joins that cluster, else it starts a local Ray on 127.0.0.1 with every core and shuts it down at
the end. It prints one line per finished trial, then each arm's trials, the compute each arm spent, the
confirmation table, the command that opens the MLflow UI and, last, the verdict. Ctrl+C stops it cleanly
(exit 130); `--resume` continues it to its full budget.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from orchestrator.config.loader import parse_set, settings_text
from orchestrator.config.study import StudyFile, load_study, smoke_study
from pipelines._common import (
    EXIT_INTERRUPTED,
    Parser,
    add_common_flags,
    add_download_flag,
    check_tracking_location,
    positive_int,
    prog,
    run_cli,
    setup_logging,
    writable_dir,
)

LOCATIONS = ("storage.ray", "tracking.uri")  # where a study lives, not what it computes


def build_parser() -> argparse.ArgumentParser:
    parser = Parser("study", description=__doc__)
    parser.add_argument("--config", required=True, help="study YAML (e.g. configs/study/quick.yaml)")
    parser.add_argument("--name", help="study name: Ray experiment directory and MLflow parent run "
                                       "(default: <study.name>-<date>-<time>; with --resume: the latest one)")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted study (Tune restore; same MLflow runs; the flags it started "
                             "with) to its full budget")
    confirm = parser.add_mutually_exclusive_group()
    confirm.add_argument("--no-confirm", action="store_true", help="stop after the search (no test-split stage)")
    confirm.add_argument("--confirm-only", action="store_true",
                         help="run (or finish) only the confirmation of a finished study (needs --name or the latest)")
    parser.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS, else a local Ray)")
    parser.add_argument("--storage", metavar="PATH", help="Ray results directory (= --set storage.ray=PATH)")
    parser.add_argument("--trials", type=positive_int, metavar="N",
                        help="search trials per arm (= --set study.trials=N)")
    parser.add_argument("--set", action="append", default=[], metavar="PATH=VALUE",
                        help="override a study field, e.g. --set experiment.train.epochs=6 (repeatable; YAML values)")
    parser.add_argument("--keep-gpu", action="store_true",
                        help="keep the GPU request even if no GPU is in the cluster yet (autoscaling GPU workers)")
    add_download_flag(parser)
    add_common_flags(parser)
    return parser


def flag_overrides(args) -> tuple[dict[str, Any], dict[str, str]]:
    """The config changes the command line asks for, as loader overrides, and the flag each came from."""
    overrides, origins = {}, {}
    for item in args.set:
        for path, value in parse_set([item]).items():
            overrides[path], origins[path] = value, f"--set {item}"
    for flag, path, value in (("--trials", "study.trials", args.trials), ("--storage", "storage.ray", args.storage),
                              ("--tracking-uri", "tracking.uri", args.tracking_uri)):
        if value is not None:
            overrides[path], origins[path] = value, f"{flag} {value}"
    if args.download:
        overrides["experiment.data.download"], origins["experiment.data.download"] = True, "--download"
    return overrides, origins


def study_name(base: str, storage: str, latest: bool) -> str | None:
    """<base>-<date>-<time> for a new study; the newest existing <base>-* directory to resume or confirm (None
    when there is none)."""
    if not latest:
        return f"{base}-{time.strftime('%Y%m%d-%H%M%S')}"
    found = sorted(Path(storage).glob(f"{base}-*")) if "://" not in storage else []
    return max(found, key=lambda p: p.stat().st_mtime).name if found else None


def searched(args, study: StudyFile) -> str:
    """Where this command looks for studies, in words: ./ray_results of the current directory unless --storage
    or the config's storage.ray say otherwise."""
    here = Path.cwd().resolve() / "ray_results"
    if args.storage:
        return f"--storage {study.storage.ray}"
    if study.storage.ray == str(here):
        return f"ray_results in the current directory ({here}; --storage PATH looks elsewhere)"
    return f"storage.ray of {args.config} ({study.storage.ray}; --storage PATH looks elsewhere)"


def load(args) -> tuple[StudyFile, dict[str, Any], str]:
    """The study as the command line asks for it; on --resume / --confirm-only, with the flags it started with.
    Returns (study, launch record, name)."""
    overrides, origins = flag_overrides(args)
    study = load_study(args.config, overrides, origins)
    flag = "--resume" if args.resume else "--confirm-only"
    name = args.name or study_name(study.study.name, study.storage.ray, args.resume or args.confirm_only)
    if name is None:
        raise FileNotFoundError(f"{flag}: no study {study.study.name}-* in {searched(args, study)}; run the "
                                f"command in the directory the study ran in, or start one without {flag}")
    launch = {"config": str(Path(args.config).resolve()), "overrides": overrides, "origins": origins,
              "smoke": bool(args.smoke_test)}
    if args.resume or args.confirm_only:
        from orchestrator.study.driver import read_launch, study_dir

        started = read_launch(study_dir(study, name))
        if started is None:
            raise FileNotFoundError(f"{flag}: no study {name!r} in {searched(args, study)}; run the command in the "
                                    f"directory the study ran in, or start it without {flag}")
        launch = reconcile(launch, started, name)
        recorded = {**launch["overrides"], **{p: v for p, v in overrides.items() if p in LOCATIONS}}
        if recorded != overrides:  # the study started with other flags: read the config once more with those
            study = load_study(args.config, recorded, launch.get("origins"))
    if launch["smoke"]:
        study = smoke_study(study)
    return study, launch, name


def reconcile(asked: dict, started: dict, name: str) -> dict:
    """The launch a resume continues: the recorded one when the command repeats it or names no changes; a
    command that changes what the study computes is refused in one line."""
    def shaping(launch: dict) -> dict:
        return {p: v for p, v in launch.get("overrides", {}).items() if p not in LOCATIONS}

    if shaping(asked) and (shaping(asked) != shaping(started) or asked["smoke"] != started.get("smoke")):
        flags = " ".join(started.get("origins", {}).get(p, f"--set {p}={v}") for p, v in shaping(started).items())
        flags += " --smoke-test" if started.get("smoke") else ""
        raise ValueError(f"study {name!r} started with {flags or 'no config flags'}; resume it with the same flags "
                         "(or none: the recorded ones are used)")
    if asked["smoke"] and not started.get("smoke"):
        raise ValueError(f"study {name!r} did not start with --smoke-test; resume it without")
    if shaping(started) and not shaping(asked):
        print(f"resuming {name} with the flags it started with: "
              + " ".join(started.get("origins", {}).get(p, p) for p in shaping(started)), flush=True)
    return {**started, "overrides": {**started.get("overrides", {})}, "smoke": started.get("smoke", False)}


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    study, launch, name = load(args)
    from orchestrator.run import preflight

    # everything that can be wrong with the data, the model and its layers is one line, before Ray starts
    ready = {arm.name: preflight(arm.experiment) for arm in study.arm_list()}
    if args.dry_run:
        return dry_run(args, study, name, ready)
    if "://" not in study.storage.ray:
        writable_dir(study.storage.ray, "Ray results folder (storage.ray)")
    check_tracking_location(study.tracking.uri)
    for arm, found in ready.items():
        if found.proposed:
            print(f"{arm} arm: layers {found.layers} proposed by nslab (set experiment.sns.layers to choose)")
    for note in study.threat_model_notes():
        print(f"note: {note}", flush=True)

    from orchestrator.execution.ray_session import ray_session
    from orchestrator.study.driver import run_study  # imports Ray Tune: after ray_session set the environment

    try:
        with ray_session(args.address):
            outcome = run_study(study, name, resume=args.resume, keep_gpu=args.keep_gpu, launch=launch,
                                confirm=not args.no_confirm, confirm_only=args.confirm_only)
    except KeyboardInterrupt:
        print(f"\ninterrupted; the study's state is saved. Continue with:\n  {prog('study')} --config "
              f"{args.config} --name {name} --resume", flush=True)
        return EXIT_INTERRUPTED
    from orchestrator.record.summary import console_text

    print(console_text(study, outcome))
    return 0


def progress(args, study: StudyFile, name: str) -> str:
    """What --resume or --confirm-only would do to the existing study `name`, read from its MLflow parent run
    and its Ray results without changing either: it is finished (and would train nothing), its search finished
    without a confirmation (which they would run), or it was interrupted (and they continue it)."""
    from orchestrator.record import tags
    from orchestrator.record.tracking import find_study
    from orchestrator.study.driver import study_dir

    try:
        parent = find_study(study.tracking.uri, study.tracking.experiment, name)
    except LookupError as err:
        flag = "--resume" if args.resume else "--confirm-only"
        return f"study {name} has Ray results but no MLflow record ({err}); {flag} continues it from its Ray state"
    status, run = parent.info.status, parent.info.run_id
    confirmed = (Path(study_dir(study, name)) / "confirm").exists()
    wants_confirmation = study.confirm is not None and not args.no_confirm
    if status == "FINISHED" and (confirmed or not wants_confirmation):
        verdict = parent.data.tags.get(tags.VERDICT) or "see its study/verdict.txt"
        return (f"study {name} is finished (MLflow parent run {run}: {verdict}); --resume would train nothing, only "
                "read its finished trials back and write the same record again; start a new study (without "
                "--resume and --name) to run it again")
    if status == "FINISHED":
        return (f"study {name} finished its search without a confirmation (MLflow parent run {run}); --resume or "
                "--confirm-only runs the confirmation on the test split")
    return (f"study {name} was interrupted (MLflow parent run {run} is {status}); --resume continues it where it "
            "stopped: unfinished trials from their last checkpoints, in their own runs")


def dry_run(args, study: StudyFile, name: str, ready: dict) -> int:
    print(settings_text(study), end="")
    for arm, found in ready.items():
        print(f"# {arm} arm: {found.describe()}")
    print(f"# attacks: {study.experiment.attacks_text()}" + (
        f"; confirmation {', '.join(a.resolve(study.experiment.attack).label for a in study.confirm.attacks)}"
        if study.confirm is not None and study.confirm.attacks else ""))
    for note in study.threat_model_notes():
        print(f"# note: {note}")
    for line in study.design_lines():
        print(f"# {line}")
    arms = "; ".join(arm.describe() for arm in study.arm_list())
    confirm = "no confirmation" if study.confirm is None or args.no_confirm else (
        f"confirmation on seeds {study.confirm_seeds()}, up to {study.confirm.max_seeds} seeds until decided")
    print(f"# dry run: config {args.config} is valid; study {name}: {arms}; {confirm}")
    if args.resume or args.confirm_only:
        print(f"# {progress(args, study, name)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
