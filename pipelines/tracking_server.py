"""Run one MLflow tracking server for many writers (a big local study, or the head of a Ray cluster).

    python -m pipelines.tracking_server --store ~/nslab-state                       # 127.0.0.1:5000, no auth
    MLFLOW_AUTH_ADMIN_PASSWORD=... python -m pipelines.tracking_server --store ~/nslab-state --auth
    MLFLOW_TRACKING_USERNAME=admin MLFLOW_TRACKING_PASSWORD=... NSLAB_NEW_PASSWORD=... \\
        python -m pipelines.tracking_server --add-user alice --tracking-uri http://127.0.0.1:5000

The store (runs in SQLite, artifacts served by the server) lives in --store. With --auth the server is
MLflow's basic-auth app: only its users get in. Secrets come from the environment, never from the command
line (which `ps` shows) or a config file: the admin password from MLFLOW_AUTH_ADMIN_PASSWORD (12+
characters), a new user's password from NSLAB_NEW_PASSWORD, and clients (studies, `ray job submit`) log in
with MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD. The server listens on 127.0.0.1 unless --host
says otherwise (a cluster head: its private address). Stop it with SIGTERM (Ctrl+C).

Every request of a study (each trial logs its epochs, tags and artifacts) carries the password, and MLflow
checks it against a deliberately slow hash (scrypt: 0.1 CPU-seconds here). With --auth the server keeps a
checked password for --auth-cache-seconds (default 60, MLflow's `auth_cache_ttl_seconds`; 0: check every
request), so the hash runs about once a minute per user instead of on every request (docs/studies.md: the
outage test's study cost the server 47 CPU-seconds without it, 7 with it). The price, as MLflow documents it:
with several --workers, a changed or revoked password may still work on the other workers for up to that long.
"""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path

from pipelines._common import Parser, non_negative_int, positive_int, run_cli, setup_logging, writable_dir


def build_parser() -> Parser:
    parser = Parser("tracking_server", description=__doc__)
    parser.add_argument("--store", help="folder for the server's database(s) and artifacts (created if missing)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine)")
    parser.add_argument("--port", type=positive_int, default=5000, help="port (default 5000)")
    parser.add_argument("--auth", action="store_true", help="MLflow's basic-auth app: users and passwords")
    parser.add_argument("--auth-cache-seconds", type=non_negative_int, default=None, metavar="S",
                        help=f"with --auth: keep a checked password for S seconds instead of hashing it on every "
                             f"request (default {AUTH_CACHE_SECONDS}; 0: check every request; a revoked password may "
                             "still work for up to S seconds on the other workers)")
    parser.add_argument("--workers", type=positive_int, default=2, help="server worker processes (default 2)")
    parser.add_argument("--add-user", metavar="NAME", help="create a user on a running --auth server and exit")
    parser.add_argument("--tracking-uri", default="http://127.0.0.1:5000", help="the server, for --add-user")
    parser.add_argument("--dry-run", action="store_true", help="print the server command and exit")
    return parser


AUTH_CACHE_SECONDS = 60


def server_command(store: Path, host: str, port: int, auth: bool, workers: int,
                   auth_cache_seconds: int = AUTH_CACHE_SECONDS) -> tuple[list[str], dict[str, str]]:
    """The `mlflow server` argv and environment (secrets only in the environment)."""
    env = dict(os.environ)
    # MLflow 3's GenAI job runner (six huey worker processes) serves nothing nslab logs: leave it off
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    argv = [sys.executable, "-m", "mlflow", "server", "--host", host, "--port", str(port),
            "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}", "--serve-artifacts",
            "--artifacts-destination", str(store / "artifacts"), "--workers", str(workers)]
    if auth:
        password = env.get("MLFLOW_AUTH_ADMIN_PASSWORD", "")
        if len(password) < 12:
            raise ValueError("--auth needs the admin password in $MLFLOW_AUTH_ADMIN_PASSWORD (12 characters or more); "
                             "MLflow refuses shorter ones")
        ini = store / "basic_auth.ini"
        ini.write_text("[mlflow]\ndefault_permission = READ\n"
                       f"database_uri = sqlite:///{store / 'basic_auth.db'}\n"
                       f"admin_username = {env.get('MLFLOW_AUTH_ADMIN_USERNAME', 'admin')}\n"
                       "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                       f"auth_cache_ttl_seconds = {auth_cache_seconds}\n")
        env["MLFLOW_AUTH_CONFIG_PATH"] = str(ini)
        env.setdefault("MLFLOW_FLASK_SERVER_SECRET_KEY", secrets.token_hex(32))  # CSRF protection of the auth app
        argv += ["--app-name", "basic-auth"]
    return argv, env


def add_user(name: str, tracking_uri: str) -> None:
    from mlflow.server import get_app_client

    password = os.environ.get("NSLAB_NEW_PASSWORD", "")
    if len(password) < 12:
        raise ValueError("--add-user reads the new password from $NSLAB_NEW_PASSWORD (12 characters or more)")
    if not os.environ.get("MLFLOW_TRACKING_USERNAME"):
        raise ValueError("--add-user logs in as the admin: set MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD")
    get_app_client("basic-auth", tracking_uri=tracking_uri).create_user(name, password)
    print(f"user {name!r} created on {tracking_uri}")


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    if args.add_user:
        add_user(args.add_user, args.tracking_uri)
        return 0
    if not args.store:
        raise ValueError("pass --store DIR: the folder for the server's database and artifacts")
    if args.auth_cache_seconds is not None and not args.auth:
        raise ValueError("--auth-cache-seconds applies only with --auth (a server without users checks no passwords)")
    store = writable_dir(args.store, "tracking store folder")
    cache = AUTH_CACHE_SECONDS if args.auth_cache_seconds is None else args.auth_cache_seconds
    command, env = server_command(store, args.host, args.port, args.auth, args.workers, cache)
    if args.dry_run:
        print(" ".join(command))
        return 0
    print(f"MLflow server on http://{args.host}:{args.port} ({'users only' if args.auth else 'no auth'}), "
          f"store {store}", flush=True)
    os.execvpe(command[0], command, env)  # the server takes this process over: its PID is ours


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
