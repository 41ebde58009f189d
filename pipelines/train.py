"""Train one experiment without Ray Tune, tracked in MLflow with the same artifacts as a study trial.

    python -m pipelines.train --config configs/experiment/quick.yaml
    python -m pipelines.train --config configs/experiment/quick.yaml --set sns.lam=0.3 --set train.epochs=2
    python -m pipelines.train --config configs/experiment/quick.yaml --dry-run | --smoke-test

Each epoch logs its validation metrics and sensitivity/epoch_NNN.parquet to a (parent-less) MLflow run and
saves runs/<name>/checkpoint.pt (rerunning the same command resumes from it, in the same MLflow run;
--fresh starts over). At the end it evaluates on the test split with the final attack suite
(eval/robust_accuracy.parquet, eval/checks.parquet, a per-layer sensitivity PNG) and prints the evaluation,
the gradient-masking checks and the most sensitive neurons of each layer.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from orchestrator.config.experiment import ExperimentConfig, smoke_experiment
from orchestrator.config.loader import load_config, parse_set, settings_text
from orchestrator.record import tags
from pipelines._common import (
    Parser,
    Timer,
    add_common_flags,
    add_download_flag,
    check_tracking_location,
    prog,
    run_cli,
    setup_logging,
    writable_dir,
)

log = logging.getLogger("pipelines.train")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser("train", description=__doc__)
    parser.add_argument("--config", required=True, help="experiment YAML (e.g. configs/experiment/quick.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="PATH=VALUE",
                        help="override a field, e.g. --set sns.lam=0.3 (repeatable; values read as YAML)")
    parser.add_argument("--name", help="run name (default: the experiment's name)")
    parser.add_argument("--runs-dir", default="runs", help="where runs/<name>/checkpoint.pt goes (default: ./runs)")
    parser.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint and start over")
    parser.add_argument("--experiment-name", default="nslab", help="MLflow experiment (default: nslab)")
    add_download_flag(parser)
    add_common_flags(parser)
    return parser


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    overrides, origins = parse_set(args.set), {}
    if args.download:
        overrides["data.download"], origins["data.download"] = True, "--download"
    experiment = load_config(args.config, ExperimentConfig, overrides, origins)
    if args.smoke_test:
        experiment = smoke_experiment(experiment)
    name = args.name or experiment.name + ("-smoke" if args.smoke_test else "")
    from orchestrator.record.tracking import resolve_tracking_uri
    from orchestrator.run import preflight

    uri = resolve_tracking_uri(args.tracking_uri)
    checkpoint = Path(args.runs_dir).expanduser().resolve() / name / "checkpoint.pt"
    from ns_core.checkpoint import checkpoint_summary, load_checkpoint

    state = None if args.fresh or not checkpoint.exists() else load_checkpoint(checkpoint, fallback=True)
    if state is not None and not same_training(state["metadata"].get("config"), experiment.model_dump(mode="json")):
        raise ValueError(f"{checkpoint} was trained with another config; pass --fresh to start over or --name NEW "
                         "for a separate run")
    ready = preflight(experiment)  # data files, the model on a dummy batch, its layers: one line, before any run
    if args.dry_run:
        print(settings_text(experiment), end="")
        print(f"# {ready.describe()}")
        print(f"# attacks: {experiment.attacks_text()}")
        for note in experiment.threat_model_notes():
            print(f"# note: {note}")
        print(f"# checkpoint {checkpoint}: " + (checkpoint_summary(state) + " (resumes)" if state else "none yet"))
        print(f"# dry run: valid; MLflow {uri} (experiment {args.experiment_name})")
        return 0
    if ready.proposed:
        log.info("layers %s proposed by nslab (set sns.layers to choose)", ready.layers)
    for note in experiment.threat_model_notes():
        print(f"note: {note}", flush=True)
    if state is not None and state["epoch"] >= experiment.train.epochs:
        print(f"{checkpoint} has finished training ({checkpoint_summary(state)}); evaluate it with "
              f"{prog('evaluate')} --checkpoint {checkpoint}, or pass --fresh to train again")
        return 0
    writable_dir(checkpoint.parent, "checkpoint folder")
    check_tracking_location(uri)

    from ns_core.objectives import TrainingCollapsed
    from ns_core.training import TrainingDiverged
    from orchestrator.record.tracking import Tracker, config_hash, git_commit
    from orchestrator.run import run_experiment

    tracker = Tracker(uri, args.experiment_name)
    config = experiment.model_dump(mode="json")
    run_id = state["metadata"].get("mlflow_run_id") if state else None
    if run_id and tracker.run_exists(run_id):
        tracker.reopen(run_id)
        log.info("resuming %s after epoch %d in MLflow run %s (--fresh starts over)", checkpoint, state["epoch"],
                 run_id)
    else:
        run_id = tracker.start_run(name, tags={
            tags.KIND: tags.Kind.TRAIN, tags.GIT_COMMIT: git_commit(), tags.CONFIG_HASH: config_hash(config),
            tags.CHECKPOINT: str(checkpoint), tags.CONFIG_PATH: str(Path(args.config).resolve())})
    timer = Timer()

    def on_epoch(metrics: dict, trainer, final: bool) -> None:
        trainer.metadata["mlflow_run_id"] = run_id
        trainer.save_checkpoint(checkpoint)
        log.info("epoch %d/%d: val clean %.3f  val robust %.3f  loss %.4f  (%.1f s)", metrics["epoch"],
                 experiment.train.epochs, metrics["val/clean_acc"], metrics["val/robust_acc"],
                 metrics["train/loss"], metrics["time/epoch_seconds"])

    try:
        result = run_experiment(experiment, tracker, run_id, state=state, on_epoch=on_epoch)
    except (TrainingDiverged, TrainingCollapsed) as err:  # recorded FAILED in MLflow by the run path
        print(f"error: {type(err).__name__}: {err} (MLflow run {run_id})", file=sys.stderr)
        return 1
    trainer, report = result.trainer, result.report
    print(f"\n{name}: {experiment.method} on {experiment.dataset}/{experiment.model}, {trainer.epoch} epochs, "
          f"{timer.seconds:.0f} s")
    if report is not None:
        print(f"\nfinal evaluation on the test split ({report.rows[0]['n']} examples):")
        print(report.summary())
    if trainer.last_sensitivity is not None:
        print("\nmost sensitive neurons per layer (validation pairs, last epoch):")
        print(trainer.last_sensitivity.summary())
    print(f"\ncheckpoint {checkpoint}")
    print(f"MLflow run {run_id}; open the UI:  {tracker.ui_command()}")
    return 0


def same_training(saved: dict | None, asked: dict) -> bool:
    """Whether a checkpoint's config trains what the command asks for (where the data may be fetched from,
    `data.download`, changes nothing it computes)."""
    def computed(config: dict | None) -> dict | None:
        return None if config is None else {**config, "data": {**config.get("data", {}), "download": False}}

    return computed(saved) == computed(asked)


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
