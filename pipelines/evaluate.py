"""Evaluate a checkpoint against an attack suite on its test split; results as Parquet in MLflow.

    python -m pipelines.evaluate --checkpoint runs/quick/checkpoint.pt --attacks fgsm:0.2 pgd:0.2:20 autoattack:0.2
    python -m pipelines.evaluate --checkpoint runs/quick/checkpoint.pt --attacks pgd:2.0:20:l2 --examples 500
    python -m pipelines.evaluate --smoke-test          # trains a throwaway model first when no --checkpoint

An attack is NAME:EPS[:STEPS[:NORM[:RESTARTS]]] (EPS may be a fraction such as 8/255; inputs are in [0, 1]).
Names: fgsm, fgsm_rs, pgd, mim, cw_linf, feature_pgd (the adaptive attack on the watched neurons), and
AutoAttack's autoattack (standard: apgd_ce, apgd_t, fab_t, square) or any single stage. Without
--attacks the suite is --config's `eval` block, else the checkpoint's own final suite. The attacks
cascade: each runs only on the examples still standing (--no-cascade: every attack on every example).
Prints per-attack and worst-case accuracy with seconds and the gradient-masking checks (ok / FLAG);
writes eval/robust_accuracy.parquet and eval/checks.parquet to MLflow (and --out DIR).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

from pipelines._common import (
    Parser,
    Timer,
    add_common_flags,
    add_download_flag,
    check_tracking_location,
    positive_int,
    run_cli,
    setup_logging,
)

log = logging.getLogger("pipelines.evaluate")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser("evaluate", description=__doc__)
    parser.add_argument("--checkpoint", help="a training checkpoint (.pt), e.g. runs/quick/checkpoint.pt")
    parser.add_argument("--attacks", nargs="+", metavar="NAME:EPS[:STEPS[:NORM[:RESTARTS]]]",
                        help="the attack suite, e.g. fgsm:0.3 pgd:0.3:20 autoattack:0.3 pgd:8/255:10:linf:2")
    parser.add_argument("--config", help="experiment YAML whose `eval` block gives the attacks and examples")
    parser.add_argument("--examples", type=positive_int, metavar="N", help="evaluate the first N test examples only")
    parser.add_argument("--no-cascade", action="store_true",
                        help="run every attack on every clean-correct example (each attack's own accuracy)")
    parser.add_argument("--data-root", help="where the dataset's files are (default: the checkpoint's)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when visible), cpu, cuda, cuda:1 ...")
    parser.add_argument("--seed", type=int, default=0, help="attack randomness (random starts)")
    parser.add_argument("--out", metavar="DIR", help="also write robust_accuracy.parquet and checks.parquet into DIR")
    parser.add_argument("--experiment-name", default="nslab", help="MLflow experiment (default: nslab)")
    add_download_flag(parser)
    add_common_flags(parser)
    return parser


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    from ns_core.attacks import Attack

    attacks = [Attack.parse(a) for a in args.attacks or []]
    examples = args.examples
    if args.config:
        from orchestrator.config.experiment import ExperimentConfig
        from orchestrator.config.loader import load_config

        experiment = load_config(args.config, ExperimentConfig)
        attacks = attacks or experiment.final_suite()
        examples = examples or experiment.eval.examples
    if args.smoke_test:  # at most two attacks of at most 3 steps on 64 examples
        attacks = [a.replace(steps=min(a.steps_used, 3)) if a.steps_used > 1 else a for a in attacks[:2]] or [
            Attack("fgsm", 0.2), Attack("pgd", 0.2, steps=3)]
        examples = min(examples or 64, 64)
    if not args.checkpoint and not args.smoke_test:
        raise ValueError("pass --checkpoint PATH (a .pt file that pipelines.train, a study trial or analyze saved)")
    if args.dry_run:
        from ns_core.checkpoint import checkpoint_summary, load_checkpoint

        summary = checkpoint_summary(load_checkpoint(args.checkpoint)) if args.checkpoint else "a throwaway smoke model"
        print(f"checkpoint: {args.checkpoint or '(smoke test)'}: {summary}")
        print("attacks: " + (", ".join(a.label for a in attacks) or "(the checkpoint's final suite)"))
        print(f"examples: {examples or 'all'}; cascade: {not args.no_cascade}; device: {args.device}")
        print("# dry run: valid")
        return 0
    with tempfile.TemporaryDirectory(prefix="nslab-eval-") as scratch:
        checkpoint = Path(args.checkpoint) if args.checkpoint else _throwaway_checkpoint(Path(scratch))
        return _evaluate(args, checkpoint.resolve(), attacks, examples)


def _evaluate(args, checkpoint: Path, attacks: list, examples: int | None) -> int:
    from ns_core.attacks import check_threat_model
    from ns_core.checkpoint import load_model
    from ns_core.evaluation import evaluate_robustness
    from orchestrator.config.experiment import ExperimentConfig
    from orchestrator.config.loader import apply_overrides, validate
    from orchestrator.record import tags
    from orchestrator.record.artifacts import write_table
    from orchestrator.record.tracking import Tracker, git_commit, resolve_tracking_uri
    from orchestrator.run import final_suite, load_data, record_failure, record_report

    timer = Timer()
    model, meta = load_model(checkpoint, args.device)
    experiment = validate(ExperimentConfig, meta["config"], source=str(checkpoint))
    if args.data_root or args.download:
        experiment = apply_overrides(experiment, {"data.root": args.data_root or experiment.data.root,
                                                  "data.download": args.download or experiment.data.download})
    data = load_data(experiment)
    if tuple(data.input_shape) != tuple(meta["input_shape"]):
        raise ValueError(f"{checkpoint} holds a model for inputs {tuple(meta['input_shape'])}, but "
                         f"{experiment.dataset} "
                         f"gives {tuple(data.input_shape)}; evaluate it on the data it was trained on")
    attacks = final_suite(experiment, model, attacks or None)
    for attack in attacks:  # a threat model that does not fit these inputs is one line, before any run starts
        check_threat_model(attack.norm, attack.eps, f"attack {attack.label}", data.input_shape)
    uri = resolve_tracking_uri(args.tracking_uri)
    check_tracking_location(uri)
    tracker = Tracker(uri, args.experiment_name)
    run_id = tracker.start_run(f"evaluate-{checkpoint.parent.name}", params={
        "checkpoint": str(checkpoint), "attacks": [a.label for a in attacks], "examples": examples or "all",
        "seed": args.seed, "dataset": experiment.dataset, "model": experiment.model, "cascade": not args.no_cascade},
        tags={tags.KIND: tags.Kind.EVALUATE, tags.CHECKPOINT: str(checkpoint), tags.GIT_COMMIT: git_commit(),
              tags.SOURCE_RUN: meta.get("mlflow_run_id", "")})
    try:
        report = evaluate_robustness(model, data.test, attacks, seed=args.seed, max_examples=examples,
                                     cascade=not args.no_cascade, num_classes=data.num_classes,
                                     check_examples=experiment.eval.check_examples)
        record_report(tracker, run_id, report, step=0)
        tracker.end_run(run_id, "FINISHED")
    except BaseException as err:
        record_failure(tracker, run_id, err)
        raise
    if args.out:
        write_table(report.to_arrow(), Path(args.out) / "robust_accuracy.parquet")
        print(f"wrote {write_table(report.checks_arrow(), Path(args.out) / 'checks.parquet').parent}/*.parquet")
    device = next(model.parameters()).device
    print(f"\n{checkpoint}: {experiment.model} ({experiment.method}) on {experiment.dataset}, {report.rows[0]['n']} "
          f"test examples, {device}, {timer.seconds:.0f} s")
    print(report.summary())
    print(f"\nMLflow run {run_id}; open the UI:  {tracker.ui_command()}")
    return 0


def _throwaway_checkpoint(directory: Path) -> Path:
    """--smoke-test without --checkpoint: one epoch of standard training on 256 digits."""
    from orchestrator.config.experiment import ExperimentConfig, smoke_experiment
    from orchestrator.config.loader import validate
    from orchestrator.run import build_trainer

    experiment = smoke_experiment(validate(ExperimentConfig, {
        "name": "smoke", "dataset": "mnist5k", "model": "lenet5", "method": "standard", "attack": {"name": "pgd",
        "eps": 0.2}, "train": {"epochs": 1, "batch_size": 64, "optimizer": "adam", "lr": 2e-3}}))
    trainer = build_trainer(experiment)
    trainer.fit()
    log.info("smoke test: trained a throwaway model")
    path = directory / "checkpoint.pt"
    trainer.save_checkpoint(path)
    return path


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
