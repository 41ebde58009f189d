"""Run a hyperparameter study of (SNS) adversarial training: a baseline, Ray Tune trials searched by Optuna,
a confirmation of the best configurations on fresh seeds, all recorded in MLflow.

    python -m pipelines.study --config configs/study/quick.yaml [--name NAME] [--resume]
    python -m pipelines.study --config configs/study/quick.yaml --dry-run       # validate and print settings
    python -m pipelines.study --config configs/study/tiny.yaml --smoke-test     # a few tiny trials
    python -m pipelines.study --config configs/study/quick.yaml --name quick-... --confirm-only

The search chooses on the validation split; only the confirmation reads the test split. The same line
works behind `ray job submit --address http://HEAD:8265 --working-dir . -- ...`: with RAY_ADDRESS set (or
--address) it joins that cluster, else it starts a local Ray on 127.0.0.1 with every core and shuts it
down at the end. It prints one line per finished trial, then the trial table (the baseline first), the
Pareto front, the confirmation table, the command that opens the MLflow UI and, last, the verdict. Ctrl+C
stops it cleanly (exit 130); `--resume` continues it to its full budget.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from orchestrator.config import settings_text
from orchestrator.study_config import load_study, resolve_locations, smoke_study
from pipelines._common import (
    EXIT_INTERRUPTED,
    Parser,
    add_common_flags,
    check_tracking_location,
    positive_int,
    run_cli,
    setup_logging,
    writable_dir,
)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m pipelines.study", description=__doc__)
    parser.add_argument("--config", required=True, help="study YAML (e.g. configs/study/quick.yaml)")
    parser.add_argument("--name", help="study name: Ray experiment directory and MLflow parent run "
                                       "(default: <study.name>-<date>-<time>; with --resume: the latest one)")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted study (Tune restore; same MLflow runs) to its full budget")
    confirm = parser.add_mutually_exclusive_group()
    confirm.add_argument("--no-confirm", action="store_true", help="stop after the search (no test-split stage)")
    confirm.add_argument("--confirm-only", action="store_true",
                         help="run (or finish) only the confirmation of a finished study (needs --name or the latest)")
    parser.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS, else a local Ray)")
    parser.add_argument("--storage", metavar="PATH", help="Ray results directory (overrides storage.ray)")
    parser.add_argument("--trials", type=positive_int, metavar="N", help="override study.trials")
    parser.add_argument("--keep-gpu", action="store_true",
                        help="keep the GPU request even if no GPU is in the cluster yet (autoscaling GPU workers)")
    add_common_flags(parser)
    return parser


def study_name(base: str, storage: str, latest: bool) -> str:
    """<base>-<date>-<time> for a new study; the newest existing <base>-* directory to resume or confirm."""
    if not latest:
        return f"{base}-{time.strftime('%Y%m%d-%H%M%S')}"
    found = sorted(Path(storage).glob(f"{base}-*")) if "://" not in storage else []
    if not found:
        raise FileNotFoundError(f"no study named {base}-* under {storage} to continue; pass --name")
    return max(found, key=lambda p: p.stat().st_mtime).name


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    study = load_study(args.config)
    if args.tracking_uri:
        study.tracking.uri = args.tracking_uri
    if args.storage:
        study.storage.ray = args.storage
    if args.trials:
        if args.resume:
            raise ValueError("--trials cannot change the budget of a resumed study (Tune keeps the original)")
        study.study.trials = args.trials
    if args.smoke_test:
        study = smoke_study(study)
    study = resolve_locations(study)
    if args.dry_run:
        print(settings_text(study), end="")
        confirm = "no confirmation" if study.confirm is None or args.no_confirm else (
            f"confirmation on seeds {study.confirm_seeds()}")
        print(f"# dry run: config {args.config} is valid; {study.study.trials} search trials"
              f"{' + the baseline (' + study.baseline_method() + ')' if study.baseline else ''}; {confirm}")
        return 0
    # everything that can be wrong with the locations and the data is one line, before Ray starts
    if "://" not in study.storage.ray:
        writable_dir(study.storage.ray, "Ray results folder (storage.ray)")
    check_tracking_location(study.tracking.uri)
    from orchestrator.run import load_data

    load_data(study.experiment)
    name = args.name or study_name(study.study.name, study.storage.ray, args.resume or args.confirm_only)

    from orchestrator.ray_runtime import ray_session
    from orchestrator.study import run_study  # imports Ray Tune: after ray_session set the environment

    try:
        with ray_session(args.address):
            outcome = run_study(study, name, resume=args.resume, keep_gpu=args.keep_gpu, config_path=args.config,
                                confirm=not args.no_confirm, confirm_only=args.confirm_only)
    except KeyboardInterrupt:
        print(f"\ninterrupted; the study's state is saved. Continue with:\n  python -m pipelines.study --config "
              f"{args.config} --name {name} --resume", flush=True)
        return EXIT_INTERRUPTED
    print_outcome(outcome, study)
    return 0


def print_outcome(outcome, study) -> None:
    params = [f"param.{p}" for p in study.search_space]
    metrics = [m for m, _ in outcome.objectives]
    header = ["#", "role", "status", *[p.removeprefix("param.sns.").removeprefix("param.") for p in params],
              *[m.removeprefix("val/") for m in metrics], "epochs", "forked", "best_ep", "wall_s", "train_s"]

    def cells(row):
        values = [row["number"], row["role"], row["status"], *[row.get(p) for p in params],
                  *[row.get(m) for m in metrics], row.get("epochs"), row.get("forked_at"), row.get("best_epoch"),
                  row.get("wall_seconds"), row.get("train_seconds")]
        return [_fmt(v) for v in values]

    def table(rows):
        lines = [header] + [cells(r) for r in rows]
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)) for line in lines)

    rows = sorted(outcome.rows, key=lambda r: (r["role"] != "baseline", r["number"]))
    print(f"\nstudy {outcome.name}: {len(outcome.rows)} trials, {outcome.seconds:.0f} s in all; validation "
          f"metrics ({', '.join(metrics)}); {outcome.epochs_trained} epochs trained "
          f"({outcome.epochs_unshared} without the shared warm-up)")
    print(table(rows))
    for row in rows:
        if row["failure_reason"]:
            print(f"  trial {row['number']} ({row['trial_id']}): {row['failure_reason']}")
    front = [r for r, on in zip(outcome.rows, outcome.pareto, strict=True) if on]
    print(f"\nPareto front ({', '.join(f'{m} {mode}' for m, mode in outcome.objectives)}; completed search "
          f"trials): {len(front)} trial(s)")
    if front:
        print(table(front))
    if outcome.importances is not None and outcome.importances.num_rows:
        print("\nparameter importances (fANOVA): " + ", ".join(
            f"{r['param']}->{r['objective']} {r['importance']:.2f}" for r in outcome.importances.to_pylist()))
    if outcome.confirmation is not None:
        print(f"\nconfirmation on the test split, seeds {outcome.confirmation.seeds} "
              f"(Δ = configuration − {study.baseline_method() or 'baseline'}, same seed, points):")
        print(outcome.confirmation.text().split("\nverdict:")[0])
    print(f"\nMLflow parent run {outcome.parent_run_id}; Ray results {outcome.experiment_path}")
    print(f"open the MLflow UI:  {outcome.ui_command}")
    if outcome.confirmation is not None:
        print("\nverdict (test split, paired by seed):")
        for comparison in outcome.confirmation.comparisons:
            print(f"  {comparison.verdict()}")


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
