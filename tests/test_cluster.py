"""The cluster path: ray_cluster.yaml passes Ray's own cluster-config validation (no cloud calls). A study
running as a `ray job submit` job on a real `ray start --head` is tests/test_sequential.py's (the conftest's
`ray_head`); the KubeRay manifests are tests/test_deploy.py's."""

import yaml
from conftest import REPO


def test_cluster_config_passes_ray_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())
    config = prepare_config(raw)  # merges Ray's AWS defaults, as `ray up` does before it calls the cloud
    validate_config(config)  # jsonschema of ray-schema.json + Ray's own consistency checks
    head = config["available_node_types"][config["head_node_type"]]
    workers = [t for name, t in config["available_node_types"].items() if name != config["head_node_type"]]
    assert "GPU" not in head.get("resources", {}) and workers and workers[0]["max_workers"] >= 1
    assert any("pip install" in c and "-e ." in c for c in config["setup_commands"])
    assert "." in config["file_mounts"].values()
    starts = " ".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    assert "pipelines.tracking_server" in starts and "--auth" in starts  # the head's MLflow lets only its users in
    assert "PASSWORD=" not in starts and "mlflow.env" in starts  # credentials from a mounted file, never a command
