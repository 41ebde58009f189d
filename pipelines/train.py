"""Train one experiment without Ray Tune, tracked in MLflow with the same artifacts as a study trial.

    python -m pipelines.train --config configs/experiment/quick.yaml
    python -m pipelines.train --config configs/experiment/quick.yaml --set sns.lam=0.3 --set train.epochs=2
    python -m pipelines.train --config configs/experiment/quick.yaml --dry-run | --smoke-test

Each epoch logs metrics and sensitivity/epoch_NNN.parquet to a (parent-less) MLflow run and saves
runs/<name>/checkpoint.pt (rerunning the same command resumes from it; --fresh starts over). At the
end it evaluates on the test split (eval/robust_accuracy.parquet, a per-layer sensitivity PNG) and
prints the evaluation and the most sensitive neurons of each layer.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from orchestrator.config import load_experiment, settings_text, smoke_experiment
from orchestrator.tracking import default_tracking_uri
from pipelines._common import Timer, add_common_flags, parse_set, run_cli, setup_logging

log = logging.getLogger("pipelines.train")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipelines.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="experiment YAML (e.g. configs/experiment/quick.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="PATH=VALUE",
                        help="override a field, e.g. --set sns.lam=0.3 (repeatable; values read as YAML)")
    parser.add_argument("--name", help="run name (default: the experiment's name)")
    parser.add_argument("--runs-dir", default="runs", help="where runs/<name>/checkpoint.pt goes (default: ./runs)")
    parser.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint and start over")
    parser.add_argument("--experiment-name", default="nslab", help="MLflow experiment (default: nslab)")
    add_common_flags(parser)
    return parser


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    experiment = load_experiment(args.config, parse_set(args.set))
    if args.smoke_test:
        experiment = smoke_experiment(experiment)
    name = args.name or experiment.name + ("-smoke" if args.smoke_test else "")
    checkpoint = (Path(args.runs_dir) / name / "checkpoint.pt").resolve()
    uri = args.tracking_uri or default_tracking_uri()
    if args.dry_run:
        print(settings_text(experiment), end="")
        print(f"# dry run: valid; checkpoint {checkpoint}; MLflow {uri} (experiment {args.experiment_name})")
        return 0

    from ns_core.experiment import build_trainer, load_data
    from ns_core.objectives import TrainingCollapsed
    from ns_core.training import TrainingDiverged
    from orchestrator.artifacts import RunLogger
    from orchestrator.tracking import Tracker, config_hash, git_commit

    spec = experiment.to_spec()
    tracker = Tracker(uri, args.experiment_name)
    config = experiment.model_dump(mode="json")
    run_id = tracker.start_run(name, params=config, tags={
        "nslab.kind": "train", "git_commit": git_commit(), "config_hash": config_hash(config),
        "checkpoint": str(checkpoint), "nslab.config_path": str(Path(args.config).resolve())})
    logger = RunLogger(tracker, run_id)
    timer = Timer()

    def on_epoch(metrics: dict, trainer) -> None:
        logger.log_epoch(metrics, trainer)
        trainer.save_checkpoint(checkpoint)
        log.info("epoch %d/%d: clean %.3f  robust %.3f  loss %.4f  (%.1f s)", metrics["epoch"], spec.train.epochs,
                 metrics["clean_acc"], metrics["robust_acc"], metrics["train_loss"], metrics["epoch_seconds"])

    data = load_data(spec)
    trainer = build_trainer(spec, callbacks=[on_epoch], data=data)
    trainer.metadata["mlflow_run_id"] = run_id
    if checkpoint.exists() and not args.fresh:
        trainer.load_checkpoint(checkpoint)
        log.info("resumed from %s after epoch %d (--fresh starts over)", checkpoint, trainer.epoch)
    try:
        trainer.fit()
    except (TrainingDiverged, TrainingCollapsed) as err:
        tracker.set_tags(run_id, {"failure_reason": f"{type(err).__name__}: {err}"})
        tracker.end_run(run_id, "FAILED")
        print(f"error: {type(err).__name__}: {err} (MLflow run {run_id})", file=sys.stderr)
        return 1
    except BaseException as err:
        tracker.set_tags(run_id, {"error": f"{type(err).__name__}: {err}"})
        tracker.end_run(run_id, "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        raise
    trainer.save_checkpoint(checkpoint)
    report, final = logger.log_final(trainer, data, spec)
    tracker.end_run(run_id, "FINISHED")

    print(f"\n{name}: {spec.method} on {spec.dataset}/{spec.model}, {trainer.epoch} epochs in {timer.seconds:.0f} s")
    print(f"\nfinal evaluation on the test split ({report.rows[0]['n']} examples):")
    print(report.summary())
    if trainer.last_sensitivity is not None:
        print("\nmost sensitive neurons per layer (validation pairs, last epoch):")
        print(trainer.last_sensitivity.summary())
    print(f"\ncheckpoint {checkpoint}")
    print(f"MLflow run {run_id}; open the UI:  {tracker.ui_command()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
