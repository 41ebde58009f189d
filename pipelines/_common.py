"""What every pipeline shares: logging set-up, the shared flags, checks of paths, and one-line errors.

    def main(argv=None) -> int:
        return run_cli(_main, argv)      # a config or input mistake -> "error: ..." on one line, exit 2
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from orchestrator.config import ConfigError

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def setup_logging(verbose: bool = False) -> None:
    """INFO lines from the orchestrator and pipelines (everything at DEBUG with -v); warnings otherwise."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname).1s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", force=True)
    for name in ("orchestrator", "pipelines", "analyses"):
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.getLogger("ns_core").setLevel(logging.DEBUG if verbose else logging.WARNING)
    for noisy in ("alembic", "mlflow", "urllib3", "auto-attack"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read when mlflow is imported (after this)


THROUGH_NSLAB = False  # set by the `nslab` console script: usage lines then read `nslab study ...`


def prog(command: str) -> str:
    """How the user ran the pipeline: `nslab tracking-server` or `python -m pipelines.tracking_server`."""
    return f"nslab {command.replace('_', '-')}" if THROUGH_NSLAB else f"python -m pipelines.{command}"


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: 'error: argument --examples: must be >= 1, got 0 (see ... --help)'."""

    def __init__(self, command: str | None = None, **kwargs) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        if command is not None:
            kwargs["prog"] = prog(command)
        super().__init__(**kwargs)

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"error: {message} (see {self.prog} --help)\n")


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dry-run", action="store_true",
                        help="validate the config (and open any checkpoint), print the resolved settings and exit")
    parser.add_argument("--smoke-test", action="store_true",
                        help="the same pipeline at a seconds-long budget (what the tests run)")
    parser.add_argument("--tracking-uri", metavar="URI",
                        help="MLflow tracking URI (default: the config's, $MLFLOW_TRACKING_URI, or "
                             "sqlite:///<cwd>/mlflow.db); e.g. http://head:5000 (credentials: "
                             "$MLFLOW_TRACKING_USERNAME / $MLFLOW_TRACKING_PASSWORD)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def add_download_flag(parser: argparse.ArgumentParser) -> None:
    """--download: the one way a pipeline lets torchvision fetch a dataset whose files are missing (= the
    config's `data.download: true`); without it nothing downloads and a missing dataset is one line."""
    parser.add_argument("--download", action="store_true",
                        help="download the dataset's files if they are missing (needs internet; default: never "
                             "download, a missing dataset is an error naming where its files go)")


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1."""
    return _whole_number(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type: a whole number >= 0."""
    return _whole_number(text, 0)


def _whole_number(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
    return value


def writable_dir(path: str | Path, what: str) -> Path:
    """`path` as an absolute directory we can write to (created if missing); one-line ValueError otherwise."""
    path = Path(path).expanduser().resolve()
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is None or not existing.is_dir():
        raise ValueError(f"{what} {path}: {existing} is not a directory; choose another location")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path):
            pass
    except OSError as err:
        raise ValueError(f"{what} {path} is not writable ({err.strerror}); choose a location you can write "
                         "to") from None
    return path


def check_tracking_location(uri: str) -> None:
    """A SQLite store's folder must be writable before anything starts (an http server is checked when used)."""
    if uri.startswith("sqlite:///"):
        writable_dir(Path(uri.removeprefix("sqlite:///")).parent, "MLflow store folder")


def run_cli(body: Callable[[list[str] | None], int], argv: list[str] | None) -> int:
    """Run a pipeline body; bad input becomes one line on stderr and exit code 2."""
    try:
        return body(argv)
    except ConfigError as err:
        print(str(err).splitlines()[0], file=sys.stderr)
    except (ValueError, FileNotFoundError, PermissionError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:
        from orchestrator.record.tracking import tracking_error

        message = tracking_error(err)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
    return EXIT_USAGE


class Timer:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start
