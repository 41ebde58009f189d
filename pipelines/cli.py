"""The `nslab` console script: one command, the pipelines as subcommands.

    nslab study --config configs/study/quick.yaml [--resume]     = python -m pipelines.study ...
    nslab train --config configs/experiment/quick.yaml           = python -m pipelines.train ...
    nslab evaluate --checkpoint runs/quick/checkpoint.pt ...     = python -m pipelines.evaluate ...
    nslab analyze ...                                            = python -m pipelines.analyze ...
    nslab power --config configs/study/quick.yaml [--effect 2]   = python -m pipelines.power ...
    nslab tracking-server --store ~/nslab-state [--auth]         = python -m pipelines.tracking_server ...
    nslab demo                                                   the quick study (what `make demo` runs)
    nslab --version

`nslab SUBCOMMAND --help` shows each one's options.
"""

from __future__ import annotations

import importlib
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from pipelines import _common

COMMANDS = {
    "study": ("pipelines.study", "run a fair hyperparameter study: two arms searched alike, a sequential confirmation"),
    "train": ("pipelines.train", "train one experiment, tracked in MLflow"),
    "evaluate": ("pipelines.evaluate", "evaluate a checkpoint (or any model's state_dict) against an attack suite"),
    "analyze": ("pipelines.analyze", "the sensitivity analyses (the paper's claims), for any trained model"),
    "power": ("pipelines.power", "a study design's chance of each verdict and its seeds, before anything trains"),
    "tracking-server": ("pipelines.tracking_server", "one MLflow server (with users) for many writers"),
    "demo": ("pipelines.study", "the quick study on the embedded digits (what `make demo` runs)"),
}
QUICK_STUDY = Path(__file__).resolve().parent.parent / "configs" / "study" / "quick.yaml"


def nslab_version() -> str:
    try:
        return version("nslab")
    except PackageNotFoundError:  # a checkout on PYTHONPATH, not installed
        return "unknown (not installed)"


def usage() -> str:
    lines = [__doc__.strip().splitlines()[0], "", "usage: nslab SUBCOMMAND [options]", "       nslab --version", "",
             "subcommands:"]
    lines += [f"  {name:<17}{text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines + ["", "`nslab SUBCOMMAND --help` for its options."])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv and argv[0] == "--version":
        print(f"nslab {nslab_version()}")
        return 0
    if not argv:  # no subcommand is a usage error: the help, and a non-zero exit for scripts
        print(usage(), file=sys.stderr)
        return 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"error: unknown subcommand {command!r}; choose one of: {', '.join(COMMANDS)} (see nslab --help)",
              file=sys.stderr)
        return 2
    if command == "demo" and "--config" not in rest:
        rest = ["--config", str(QUICK_STUDY), *rest]
    module = importlib.import_module(COMMANDS[command][0])  # lazily: each subcommand pays for its own imports
    _common.THROUGH_NSLAB = True  # usage lines and printed commands say `nslab study ...`
    return module.main(rest)


if __name__ == "__main__":
    raise SystemExit(main())
