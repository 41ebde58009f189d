"""The paper's interpretation experiments, one command per claim, each an MLflow report with plots.

    python -m pipelines.analyze methods --config configs/analysis/methods_quick.yaml       # claim 3
    python -m pipelines.analyze compare --checkpoints A.pt B.pt C.pt [--shared-source S.pt]  # claim 1
    python -m pipelines.analyze stabilize --checkpoint A.pt [B.pt] [--layer relu3] [--draws 5]  # claim 2
    python -m pipelines.analyze sensitivity --model torchvision.models:resnet18 --state-dict w.pt \\
        --dataset cifar10 --eps 8/255                                                  # any trained model
    python -m pipelines.analyze study --name quick-20260101-120000 --study-experiment nslab-quick

`methods` trains standard / PGD-AT / TRADES / SNS over several seeds as Ray Tune trials (resumable: run the
same command again), evaluates each on the test split with the final suite (AutoAttack), and prints the
paired comparison and the commands that run `compare` and `stabilize` on its checkpoints.
Each report is an MLflow parent
run (experiment "nslab-analysis") with one child per model or per seed holding its Parquet tables and
PNG plots; `--out DIR` writes the same files to DIR (`--tracking-uri none` skips MLflow). Every
subcommand has --dry-run (check the inputs, print the plan) and --smoke-test (a seconds-long budget).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

from analyses.compare import CompareOptions, compare_report
from analyses.loading import ADAPT_CHOICES, check_layers, load_checkpoints, same_data
from analyses.stabilize import StabilizeOptions, stabilize_report
from analyses.writer import ReportWriter
from orchestrator.config.analysis import load_methods_config
from orchestrator.record.tracking import Tracker, resolve_tracking_uri
from orchestrator.results import Status
from pipelines._common import (
    Parser,
    Timer,
    add_common_flags,
    add_download_flag,
    positive_int,
    prog,
    run_cli,
    setup_logging,
    writable_dir,
)

log = logging.getLogger("pipelines.analyze")
DEFAULT_EXPERIMENT = "nslab-analysis"
SMOKE_FRACTIONS = [0.1, 0.5, 1.0]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser("analyze", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True,
                                metavar="{methods,compare,stabilize,sensitivity,study}")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_common_flags(p)
        if name != "study":  # the study report reads MLflow, no dataset
            add_download_flag(p)
        p.add_argument("--out", metavar="DIR", help="also write the report's Parquet and PNG files under DIR")
        p.add_argument("--experiment", help=f"MLflow experiment of the report (default {DEFAULT_EXPERIMENT})")
        return p

    p = command("methods", "Claim 3: standard, PGD-AT, TRADES and SNS over several seeds, same budget and attacks.")
    p.add_argument("--config", default="configs/analysis/methods_quick.yaml", help="methods YAML")
    p.add_argument("--checkpoint-dir", help="where final models go (default: the config's checkpoint_dir)")
    p.add_argument("--storage", help="Ray Tune results (default: the config's storage, else ./ray_results)")
    p.add_argument("--address", help="Ray cluster to use (default: $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--keep-gpu", action="store_true", help="keep the GPU request on a cluster without GPUs yet")

    for name, text in (("compare", "Claim 1: neuron sensitivity per layer of several models on the same inputs."),
                       ("stabilize", "Claim 2: patch the top-k sensitive vs k random neurons with benign values.")):
        p = command(name, text)
        flag = "--checkpoints" if name == "compare" else "--checkpoint"
        p.add_argument(flag, dest="checkpoints", nargs="+", metavar="PT",
                       help="nslab checkpoints (.pt) of one dataset (--smoke-test trains two tiny ones if omitted)")
        p.add_argument("--labels", nargs="+", help="one name per checkpoint (default: the training method)")
        p.add_argument("--eps", type=eps_value,
                       help="PGD eps, e.g. 0.3 or 8/255 (default: each checkpoint's training eps)")
        p.add_argument("--steps", type=positive_int, default=10, help="PGD steps (default 10)")
        p.add_argument("--examples", type=positive_int, default=1000, help="test images (default 1000)")
        p.add_argument("--data-root", help="dataset directory (default: the checkpoint's, $NSLAB_DATA, ...)")
        p.add_argument("--device", default="auto", help="auto (CUDA when visible) | cpu | cuda")
        p.add_argument("--seed", type=int, default=0, help="seed of the attacks and random draws (default 0)")
    compare, stabilize = sub.choices["compare"], sub.choices["stabilize"]
    compare.add_argument("--shared-source", metavar="PT", help="also attack every model with this model's PGD")
    compare.add_argument("--layers", nargs="+", help="layer names (default: the model's default_layers)")
    compare.add_argument("--reference", help="label the verdict compares against (default: the first)")
    stabilize.add_argument("--layer", dest="layers", action="append",
                           help="layer to patch; repeat for several (default: every default layer)")
    stabilize.add_argument("--fractions", nargs="+", type=float, help="fractions of the layer's neurons "
                           "(default 0.05 0.1 0.2 0.3 0.5 0.75 1.0)")
    stabilize.add_argument("--draws", type=positive_int, default=5, help="random draws per fraction (default 5)")
    stabilize.add_argument("--probe", type=positive_int, default=1000, help="training images that rank the neurons")

    p = command("sensitivity", "Any trained model (an nslab checkpoint, or a factory + a plain state_dict): "
                               "per-layer neuron sensitivity, the most sensitive neurons, cascaded robust accuracy "
                               "with the gradient-masking checks.")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", help="an nslab checkpoint (.pt)")
    source.add_argument("--state-dict", metavar="PT", help="a plain state_dict file (torch.save(model.state_dict())), "
                                                            "read with weights_only=True; needs --model and --dataset")
    p.add_argument("--model", help="the state_dict's model: a registered name or an import path "
                                   "(mypkg.nets:build_net, torchvision.models:resnet18; docs/studies.md)")
    p.add_argument("--dataset", help="the data it was trained on (mnist5k, cifar10, ... or an import path)")
    p.add_argument("--eps", type=eps_value, help="the threat model's eps, e.g. 0.3 or 8/255 (default: a "
                                                 "checkpoint's training eps; a state_dict must name it)")
    p.add_argument("--steps", type=positive_int, default=10, help="PGD steps of the sensitivity pairs (default 10)")
    p.add_argument("--attacks", nargs="+", metavar="NAME:EPS[:STEPS[:NORM[:RESTARTS]]]",
                   help="the robust-accuracy suite, cascaded (default: fgsm, pgd-20 and apgd_ce at --eps)")
    p.add_argument("--layers", nargs="+", help="layer paths (default: the model's, else proposed by nslab)")
    p.add_argument("--top", type=positive_int, default=10, help="most sensitive neurons listed per layer (default 10)")
    p.add_argument("--examples", type=positive_int, default=1000, help="test images (default 1000)")
    p.add_argument("--data-root", help="dataset directory")
    p.add_argument("--device", default="auto", help="auto (CUDA when visible) | cpu | cuda")
    p.add_argument("--seed", type=int, default=0, help="seed of the attacks (default 0)")
    p.add_argument("--label", help="a name for the model in the report (default: the file's stem)")
    built = p.add_argument_group(
        "how --state-dict's model is built",
        "A factory that takes num_classes alone (torchvision's) is built as it is\n"
        "(its first convolution refitted only where the data's channel count differs); these flags add\n"
        "what its training had. A --checkpoint replays how nslab built it: they apply to --state-dict only.")
    built.add_argument("--adapt", dest="adapt", action="append_const", const="all", help=ADAPT_CHOICES["all"])
    built.add_argument("--normalize", dest="adapt", action="append_const", const="normalize",
                       help=ADAPT_CHOICES["normalize"])
    built.add_argument("--cifar-stem", dest="adapt", action="append_const", const="cifar_stem",
                       help=ADAPT_CHOICES["cifar_stem"])

    p = command("study", "A finished study: robust accuracy vs sensitivity, best/worst maps, Pareto front.")
    p.add_argument("--name", help="study name (MLflow parent run / tag nslab.study); a prefix such as 'quick' "
                                  "picks the newest matching study (default: the --config's study.name)")
    p.add_argument("--config", help="the study's YAML: its study.name and tracking.experiment are the defaults")
    p.add_argument("--study-experiment", help="MLflow experiment holding the study (default: the --config's "
                                              "tracking.experiment, else 'nslab')")
    return parser


def eps_value(text: str) -> float:
    """argparse type: a number or a fraction such as 8/255."""
    from ns_core.attacks import parse_eps

    try:
        return parse_eps(text, "--eps")
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def tracking_uri(arg: str | None) -> str | None:
    if arg and arg.lower() == "none":
        return None
    return resolve_tracking_uri(arg)


def make_writer(args, tracking=None) -> ReportWriter:
    uri = tracking_uri(args.tracking_uri or (tracking.uri if tracking is not None else None))
    experiment = args.experiment or (tracking.experiment if tracking is not None else DEFAULT_EXPERIMENT)
    return ReportWriter(Tracker(uri, experiment) if uri else None, args.out)


def smoke_checkpoints(directory: Path) -> list[str]:
    """Two seconds-trained LeNet-5 checkpoints (standard, PGD-AT) for --smoke-test without --checkpoints."""
    from orchestrator.config.experiment import ExperimentConfig
    from orchestrator.config.loader import validate
    from orchestrator.run import build_trainer

    paths = []
    for method in ("standard", "pgd_at"):
        path = directory / f"smoke-{method}.pt"
        if not path.exists():
            experiment = validate(ExperimentConfig, {
                "name": f"smoke-{method}", "dataset": "mnist5k", "model": "lenet5", "method": method,
                "attack": {"name": "pgd", "eps": 0.2, "steps": 2}, "data": {"train_limit": 1024, "val_size": 64},
                "train": {"epochs": 1, "batch_size": 64, "optimizer": "adam", "lr": 3e-3, "weight_decay": 0.0,
                          "val_attack": {"name": "pgd", "eps": 0.2, "steps": 2}}})
            trainer = build_trainer(experiment)
            trainer.fit()
            trainer.save_checkpoint(path)
        paths.append(str(path))
    return paths


def run_methods_command(args) -> int:
    from analyses.methods import format_table, run_methods
    from orchestrator.execution.ray_session import ray_session

    config = load_methods_config(args.config, {"experiment.data.download": True} if args.download else None,
                                 {"experiment.data.download": "--download"})
    if args.smoke_test:
        config = config.smoke()
    checkpoint_dir = Path(args.checkpoint_dir or (Path(args.out) / "checkpoints" if args.smoke_test and args.out
                                                  else config.checkpoint_dir)).resolve()
    storage = args.storage or config.storage or str(Path.cwd() / "ray_results")
    jobs = len(config.methods) * len(config.seeds)
    e = config.experiment
    plan = (f"{jobs} trainings ({', '.join(m.label for m in config.methods)} x seeds {config.seeds}) on "
            f"{e.dataset}/{e.model}, {e.train.epochs} epochs; final suite {', '.join(a.label for a in e.final_suite())}"
            f" on the test split; checkpoints under {checkpoint_dir}; {config.resources.cpu:g} CPU / "
            f"{config.resources.gpu:g} GPU per training")
    if args.dry_run:
        print(f"# dry run: config {args.config} is valid\n{plan}")
        return 0
    writable_dir(checkpoint_dir, "checkpoint folder")
    if "://" not in storage:
        storage = str(writable_dir(storage, "Ray results folder"))
    print(plan, flush=True)
    writer = make_writer(args, config.tracking)
    from orchestrator.run import load_data

    load_data(config.experiment)  # a missing dataset is one line, before Ray starts
    with ray_session(args.address):
        result = run_methods(config, writer, checkpoint_dir, storage, keep_gpu=args.keep_gpu)
    robust = "AutoAttack" if any(a.name == "autoattack" for a in e.final_suite()) else "worst case"
    print("\n" + format_table(result.summary.to_pylist(), result.paired_summary.to_pylist(), robust))
    for row in result.per_seed.to_pylist():
        if row["status"] != Status.COMPLETE:
            print(f"  {row['method']} seed {row['seed']} failed: {row['error']}")
    print(f"\n{jobs} trainings in {result.seconds:.0f} s; report: {writer.where()}")
    seed = config.seeds[0]
    ckpt = {label: str(path) for (label, s), path in result.checkpoints.items() if s == seed}
    if ckpt:
        print(f"next:\n  {prog('analyze')} compare --checkpoints " + " ".join(ckpt.values()))
        chosen = [ckpt[k] for k in ("pgd_at", "standard") if k in ckpt] or list(ckpt.values())[:1]
        print(f"  {prog('analyze')} stabilize --checkpoint " + " ".join(chosen))
    return 0


def run_model_command(args) -> int:
    if args.smoke_test:
        args.examples, args.steps = min(args.examples, 64), min(args.steps, 2)
        if args.command == "stabilize":
            args.probe, args.draws, args.fractions = min(args.probe, 64), min(args.draws, 2), SMOKE_FRACTIONS
        if not args.checkpoints and args.dry_run:
            print("# dry run: --smoke-test would train two tiny LeNet-5 checkpoints (standard, pgd_at) first")
            return 0
        if not args.checkpoints:
            smoke_dir = Path(args.out or tempfile.mkdtemp(prefix="nslab-smoke-")) / "smoke_checkpoints"
            smoke_dir.mkdir(parents=True, exist_ok=True)
            args.checkpoints = smoke_checkpoints(smoke_dir)
    if not args.checkpoints and not args.dry_run:
        raise ValueError(f"{args.command} needs checkpoints: pass "
                         f"{'--checkpoints' if args.command == 'compare' else '--checkpoint'} A.pt [B.pt ...]")
    models = load_checkpoints(args.checkpoints or [], args.labels, args.device, download=args.download)
    shared = None
    if args.command == "compare" and args.shared_source:
        shared = load_checkpoints([args.shared_source], ["shared-source"], args.device, download=args.download)[0]
    if args.dry_run:
        if models:
            same_data(models + ([shared] if shared else []))
            layers = check_layers(models[0].model, args.layers)
            print(f"# dry run: {len(models)} model(s) {[m.label for m in models]} on {models[0].metadata['dataset']}; "
                  f"layers {layers}; {models[0].attack(args.eps, args.steps).label}; {args.examples} test images")
        return 0
    writer = make_writer(args)
    timer = Timer()
    if args.command == "compare":
        options = CompareOptions(eps=args.eps, steps=args.steps, examples=args.examples, layers=args.layers,
                                 seed=args.seed, data_root=args.data_root, reference=args.reference)
        text = compare_report(models, options, writer, shared)
    else:
        options = StabilizeOptions(layers=args.layers, draws=args.draws, examples=args.examples, probe=args.probe,
                                   eps=args.eps, steps=args.steps, seed=args.seed, data_root=args.data_root)
        if args.fractions:
            options.fractions = args.fractions
        text = stabilize_report(models, options, writer)
    print(text)
    print(f"\n{args.command} took {timer.seconds:.0f} s; report: {writer.where()}")
    return 0


def run_sensitivity_command(args) -> int:
    from analyses.loading import load_external
    from analyses.sensitivity import SensitivityOptions, sensitivity_report
    from ns_core.attacks import Attack

    if args.checkpoint and args.adapt:
        raise ValueError("--adapt, --normalize and --cifar-stem build a --state-dict's model; a --checkpoint is "
                         "rebuilt exactly as it was trained: drop them")
    if args.checkpoint:
        item = load_checkpoints([args.checkpoint], [args.label] if args.label else None, args.device,
                                download=args.download)[0]
    elif args.state_dict and args.model and args.dataset:
        item = load_external(args.model, args.state_dict, args.dataset, args.data_root, args.device, args.eps,
                             args.label, adapt=args.adapt or (), download=args.download)
    else:
        raise ValueError("sensitivity needs --checkpoint PT, or --state-dict PT with --model NAME and --dataset NAME")
    options = SensitivityOptions(eps=args.eps, steps=args.steps, examples=args.examples, layers=args.layers,
                                 attacks=[Attack.parse(a) for a in args.attacks or []], top=args.top, seed=args.seed,
                                 data_root=args.data_root)
    if args.smoke_test:
        options.examples, options.steps = min(options.examples, 64), min(options.steps, 2)
        options.attacks = [a.replace(steps=min(a.steps_used, 3)) if a.steps_used > 1 else a
                           for a in options.attacks[:2]] or [Attack("fgsm", item.attack(args.eps).eps),
                                                            Attack("pgd", item.attack(args.eps).eps, steps=3)]
    layers = check_layers(item.model, options.layers)
    attack = item.attack(options.eps, options.steps)
    if args.dry_run:
        print(f"# dry run: {item.label} ({item.metadata['model']} on {item.metadata['dataset']}, {item.built}); "
              f"layers {layers}; sensitivity pairs {attack.label}; {options.examples} test images")
        return 0
    writer = make_writer(args)
    timer = Timer()
    print(sensitivity_report(item, options, writer))
    print(f"\nsensitivity took {timer.seconds:.0f} s; report: {writer.where()}")
    return 0


def run_study_command(args) -> int:
    from analyses.study_report import study_report

    name, experiment = args.name, args.study_experiment
    if args.config:
        from orchestrator.config.study import load_study

        study = load_study(args.config)
        name, experiment = name or study.study.name, experiment or study.tracking.experiment
    if not name:
        raise ValueError("study needs --name STUDY (or --config configs/study/X.yaml)")
    experiment = experiment or "nslab"
    uri = tracking_uri(args.tracking_uri)
    if uri is None:
        raise ValueError("study reads the study from MLflow: pass a real --tracking-uri, not 'none'")
    if args.dry_run:
        print(f"# dry run: would read study {name!r} from experiment {experiment!r} at {uri}")
        return 0
    writer = make_writer(args)
    print(study_report(Tracker(uri, experiment), name, writer))
    print(f"report: {writer.where()}")
    return 0


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    if getattr(args, "seed", 0) < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    if args.command == "methods":
        return run_methods_command(args)
    if args.command == "study":
        return run_study_command(args)
    if args.command == "sensitivity":
        return run_sensitivity_command(args)
    return run_model_command(args)


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
