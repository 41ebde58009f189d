"""What every pipeline shares: logging set-up, the shared flags, and one-line errors at the boundary.

    def main(argv=None) -> int:
        return run_cli(_main, argv)      # a config or input mistake -> "error: ..." on one line, exit 2
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable, Sequence

from pydantic import ValidationError

from orchestrator.config import ConfigError

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def setup_logging(verbose: bool = False) -> None:
    """INFO lines from the orchestrator and pipelines (everything at DEBUG with -v); warnings otherwise."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname).1s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", force=True)
    for name in ("orchestrator", "pipelines"):
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.getLogger("ns_core").setLevel(logging.DEBUG if verbose else logging.WARNING)
    for noisy in ("alembic", "mlflow", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dry-run", action="store_true",
                        help="validate the config, print the resolved settings and exit (no Ray, no MLflow)")
    parser.add_argument("--smoke-test", action="store_true",
                        help="the same pipeline at a seconds-long budget (what the tests run)")
    parser.add_argument("--tracking-uri", metavar="URI",
                        help="MLflow tracking URI (default: the config's, $MLFLOW_TRACKING_URI, or "
                             "sqlite:///<cwd>/mlflow.db); e.g. http://head:5000")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def parse_set(items: Sequence[str]) -> dict:
    """['sns.lam=0.3', 'train.epochs=2'] -> {'sns.lam': 0.3, 'train.epochs': 2} (values read as YAML)."""
    import yaml

    overrides = {}
    for item in items:
        path, sep, value = item.partition("=")
        if not sep or not path:
            raise ValueError(f"--set {item!r}: write PATH=VALUE, e.g. --set sns.lam=0.3")
        overrides[path.strip()] = yaml.safe_load(value)
    return overrides


def run_cli(body: Callable[[list[str] | None], int], argv: list[str] | None) -> int:
    """Run a pipeline body; bad input becomes one line on stderr and exit code 2."""
    try:
        return body(argv)
    except ConfigError as err:
        print(str(err).splitlines()[0], file=sys.stderr)
    except ValidationError as err:
        first = err.errors()[0]
        print(f"config error: {'.'.join(map(str, first['loc']))}: {first['msg']}", file=sys.stderr)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_USAGE


class Timer:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start
