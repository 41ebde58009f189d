"""Run a hyperparameter study of (SNS) adversarial training: Ray Tune trials, Optuna search, MLflow records.

    python -m pipelines.study --config configs/study/quick.yaml [--name NAME] [--resume]
    python -m pipelines.study --config configs/study/quick.yaml --dry-run       # validate and print settings
    python -m pipelines.study --config configs/study/tiny.yaml --smoke-test     # two tiny trials

The same line works behind `ray job submit --address http://HEAD:8265 --working-dir . -- ...`: with
RAY_ADDRESS set (or --address) it joins that cluster, else it starts a local Ray on 127.0.0.1 with
every core and shuts it down at the end. It prints one line per finished trial, then the trial table,
the Pareto front and the command that opens the MLflow UI. Ctrl+C stops it cleanly (exit 130);
`--resume` continues it to its full trial budget.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

from orchestrator.config import load_study, resolve_locations, settings_text, smoke_study
from pipelines._common import EXIT_INTERRUPTED, add_common_flags, run_cli, setup_logging


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipelines.study", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="study YAML (e.g. configs/study/quick.yaml)")
    parser.add_argument("--name", help="study name: Ray experiment directory and MLflow parent run "
                                       "(default: <study.name>-<date>-<time>; with --resume: the latest one)")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted study (Tune restore; same MLflow runs) to its full budget")
    parser.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS, else a local Ray)")
    parser.add_argument("--storage", metavar="PATH", help="Ray results directory (overrides storage.ray)")
    parser.add_argument("--trials", type=int, metavar="N", help="override study.trials")
    parser.add_argument("--keep-gpu", action="store_true",
                        help="keep the GPU request even if no GPU is in the cluster yet (autoscaling GPU workers)")
    add_common_flags(parser)
    return parser


def study_name(base: str, storage: str, resume: bool) -> str:
    """<base>-<date>-<time> for a new study; for --resume the newest existing <base>-* directory."""
    if not resume:
        return f"{base}-{time.strftime('%Y%m%d-%H%M%S')}"
    found = sorted(Path(storage).glob(f"{base}-*")) if "://" not in storage else []
    if not found:
        raise FileNotFoundError(f"no study named {base}-* under {storage} to resume; pass --name")
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
        print(f"# dry run: config {args.config} is valid; {study.study.trials} trials would run")
        return 0
    name = args.name or study_name(study.study.name, study.storage.ray, args.resume)
    if not (args.address or os.environ.get("RAY_ADDRESS")):
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # local Ray on 127.0.0.1 (DESIGN.md)
    import ray

    from orchestrator.study import init_ray, run_study  # imports Ray Tune: after the env above

    started = init_ray(args.address)
    try:
        outcome = run_study(study, name, resume=args.resume, keep_gpu=args.keep_gpu, config_path=args.config)
    finally:
        if started:
            ray.shutdown()
    print_outcome(outcome, study)
    if outcome.interrupted:
        print(f"\ninterrupted; continue with:\n  python -m pipelines.study --config {args.config} "
              f"--name {outcome.name} --resume")
        return EXIT_INTERRUPTED
    return 0


def print_outcome(outcome, study) -> None:
    params = [f"param.{p}" for p in study.search_space]
    metrics = [m for m, _ in outcome.objectives]
    header = ["#", "trial", "status", *[p.removeprefix("param.") for p in params], *metrics,
              "test_worst", "best_ep", "wall_s", "train_s"]

    def cells(row):
        values = [row["number"], row["trial_id"], row["status"], *[row.get(p) for p in params],
                  *[row.get(m) for m in metrics], row.get("test_worst_case_acc"), row.get("best_epoch"),
                  row.get("wall_seconds"), row.get("train_seconds")]
        return [_fmt(v) for v in values]

    def table(rows):
        lines = [header] + [cells(r) for r in rows]
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)) for line in lines)

    print(f"\nstudy {outcome.name}: {len(outcome.rows)} trials in {outcome.seconds:.0f} s")
    print(table(outcome.rows))
    for row in outcome.rows:
        if row["failure_reason"]:
            print(f"  trial {row['number']} ({row['trial_id']}): {row['failure_reason']}")
    front = [r for r, on in zip(outcome.rows, outcome.pareto, strict=True) if on]
    print(f"\nPareto front ({', '.join(f'{m} {mode}' for m, mode in outcome.objectives)}; "
          f"completed trials only): {len(front)} trial(s)")
    if front:
        print(table(front))
    if outcome.importances is not None and outcome.importances.num_rows:
        print("\nparameter importances (fANOVA): " + ", ".join(
            f"{r['param']}->{r['objective']} {r['importance']:.2f}" for r in outcome.importances.to_pylist()))
    print(f"\nMLflow parent run {outcome.parent_run_id}; Ray results {outcome.experiment_path}")
    print(f"open the MLflow UI:  {outcome.ui_command}")


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
