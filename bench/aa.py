"""A/A studies: the sequential confirmation run again and again on two arms that differ in nothing but training
randomness, to count how often its verdict says beats, loses, equivalent or undecided.

    python -m bench.aa --repeats 20                       # configs/study/aa_tiny.yaml, about a minute each
    python -m bench.aa --repeats 2 --config configs/study/aa_tiny.yaml --set confirm.max_seeds=3

Each repetition is the confirmation path of a study (orchestrator/study/confirmation.py run_confirmation: Tune
rounds, per-example outcomes in MLflow, the decision at every look) on the study's two arms, the same method
and recipe, under its own MLflow parent run, in one Ray session. Its seeds are a block of their own (the search
seed moves by 1000 per repetition, the confirmation seeds follow it) and the control trains each seed s on s +
confirm.baseline_seed_offset, so no two models in the whole run share their training randomness: every paired
difference has the spread of real runs. With no true difference, "beats" and "loses" should each come out about
1 time in 40 at most. Prints one line per repetition and the counts; writes bench/results/aa.json (--out).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "bench" / "results" / "aa.json"
SEED_BLOCK = 1000  # the search seed of repetition r is SEED_BLOCK x (r + 1): seed blocks never overlap


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.aa", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--config", default=str(REPO / "configs" / "study" / "aa_tiny.yaml"), help="an A/A study")
    parser.add_argument("--repeats", type=int, default=20, help="repetitions (default 20)")
    parser.add_argument("--first", type=int, default=0, help="the first repetition's index (to add to a run)")
    parser.add_argument("--set", action="append", default=[], metavar="PATH=VALUE", help="override a study field")
    parser.add_argument("--storage", default=None, help="Ray results and the MLflow store (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"result JSON (default {DEFAULT_OUT})")
    return parser.parse_args(argv)


def search_rows(study) -> list[dict]:
    """What the confirmation chooses from: each arm's one configuration, the experiment's own recipe (an A/A
    study has nothing to search: both arms are the same)."""
    from orchestrator.config.loader import apply_overrides
    from orchestrator.results import Status

    metric = study.study.objectives[0].metric
    rows = []
    for arm in study.arm_list():
        values = {p: _value(arm.experiment, p) for p in arm.space}
        apply_overrides(arm.experiment, values)  # the recipe as a configuration: it must validate
        rows.append({"arm": arm.name, "status": Status.COMPLETE, metric: 0.5, "label": f"{arm.name}-aa",
                     **{f"param.{p}": v for p, v in values.items()}})
    return rows


def _value(experiment, path: str):
    value = experiment
    for part in path.split("."):
        value = getattr(value, part)
    return value


def repetition(index: int, args, root: Path, tracker, resources) -> dict:
    """One A/A confirmation: its verdict, seeds, mean difference, interval and each source's half-width."""
    from orchestrator.config.loader import parse_set
    from orchestrator.config.study import load_study
    from orchestrator.execution.trial_settings import Record
    from orchestrator.record import tags
    from orchestrator.study.confirmation import run_confirmation

    overrides = {k: v for item in args.set for k, v in parse_set([item]).items()}
    overrides.update({"experiment.train.seed": SEED_BLOCK * (index + 1), "tracking.uri": tracker.tracking_uri,
                      "storage.ray": str(root / "ray")})
    study = load_study(args.config, overrides)
    name = f"aa-{index:02d}"
    parent = tracker.start_run(name, tags={tags.KIND: tags.Kind.STUDY, tags.STUDY: name})
    record = Record(tracker.tracking_uri, study.tracking.experiment, parent, name)
    started = time.time()
    rows = search_rows(study)
    confirmation = run_confirmation(study, rows, [False] * len(rows), record, str(root / "ray" / name), resources)
    (comparison,) = confirmation.comparisons
    tracker.set_description(parent, comparison.verdict())
    tracker.end_run(parent)
    low, high = comparison.robust.ci95
    widths = comparison.robust.half_widths()
    return {"repetition": index, "decision": str(comparison.decision), "seeds": comparison.robust.n,
            "mean_points": 100 * comparison.robust.mean, "std_points": 100 * comparison.robust.std,
            "ci_low_points": 100 * low, "ci_high_points": 100 * high, "seeds_half_width": 100 * widths["seeds"],
            "examples_half_width": 100 * widths.get("test examples", float("nan")),
            "seconds": time.time() - started, "verdict": comparison.verdict()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname).1s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("orchestrator").setLevel(logging.INFO)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from orchestrator.execution.ray_session import ray_session, trial_resources
    from orchestrator.record.tracking import Tracker

    root = Path(args.storage or tempfile.mkdtemp(prefix="nslab-aa-")).resolve()
    results = []
    with ray_session():
        tracker = Tracker(f"sqlite:///{root / 'mlflow.db'}", "nslab-aa")
        resources = trial_resources(1.0, 0.0)
        for index in range(args.first, args.first + args.repeats):
            results.append(repetition(index, args, root, tracker, resources))
            r = results[-1]
            print(f"aa-{index:02d}: {r['decision']:<10} after {r['seeds']} seeds, {r['mean_points']:+.2f} "
                  f"± {r['std_points']:.2f} points (95% CI {r['ci_low_points']:+.2f} to {r['ci_high_points']:+.2f}; "
                  f"seeds ±{r['seeds_half_width']:.2f}, test examples ±{r['examples_half_width']:.2f}), "
                  f"{r['seconds']:.0f} s", flush=True)
    counts = Counter(r["decision"] for r in results)
    summary = {"config": args.config, "overrides": args.set, "repeats": len(results),
               "counts": {d: counts.get(d, 0) for d in ("beats", "loses", "equivalent", "undecided")},
               "mean_seeds": sum(r["seeds"] for r in results) / max(1, len(results)),
               "median_std_points": sorted(r["std_points"] for r in results)[len(results) // 2] if results else None,
               "store": str(root), "repetitions": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1))
    print(f"{len(results)} A/A confirmations: " + ", ".join(f"{d} {n}" for d, n in summary["counts"].items())
          + f"; {summary['mean_seeds']:.1f} seeds on average; written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
