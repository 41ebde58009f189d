"""Run nslab's benchmarks, print a table of ratios against their targets, write bench/results/<name>.json.

    python -m bench                      # full mode, every benchmark (make bench)
    python -m bench --quick              # a few minutes on 2 CPU cores
    python -m bench --only attack_throughput --device cpu --threads 1 --out /tmp/bench
    python -m bench --only scaling --study-reps 4   # whole studies: more repetitions, a narrower spread

Benchmarks: epoch, attack_throughput, sns_step, sensitivity_measure, warmup, orchestration, scaling (see
README.md, "Performance"); `python -m bench.profile_epoch` shows where an epoch's time goes.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import time
from pathlib import Path

import torch

from bench.harness import Context, format_table, write_result
from ns_core.utils import pick_device

BENCHMARKS = ("epoch", "attack_throughput", "sns_step", "sensitivity_measure", "warmup", "orchestration", "scaling")
DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return int(text)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    speed = parser.add_mutually_exclusive_group()
    speed.add_argument("--quick", action="store_true", help="small sizes and few repetitions (minutes)")
    speed.add_argument("--tiny", action="store_true", help="smallest sizes, 2 repetitions (tests only)")
    parser.add_argument("--only", action="append", choices=BENCHMARKS, metavar="NAME",
                        help=f"run only this benchmark (repeatable): {', '.join(BENCHMARKS)}")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (default: auto)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads on CPU (default 1: 2-thread OpenMP on a shared box is erratic)")
    parser.add_argument("--study-reps", type=_positive, default=None, metavar="N",
                        help="repetitions of the benchmarks that run whole studies (warmup, orchestration, scaling); "
                             "their spread is wide on a shared machine, more repetitions narrow it")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for the result JSON files")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    device = pick_device(args.device)
    threads = args.threads or (torch.get_num_threads() if device.type == "cuda" else 1)
    torch.set_num_threads(threads)
    ctx = Context(device=device, mode="tiny" if args.tiny else "quick" if args.quick else "full", threads=threads,
                  study_reps=args.study_reps)
    docs, failed = [], []
    for name in args.only or BENCHMARKS:
        print(f"== {name} ({ctx.mode}, {device}, {threads} thread(s))", flush=True)
        start = time.perf_counter()
        try:
            doc = importlib.import_module(f"bench.{name}").run(ctx)
        except Exception as err:  # one broken benchmark must not hide the others' figures
            logging.exception("benchmark %s failed", name)
            failed.append(f"{name}: {type(err).__name__}: {err}")
            continue
        path = write_result(doc, args.out)
        docs.append(doc)
        print(f"   {time.perf_counter() - start:.0f} s -> {path}", flush=True)
    if docs:
        print()
        print(format_table(docs))
    for line in failed:
        print(f"FAILED {line}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
