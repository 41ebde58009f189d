"""A study design's operating characteristics before anything trains: how often its confirmation says beats,
loses, equivalent or undecided, and after how many seeds, for a true effect and a seed-to-seed spread.

    python -m pipelines.power --config configs/study/quick.yaml                  # effects 0, 0.5, 1, 2, 3 points
    python -m pipelines.power --config configs/study/quick.yaml --effect 0 --spread 1.2 --json
    python -m pipelines.power --config configs/study/quick.yaml --effect 2 --test-se 0.4
    python -m pipelines.power --config configs/study/quick.yaml --set confirm.max_seeds=10 --dry-run

It plays the study's own schedule (the first `confirm.seeds`, then the seeds a round adds, up to
`confirm.max_seeds`, with its `confirm.boundary`) through the decision the confirmation calls at every look
(seeded Monte Carlo, orchestrator/study/power.py). Effect 0 gives the false-verdict rates: at most 2.5% "beats"
and 2.5% "loses", plus the Monte Carlo error. Effects and spreads are accuracy points; the spread is the
standard deviation of one seed's paired difference (default `confirm.assumed_spread`); `--test-se` adds the
test split's own standard error of the mean difference, shared by every seed. With several comparisons (top_k
> 1, a Pareto front, several arms) each is judged at Holm's first share of alpha: a lower bound on its power.
`--json` prints one object (beats, loses, equivalent, undecided as fractions, expected_seeds, and the settings)
for --effect, else a list of them, one per effect.
"""

from __future__ import annotations

import argparse
import json

from pipelines._common import Parser, positive_int, run_cli, setup_logging


def build_parser() -> argparse.ArgumentParser:
    parser = Parser("power", description=__doc__)
    parser.add_argument("--config", required=True, help="study YAML (e.g. configs/study/quick.yaml)")
    parser.add_argument("--effect", type=float, metavar="POINTS",
                        help="the true paired difference, in points (default: a table over 0, 0.5, 1, 2, 3)")
    parser.add_argument("--spread", type=_positive, metavar="POINTS",
                        help="seed-to-seed standard deviation of a paired difference (default: confirm.assumed_spread)")
    parser.add_argument("--test-se", type=float, default=0.0, metavar="POINTS",
                        help="the test split's standard error of the mean difference, shared by every seed (default 0)")
    parser.add_argument("--comparisons", type=positive_int, metavar="N",
                        help="comparisons judged together under Holm (default: the study's)")
    parser.add_argument("--paths", type=positive_int, default=20_000, metavar="N",
                        help="simulated confirmations per effect (default 20000)")
    parser.add_argument("--seed", type=int, default=0, help="the simulation's seed (default 0)")
    parser.add_argument("--set", action="append", default=[], metavar="PATH=VALUE",
                        help="override a study field, e.g. --set confirm.max_seeds=10 (repeatable; YAML values)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--dry-run", action="store_true", help="validate the config, print the design and exit")
    parser.add_argument("--smoke-test", action="store_true", help="the same at 2,000 paths (what the tests run)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    from orchestrator.config.loader import parse_set
    from orchestrator.config.study import load_study
    from orchestrator.study.power import EFFECTS, simulate, study_family, text
    from orchestrator.study.sequential import confirmation_design

    overrides, origins = {}, {}
    for item in args.set:
        for path, value in parse_set([item]).items():
            overrides[path], origins[path] = value, f"--set {item}"
    study = load_study(args.config, overrides, origins)
    if study.confirm is None:
        raise ValueError(f"{args.config} has no confirmation (confirm: null): there is no design to simulate")
    if args.test_se < 0:
        raise ValueError(f"--test-se must be >= 0, got {args.test_se}")
    configurations, comparisons = study_family(study)
    comparisons = args.comparisons or comparisons
    design = confirmation_design(study, configurations)
    spread = args.spread or study.confirm.assumed_spread
    where = "--spread" if args.spread else "confirm.assumed_spread"
    holm = f"; Holm over {comparisons} comparisons, each at alpha/{comparisons} here" if comparisons > 1 else ""
    pareto = " (a Pareto front counted as top_k)" if study.confirm.pareto and not args.comparisons else ""
    header = (f"design: {design.describe()}; margin ±{study.confirm.margin:g} points{holm}{pareto}\n"
              f"spread {spread:g} points per seed ({where}), test-split standard error {args.test_se:g} points; ")
    if args.dry_run:
        print(header + f"dry run: config {args.config} is valid; nothing simulated")
        return 0
    paths = 2_000 if args.smoke_test else args.paths
    effects = (args.effect,) if args.effect is not None else EFFECTS
    rows = [simulate(design, effect, spread, study.confirm.margin, test_se=args.test_se, family=comparisons,
                     paths=paths, seed=args.seed) for effect in effects]
    if args.json:
        objects = [{**r.as_dict(), "test_se": args.test_se, "comparisons": comparisons,
                    "looks": list(design.looks), "boundary": design.boundary} for r in rows]
        print(json.dumps(objects[0] if args.effect is not None else objects))
        return 0
    print(header + f"{paths:,} simulated confirmations per effect (seed {args.seed}):")
    print(text(rows))
    if 0.0 in effects:
        error = rows[effects.index(0.0)].error(design.alpha)
        print(f"effect 0 gives the false-verdict rates: at most {design.alpha:g} beats and {design.alpha:g} loses "
              f"(Monte Carlo error ±{error:.3f})")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
