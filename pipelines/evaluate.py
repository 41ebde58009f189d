"""Evaluate a checkpoint against an attack suite on its test split; results as Parquet in MLflow.

    python -m pipelines.evaluate --checkpoint runs/quick/checkpoint.pt --attacks fgsm:0.3 pgd:0.3:20 pgd:2.0:20:l2
    python -m pipelines.evaluate --checkpoint runs/quick/checkpoint.pt --config configs/experiment/quick.yaml
    python -m pipelines.evaluate --smoke-test          # trains a throwaway model first when no --checkpoint

An attack is NAME:EPS[:STEPS[:NORM[:RESTARTS]]] (EPS may be a fraction such as 8/255; STEPS 0 = the
attack's default). Without --attacks the suite comes from --config's `eval` block, else from the
checkpoint's own experiment. The data set (and its test split) is the one the checkpoint was trained
on. Prints the accuracy table and the sanity checks; --out DIR also writes robust_accuracy.parquet there.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from dataclasses import replace
from pathlib import Path

from pipelines._common import Timer, add_common_flags, run_cli, setup_logging

log = logging.getLogger("pipelines.evaluate")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipelines.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="a Trainer checkpoint (.pt), e.g. runs/quick/checkpoint.pt")
    parser.add_argument("--attacks", nargs="+", metavar="NAME:EPS[:STEPS[:NORM[:RESTARTS]]]",
                        help="the attack suite, e.g. fgsm:0.3 pgd:0.3:20 pgd:8/255:10:linf:2")
    parser.add_argument("--config", help="experiment YAML whose `eval` block gives the attacks and examples")
    parser.add_argument("--examples", type=int, metavar="N", help="evaluate the first N test examples only")
    parser.add_argument("--device", default="auto", help="auto (CUDA when visible), cpu, cuda, cuda:1 ...")
    parser.add_argument("--seed", type=int, default=0, help="attack randomness (random starts)")
    parser.add_argument("--out", metavar="DIR", help="also write robust_accuracy.parquet into DIR")
    parser.add_argument("--experiment-name", default="nslab", help="MLflow experiment (default: nslab)")
    add_common_flags(parser)
    return parser


def parse_attack(text: str):
    """'pgd:0.3:20' -> AttackSpec('pgd', 0.3, steps=20); a bad field is a ValueError saying the format."""
    from ns_core.evaluation import AttackSpec

    parts = text.split(":")
    if not 2 <= len(parts) <= 5:
        raise ValueError(f"attack {text!r}: write NAME:EPS[:STEPS[:NORM[:RESTARTS]]], e.g. pgd:0.3:20")
    try:
        num, _, den = parts[1].partition("/")
        eps = float(num) / float(den or 1)
        steps = int(parts[2]) if len(parts) > 2 else 0
        restarts = int(parts[4]) if len(parts) > 4 else 1
    except ValueError:
        raise ValueError(f"attack {text!r}: EPS must be a number (or a fraction like 8/255), STEPS and "
                         "RESTARTS whole numbers") from None
    return AttackSpec(parts[0], eps, norm=parts[3] if len(parts) > 3 else "linf", steps=steps, restarts=restarts)


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    attacks = [parse_attack(a) for a in args.attacks or []]
    examples = args.examples
    if args.config:
        from orchestrator.config import load_experiment

        experiment = load_experiment(args.config).to_spec()
        attacks = attacks or experiment.eval_attacks
        examples = examples or experiment.eval_examples
    if args.smoke_test:  # at most two attacks of at most 3 steps on 64 examples
        attacks = [replace(a, steps=min(a.steps, 3)) for a in attacks[:2]] or [parse_attack("fgsm:0.3"),
                                                                               parse_attack("pgd:0.3:3")]
        examples = min(examples or 64, 64)
    if not args.checkpoint and not args.smoke_test:
        raise ValueError("pass --checkpoint PATH (a .pt file that pipelines.train or a study trial saved)")
    if args.checkpoint and not Path(args.checkpoint).is_file():
        raise FileNotFoundError(f"checkpoint {args.checkpoint} does not exist")
    uri = args.tracking_uri
    if args.dry_run:
        print(f"checkpoint: {args.checkpoint or '(smoke test: a throwaway model)'}")
        print("attacks: " + (", ".join(a.label for a in attacks) or "(from the checkpoint's experiment)"))
        print(f"examples: {examples or 'all'}; device: {args.device}; MLflow: {uri or 'sqlite:///<cwd>/mlflow.db'}")
        print("# dry run: valid")
        return 0

    with tempfile.TemporaryDirectory(prefix="nslab-eval-") as scratch:
        checkpoint = Path(args.checkpoint) if args.checkpoint else _throwaway_checkpoint(Path(scratch))
        return _evaluate(args, checkpoint.resolve(), attacks, examples)


def _evaluate(args, checkpoint: Path, attacks: list, examples: int | None) -> int:
    from ns_core.data import make_loader
    from ns_core.evaluation import default_suite, evaluate_robustness
    from ns_core.experiment import ExperimentSpec, load_data, load_model
    from orchestrator.artifacts import final_metrics, write_table
    from orchestrator.tracking import Tracker, default_tracking_uri, git_commit

    timer = Timer()
    model, meta = load_model(checkpoint, args.device)
    spec = ExperimentSpec.from_dict(meta["spec"])
    if not attacks:
        attacks = spec.eval_attacks or default_suite(float(spec.method_params.get("eps", 0.3)))
    data = load_data(spec)
    loader = make_loader(data.test, batch_size=256, shuffle=False)
    device = next(model.parameters()).device
    report = evaluate_robustness(model, loader, attacks, device, seed=args.seed, max_examples=examples)
    table = report.to_arrow()

    tracker = Tracker(args.tracking_uri or default_tracking_uri(), args.experiment_name)
    run_id = tracker.start_run(f"evaluate-{checkpoint.parent.name}", params={
        "checkpoint": str(checkpoint), "attacks": [a.label for a in attacks], "examples": examples or "all",
        "seed": args.seed, "dataset": spec.dataset, "model": spec.model}, tags={
        "nslab.kind": "evaluate", "checkpoint": str(checkpoint), "git_commit": git_commit(),
        "source_run_id": meta.get("mlflow_run_id", ""), "sanity_passed": report.sanity_passed})
    tracker.log_table(run_id, table, "eval/robust_accuracy.parquet")
    tracker.log_metrics(run_id, final_metrics(report))
    tracker.end_run(run_id, "FINISHED")
    if args.out:
        print(f"wrote {write_table(table, Path(args.out) / 'robust_accuracy.parquet')}")

    print(f"\n{checkpoint}: {spec.model} ({spec.method}) on {spec.dataset}, {report.rows[0]['n']} test examples, "
          f"{device}, {timer.seconds:.0f} s")
    print(report.summary())
    print(f"\nMLflow run {run_id}; open the UI:  {tracker.ui_command()}")
    return 0 if report.sanity_passed else 1


def _throwaway_checkpoint(directory: Path) -> Path:
    """--smoke-test without --checkpoint: one epoch of standard training on 256 digits."""
    from ns_core.experiment import ExperimentSpec, build_trainer
    from ns_core.training import TrainConfig

    spec = ExperimentSpec(dataset="mnist5k", model="lenet5", method="standard", train_limit=256, test_limit=128,
                          train=TrainConfig(epochs=1, batch_size=64, optimizer="adam", lr=2e-3, val_size=64,
                                            val_steps=2, probe_size=64, progress=False))
    trainer = build_trainer(spec)
    trainer.fit()
    log.info("smoke test: trained a throwaway model")
    return trainer.save_checkpoint(directory / "checkpoint.pt")


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
