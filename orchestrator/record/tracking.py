"""MLflow behind one module: parent runs for studies and reports, nested child runs, Parquet/PNG artifacts.

Everything goes through `MlflowClient` with explicit run ids, so a Ray trial in another process
(and another working directory) logs to the right run given only the tracking URI and the run id.
Nothing else in nslab logs through mlflow (pipelines/tracking_server.py only starts its server and adds
users): the next MLflow API change is an edit here.

    tracker = Tracker("sqlite:////abs/path/mlflow.db", "nslab")
    parent = tracker.start_run("study-quick", params={...}, tags={...})
    child = tracker.start_run("trial-0001", parent_run_id=parent)
    tracker.log_metrics(child, {"robust_acc": 0.41}, step=3)
    tracker.log_table(child, table, "eval/robust_accuracy.parquet")
    tracker.end_run(child)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from orchestrator.record.tags import PARENT

log = logging.getLogger(__name__)
MAX_PARAM_LENGTH = 6000


def default_tracking_uri(directory: str | Path | None = None) -> str:
    """`sqlite:///<absolute dir>/mlflow.db` (MLflow 3's default store; Ray trials need absolute paths)."""
    return f"sqlite:///{Path(directory or Path.cwd()).resolve() / 'mlflow.db'}"


def resolve_tracking_uri(flag: str | None, configured: str | None = None, base: str | Path | None = None) -> str:
    """The one place a tracking URI is chosen, for every pipeline: `--tracking-uri`, else the config's
    `tracking.uri`, else $MLFLOW_TRACKING_URI, else sqlite:///<base or cwd>/mlflow.db; made absolute."""
    base = Path(base or Path.cwd()).resolve()
    uri = flag or configured or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(base)
    return absolute_uri(uri, base)


def absolute_uri(uri: str, base: Path) -> str:
    """sqlite:///relative.db -> sqlite:////abs/relative.db; http(s) and other URIs are kept; a bare path
    is refused (MLflow 3 no longer reads a ./mlruns file store)."""
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///")).expanduser()
        return f"sqlite:///{(base / db).resolve()}"
    if "://" not in uri:
        raise ValueError(f"tracking URI {uri!r} is not a URI; use sqlite:///{uri}/mlflow.db or http://host:5000 "
                         "(MLflow 3 has no ./mlruns file store)")
    return uri


def git_commit(directory: str | Path | None = None) -> str:
    """The checkout's HEAD commit, read from .git without running git (a loose or packed ref, or a detached
    HEAD); $NSLAB_GIT_COMMIT, else "unknown", outside git (e.g. a Ray job's working_dir copy)."""
    start = Path(directory or Path(__file__).parent).resolve()
    git = next((p / ".git" for p in (start, *start.parents) if (p / ".git").exists()), None)
    try:
        if git is None:
            raise OSError("not in a git checkout")
        if git.is_file():  # a worktree or submodule: "gitdir: <path>"
            git = (git.parent / git.read_text().split(":", 1)[1].strip()).resolve()
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head
        ref = head.removeprefix("ref: ")
        loose = git / ref
        if loose.is_file():
            return loose.read_text().strip()
        for line in (git / "packed-refs").read_text().splitlines():
            if line.endswith(f" {ref}"):
                return line.split()[0]
        raise OSError(f"{ref} not found")
    except OSError:
        return os.environ.get("NSLAB_GIT_COMMIT", "unknown")


def config_hash(config: Mapping[str, Any]) -> str:
    """A short stable hash of a JSON-able config, to find runs of the same config."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:12]


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"sns": {"lam": 0.1}} -> {"sns.lam": 0.1}; lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def sibling_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """The params that tell a study's runs apart ({"arm": "sns", "train.lr": "0.003", "sns.lam": ...}), named
    for MLflow's compare view, which lists params by name and plots the first three whose values differ
    (docs/design.md, "What a person sees in the MLflow UI"): `arm` (and `replicate`, the search of a replicated
    study), then what every arm has, the training
    recipe as `recipe.<path>` ('train.' dropped: recipe.lr, recipe.eps_ramp_epochs) and the `seed`, then the
    arm's own knobs under its method's block (sns.lam), which the baseline's runs do not have."""
    from orchestrator.config.search_space import METHOD_BLOCKS

    named = {}
    for path, value in params.items():
        if path in ("arm", "replicate") or path.split(".")[0] in METHOD_BLOCKS:
            named[path] = value
        elif path == "train.seed":
            named["seed"] = value
        else:
            named[f"recipe.{path.removeprefix('train.')}"] = value
    return named


_prepared: set[str] = set()


def prepare_sqlite_store(tracking_uri: str) -> None:
    """Create a SQLite store safely once, whoever gets there first. MLflow builds a new store's schema without
    a lock, so processes that open a new file at the same moment break it for good ("table _alembic_tmp_...
    already exists"). Under an exclusive file lock beside the database, the first caller switches the file
    to WAL journaling (readers no longer block the writer; it is stored in the file) and builds the schema;
    later callers find it ready. MLflow's own sessions wait up to 20 s for a busy database."""
    if not tracking_uri.startswith("sqlite:///") or tracking_uri in _prepared:
        return
    import fcntl
    import sqlite3

    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore  # a slow import: outside the lock

    db = Path(tracking_uri.removeprefix("sqlite:///").split("?")[0])
    if _built(db):  # built before (by another process): MLflow's client checks its schema version itself
        _prepared.add(tracking_uri)
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            connection = sqlite3.connect(db, timeout=60)
            try:
                if connection.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                    connection.execute("PRAGMA journal_mode=WAL")
            finally:
                connection.close()
            SqlAlchemyStore(tracking_uri, (db.parent / "mlartifacts").as_uri())  # builds or upgrades the schema
            import mlflow

            _ready_marker(db).write_text(f"{db.stat().st_ino} {mlflow.__version__}")
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    _prepared.add(tracking_uri)


def _ready_marker(db: Path) -> Path:
    return db.with_name(db.name + ".ready")


def _built(db: Path) -> bool:
    """A store this MLflow version finished building: its marker (written under the lock once the schema was
    complete) names this very file (its inode) and the MLflow version that built it."""
    import mlflow

    try:
        return _ready_marker(db).read_text() == f"{db.stat().st_ino} {mlflow.__version__}"
    except OSError:
        return False


def find_study(tracking_uri: str, experiment: str, name: str | None = None):
    """The MLflow parent run of the study `name` (tag nslab.study), or of the newest study when `name` is None,
    in `experiment`. Read-only (a dry run and the screenshot tool look without writing): a store, experiment or
    study that does not exist is a LookupError saying which, and nothing is created."""
    from mlflow import MlflowClient

    from orchestrator.record import tags

    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri.removeprefix("sqlite:///")).is_file():
        raise LookupError(f"no MLflow store at {tracking_uri.removeprefix('sqlite:///')}")
    client = MlflowClient(tracking_uri=tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise LookupError(f"no MLflow experiment named {experiment!r} in {tracking_uri}")
    query = f"tags.`{tags.KIND}` = '{tags.Kind.STUDY}'" + (f" and tags.`{tags.STUDY}` = '{name}'" if name else "")
    runs = client.search_runs([found.experiment_id], query, max_results=1, order_by=["attributes.start_time DESC"])
    if not runs:
        what = f"study {name!r}" if name else f"study run (tag {tags.KIND}={tags.Kind.STUDY})"
        raise LookupError(f"no {what} in MLflow experiment {experiment!r} of {tracking_uri}")
    return runs[0]


class TrackingError(ValueError):
    """The tracking store cannot be used (unreachable, credentials refused); str() is one line."""


def tracking_error(err: BaseException, tracking_uri: str | None = None) -> str | None:
    """One line for a tracking-store failure (server down, credentials refused), None for other errors."""
    if type(err).__module__.split(".")[0] != "mlflow":
        return None
    text = " ".join(str(err).split())
    if tracking_uri is None:
        found = re.search(r"request to (https?://[^/\s]+)", text)
        tracking_uri = found.group(1) if found else "(the tracking store)"
    if "401" in text or "UNAUTHENTICATED" in text or "not authenticated" in text:
        return (f"the MLflow server {tracking_uri} refused the request: not authenticated; set "
                "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD in the environment")
    if "403" in text or "PERMISSION_DENIED" in text:
        return f"the MLflow server {tracking_uri} refused the request: permission denied for this user"
    if "Max retries exceeded" in text or "Connection refused" in text or "NewConnectionError" in text:
        return (f"the MLflow server {tracking_uri} is unreachable (retried with backoff); start it or pass another "
                "--tracking-uri")
    return f"MLflow at {tracking_uri}: {text[:300]}"


class Tracker:
    """A tracking URI + experiment name; every call names its run explicitly. An http(s) server that is
    briefly down is retried with backoff by MLflow's client (MLFLOW_HTTP_REQUEST_MAX_RETRIES, default 7:
    about four minutes) before a call fails."""

    def __init__(self, tracking_uri: str, experiment: str) -> None:
        from mlflow import MlflowClient  # imported here: mlflow import takes seconds

        self.tracking_uri = tracking_uri
        prepare_sqlite_store(tracking_uri)
        self.client = MlflowClient(tracking_uri=tracking_uri)
        try:  # the first contact with the store: a refusal or an unreachable server is one line
            found = self.client.get_experiment_by_name(experiment)
            self.experiment_id = found.experiment_id if found else self._create_experiment(experiment)
        except Exception as err:
            message = tracking_error(err, tracking_uri)
            if message is None:
                raise
            raise TrackingError(message) from None
        self.experiment = experiment

    def _create_experiment(self, name: str) -> str:
        location = None
        if self.tracking_uri.startswith("sqlite:///"):  # artifacts beside the database, not in the cwd
            location = (Path(self.tracking_uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
        try:
            return self.client.create_experiment(name, artifact_location=location)
        except Exception:  # another process created it between our lookup and create
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def start_run(self, name: str, parent_run_id: str | None = None, params: Mapping[str, Any] | None = None,
                  tags: Mapping[str, str] | None = None) -> str:
        all_tags = dict(tags or {})
        if parent_run_id:
            all_tags[PARENT] = parent_run_id
        run = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags)
        if params:
            self.log_params(run.info.run_id, params)
        return run.info.run_id

    def reopen(self, run_id: str) -> str:
        """Mark a run RUNNING again (a retried or resumed trial continues its own run)."""
        self.client.update_run(run_id, status="RUNNING")
        return run_id

    def rename(self, run_id: str, name: str) -> None:
        """Give a run another name (a finished study's parent takes its answer as its name)."""
        self.client.update_run(run_id, name=name)

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(run_id).data.params
        fresh = [Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in flatten(params).items() if k not in existing]
        for start in range(0, len(fresh), 100):
            self.client.log_batch(run_id, params=fresh[start:start + 100])

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()
                 if isinstance(v, int | float) and v == v]  # NaN would poison MLflow's charts
        if batch:
            self.client.log_batch(run_id, metrics=batch)

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def set_description(self, run_id: str, markdown: str) -> None:
        """The run's description, which the MLflow UI renders as Markdown on the run page."""
        self.client.set_tag(run_id, "mlflow.note.content", markdown)

    def log_table(self, run_id: str, table: pa.Table, artifact_path: str) -> None:
        """Write `table` as Parquet and log it at `artifact_path` (e.g. "eval/robust_accuracy.parquet")."""
        directory, name = os.path.split(artifact_path)
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / name
            pq.write_table(table, local)
            self.client.log_artifact(run_id, str(local), directory or None)

    def log_figure(self, run_id: str, figure, artifact_path: str) -> None:
        """Save a matplotlib figure as PNG and log it at `artifact_path`. nslab's figures lay themselves out inside
        their canvas (constrained layout, or fixed margins), so no second drawing pass crops them ("tight")."""
        directory, name = os.path.split(artifact_path)
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / name
            figure.savefig(local, dpi=120)
            self.client.log_artifact(run_id, str(local), directory or None)

    def log_dict(self, run_id: str, data: Mapping[str, Any], artifact_path: str) -> None:
        self.client.log_dict(run_id, dict(data), artifact_path)

    def log_text(self, run_id: str, text: str, artifact_path: str) -> None:
        self.client.log_text(run_id, text, artifact_path)

    def download(self, run_id: str, artifact_path: str, destination: str | Path) -> Path:
        return Path(self.client.download_artifacts(run_id, artifact_path, str(destination)))

    def read_table(self, run_id: str, artifact_path: str) -> pa.Table:
        with tempfile.TemporaryDirectory() as tmp:
            return pq.read_table(self.download(run_id, artifact_path, tmp))

    def list_artifacts(self, run_id: str, path: str | None = None) -> list[str]:
        return [f.path for f in self.client.list_artifacts(run_id, path)]

    def children(self, parent_run_id: str) -> list:
        """Child runs of a parent, oldest first (mlflow Run objects)."""
        runs = self.client.search_runs([self.experiment_id], f"tags.`{PARENT}` = '{parent_run_id}'",
                                       max_results=10000, order_by=["attributes.start_time ASC"])
        return list(runs)

    def find_runs(self, filter_string: str) -> list:
        return list(self.client.search_runs([self.experiment_id], filter_string, max_results=10000,
                                            order_by=["attributes.start_time DESC"]))

    def get_run(self, run_id: str):
        return self.client.get_run(run_id)

    def run_exists(self, run_id: str) -> bool:
        try:
            self.client.get_run(run_id)
            return True
        except Exception:  # MLflow raises its own RESOURCE_DOES_NOT_EXIST error
            return False

    def last_step(self, run_id: str, key: str = "val/robust_acc") -> int:
        """The highest step logged for `key` (-1 when none): a resumed run logs only what comes after it."""
        history = self.client.get_metric_history(run_id, key)
        return max((m.step for m in history), default=-1)

    def ui_command(self) -> str:
        """The one command that opens the MLflow UI on this store."""
        if self.tracking_uri.startswith("http"):
            return f"open {self.tracking_uri}"
        beside = Path(sys.executable).parent / "mlflow"  # the venv's, so it works in a shell without the venv on PATH
        return f"{beside if beside.is_file() else 'mlflow'} ui --backend-store-uri {self.tracking_uri} --port 5000"
