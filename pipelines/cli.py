"""The `nslab` console script: one command, the pipelines as subcommands.

    nslab study --config configs/study/quick.yaml [--resume]     = python -m pipelines.study ...
    nslab train --config configs/experiment/quick.yaml           = python -m pipelines.train ...
    nslab evaluate --checkpoint runs/quick/checkpoint.pt ...     = python -m pipelines.evaluate ...
    nslab analyze ...                                            = python -m pipelines.analyze ...
    nslab demo                                                   the quick study (make demo)

`nslab SUBCOMMAND --help` shows each one's options.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

COMMANDS = {
    "study": ("pipelines.study", "run a hyperparameter study (Ray Tune + Optuna + MLflow)"),
    "train": ("pipelines.train", "train one experiment, tracked in MLflow"),
    "evaluate": ("pipelines.evaluate", "evaluate a checkpoint against an attack suite"),
    "analyze": ("pipelines.analyze", "the sensitivity analyses (claims of the paper)"),
    "demo": ("pipelines.study", "the quick study on the embedded digits (what `make demo` runs)"),
}
QUICK_STUDY = Path(__file__).resolve().parent.parent / "configs" / "study" / "quick.yaml"


def usage() -> str:
    lines = [__doc__.strip().splitlines()[0], "", "usage: nslab SUBCOMMAND [options]", "", "subcommands:"]
    lines += [f"  {name:<10}{text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines + ["", "`nslab SUBCOMMAND --help` for its options."])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"error: unknown subcommand {command!r}; choose one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    if command == "demo" and "--config" not in rest:
        rest = ["--config", str(QUICK_STUDY), *rest]
    try:  # imported lazily: each subcommand pays only for its own imports
        module = importlib.import_module(COMMANDS[command][0])
    except ModuleNotFoundError as err:
        if err.name != COMMANDS[command][0]:
            raise
        print(f"error: {err.name} is not in this checkout; update it or run another subcommand", file=sys.stderr)
        return 2
    return module.main(rest)


if __name__ == "__main__":
    raise SystemExit(main())
