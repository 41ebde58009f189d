"""An authenticated tracking server (a real `mlflow server`, 127.0.0.1) stopped mid-study and restarted: the
study's MLflow calls retry and nothing is lost; a user added through `nslab tracking-server --add-user` gets in,
a client without credentials is refused in one line."""

import os
import time

import pytest
from conftest import REPO
from fault_injection import Server, epochs_logged, finish, kill_group, runs, start, wait_for, write_study

from pipelines import tracking_server, train

pytestmark = pytest.mark.slow


def test_an_authenticated_server_goes_down_mid_study_lets_only_its_users_in_and_nothing_is_lost(tmp_path, capsys):
    admin = {"MLFLOW_AUTH_ADMIN_PASSWORD": "admin-password-0123"}
    server = Server(tmp_path / "server", auth=True, **admin)
    server.start()
    try:
        with pytest.MonkeyPatch.context() as env:
            for key, value in (("MLFLOW_TRACKING_USERNAME", "admin"), ("NSLAB_NEW_PASSWORD", "alice-password-0123"),
                               ("MLFLOW_TRACKING_PASSWORD", admin["MLFLOW_AUTH_ADMIN_PASSWORD"])):
                env.setenv(key, value)
            assert tracking_server.main(["--add-user", "alice", "--tracking-uri", server.uri]) == 0
        alice = {"MLFLOW_TRACKING_USERNAME": "alice", "MLFLOW_TRACKING_PASSWORD": "alice-password-0123",
                 "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}  # an integer: retries after 1, 3, 7, 15, 31, 63 s
        config = write_study(tmp_path, server.uri, study={"trials": 1, "concurrency": 1, "share_warmup": False},
                             confirm=None, experiment={"train": {"epochs": 3}, "data": {"train_limit": 512}})
        study = start(["pipelines.study", "--config", str(config), "--name", "outage"], tmp_path, **alice)
        try:
            os.environ.update(alice)
            wait_for(lambda: study.poll() is not None or any(len(epochs_logged(server.uri, r)) >= 1 for r in runs(
                server.uri) if r.data.tags.get("nslab.role") == "search"), what="a logged epoch")
            assert study.poll() is None, f"the study ended before the outage: {finish(study)[1][-3000:]}"
            server.stop()
            time.sleep(2)  # trials keep training; their MLflow calls retry with backoff
            server.start()
            code, output = finish(study)
            trials = runs(server.uri)
        finally:
            kill_group(study)
            for key in alice:
                os.environ.pop(key, None)
        assert code == 0, output[-3000:]
        assert "alice-password" not in output
        roles = sorted(r.data.tags["nslab.role"] for r in trials)
        assert roles == ["baseline", "search"] and {r.info.status for r in trials} == {"FINISHED"}
        for run in trials:
            if run.data.tags["nslab.role"] != "warmup":
                os.environ.update(alice)
                try:
                    assert epochs_logged(server.uri, run) == [1, 2, 3], run.info.run_name
                finally:
                    for key in alice:
                        os.environ.pop(key, None)
        capsys.readouterr()
        assert train.main(["--config", str(REPO / "configs/experiment/quick.yaml"), "--smoke-test", "--tracking-uri",
                           server.uri, "--runs-dir", str(tmp_path / "r")]) == 2  # no credentials in this process
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and f"the MLflow server {server.uri} refused the request: not authenticated" in lines[0]
    finally:
        server.stop()
