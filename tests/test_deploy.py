"""Offline checks of the Kubernetes (KubeRay) manifests in deploy/kuberay/: no cluster, no network, seconds.

A manifest that only fails on a real cluster costs a GPU node pool and an afternoon, so this test checks what can
be checked without one:

- Schema: every RayJob and RayCluster document validates against the openAPIV3Schema of KubeRay's own CRD,
  vendored unmodified in deploy/kuberay/crds/ (their git blob ids are pinned in crds/README.md). The schema is
  validated the way the API server does under `kubectl apply`'s default strict field validation: a field the
  CRD does not declare is an error (unless `x-kubernetes-preserve-unknown-fields`), `int-or-string` fields take
  either, `nullable` admits null, int32/int64 formats are range-checked; the other `x-kubernetes-*` keys and
  the few CEL rules (`x-kubernetes-validations`, none on a field these manifests set) are not evaluated.
  Broken copies (a misspelled field, a wrong type, a missing required field, a value outside an enum or int32)
  must fail, so the check itself is shown to bite.
- nslab: the RayJob's entrypoint, and the MLflow sidecar's command, are `python -m pipelines.<module> ...` with
  an existing module whose own `build_parser()` accepts the arguments, and the `--config` they name exists and
  loads; the Ray image and `rayVersion` match the `ray` pin of pyproject.toml (and the sidecar's mlflow pin its
  mlflow pin); the sidecar's server needs nothing beyond what it installs.
- Cluster design: no password in a manifest (env vars named *PASSWORD* come from `secretKeyRef`, to keys the
  example Secret defines, whose placeholders the server refuses); the GPU worker group requests
  `nvidia.com/gpu` and is autoscaled from zero, and a study trial fits on one worker; head and workers mount
  the same ReadWriteMany PVC at the same path, and the study's `--storage` and the server's `--store` lie on
  it; the tracking URI is the head Service KubeRay creates, on a port the head declares, and MLflow's
  host check admits it; the runtime env is one Ray 2.60 accepts and installs the same commit the server runs.
"""

from __future__ import annotations

import copy
import fnmatch
import functools
import hashlib
import importlib
import json
import re
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy" / "kuberay"
CRDS = DEPLOY / "crds"
CRD_FILES = {"RayJob": CRDS / "ray.io_rayjobs.yaml", "RayCluster": CRDS / "ray.io_rayclusters.yaml"}
MANIFESTS = sorted(DEPLOY.glob("*.yaml"))
SECRET_EXAMPLE = DEPLOY / "secret.example.yaml"
PVC_FILE = DEPLOY / "pvc.yaml"
Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 2.3 MB of YAML: libyaml reads them in < 1 s


# ---------------------------------------------------------------------------------------------- loading


def load_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.load_all(path.read_text(), Loader=Loader) if doc]


def ray_documents() -> list[tuple[str, dict[str, Any]]]:
    """(label, document) for every RayJob / RayCluster under deploy/kuberay/ (not the CRDs)."""
    found = [(f"{path.name}:{doc['kind']}", doc) for path in MANIFESTS for doc in load_documents(path)
             if doc.get("kind") in CRD_FILES]
    assert found, f"no RayJob or RayCluster manifest in {DEPLOY}"
    return found


RAY_DOCS = ray_documents()
RAY_IDS = [label for label, _ in RAY_DOCS]


def cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def pod_specs(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """('head' | worker group name, pod spec)."""
    spec = cluster_spec(doc)
    yield "head", spec["headGroupSpec"]["template"]["spec"]
    for group in spec.get("workerGroupSpecs", []):
        yield group["groupName"], group["template"]["spec"]


def containers(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for _, pod in pod_specs(doc):
        yield from pod.get("initContainers", [])
        yield from pod["containers"]


def env_value(container: dict[str, Any], name: str) -> str | None:
    return next((e.get("value") for e in container.get("env", []) if e["name"] == name), None)


def head_pod(doc: dict[str, Any]) -> dict[str, Any]:
    return cluster_spec(doc)["headGroupSpec"]["template"]["spec"]


def sidecar(doc: dict[str, Any]) -> dict[str, Any]:
    found = [c for c in head_pod(doc)["containers"] if "pipelines.tracking_server" in json.dumps(c)]
    assert len(found) == 1, "the head pod must run exactly one container with the MLflow tracking server"
    return found[0]


def pyproject_pin(package: str) -> str:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in deps:
        match = re.fullmatch(rf"{re.escape(package)}(\[[^\]]*\])?==([\w.]+)", dep.replace(" ", ""))
        if match:
            return match.group(2)
    raise AssertionError(f"pyproject.toml pins no {package}==...")


# ------------------------------------------------------------------------------------ CRD -> JSON Schema


def to_json_schema(node: dict[str, Any], closed: bool = True) -> dict[str, Any]:
    """A Kubernetes structural schema (OpenAPI v3 subset) as a Draft 7 JSON Schema, as the API server applies it
    with strict field validation: undeclared fields are errors, `x-kubernetes-*` keys are dropped after use.
    `closed` is False inside anyOf/allOf/oneOf/not, whose branches only add checks to fields declared outside."""
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-") or key in ("description", "nullable"):
            continue
        if key == "properties":
            out[key] = {name: to_json_schema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            out[key] = to_json_schema(value)
        elif key == "not":
            out[key] = to_json_schema(value, closed=False)
        elif key in ("anyOf", "allOf", "oneOf"):
            out[key] = [to_json_schema(sub, closed=False) for sub in value]
        else:
            out[key] = value
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in node:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
    if closed and "properties" in node and "additionalProperties" not in node \
            and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


FORMATS = jsonschema.FormatChecker(formats=())


@FORMATS.checks("int32")
def _int32(value: object) -> bool:
    return not isinstance(value, int) or -(2**31) <= value < 2**31


@FORMATS.checks("int64")
def _int64(value: object) -> bool:
    return not isinstance(value, int) or -(2**63) <= value < 2**63


@functools.cache
def crd(kind: str) -> dict[str, Any]:
    return yaml.load(CRD_FILES[kind].read_text(), Loader=Loader)


@functools.cache
def validator(kind: str, api_version: str = "ray.io/v1") -> jsonschema.Draft7Validator:
    definition = crd(kind)
    group, version = api_version.split("/")
    assert definition["spec"]["group"] == group and definition["spec"]["names"]["kind"] == kind
    served = {v["name"]: v for v in definition["spec"]["versions"] if v.get("served")}
    assert version in served, f"{kind} {api_version} is not served by the vendored CRD (served: {sorted(served)})"
    schema = to_json_schema(served[version]["schema"]["openAPIV3Schema"])
    jsonschema.Draft7Validator.check_schema(schema)  # the conversion yields a well-formed schema
    return jsonschema.Draft7Validator(schema, format_checker=FORMATS)


def schema_errors(doc: dict[str, Any]) -> list[str]:
    errors = validator(doc["kind"], doc["apiVersion"]).iter_errors(doc)
    return sorted(f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message[:200]}" for e in errors)


# ------------------------------------------------------------------------------------------------ tests


def test_crds_are_the_pinned_upstream_files() -> None:
    readme = (CRDS / "README.md").read_text()
    pinned = dict(re.findall(r"^\| `([^`]+)` \| `[^`]+` \| `([0-9a-f]{40})` \|$", readme, flags=re.M))
    assert set(pinned) == {"ray.io_rayjobs.yaml", "ray.io_rayclusters.yaml", "LICENSE"}, pinned
    for name, blob in pinned.items():
        data = (CRDS / name).read_bytes()
        assert hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest() == blob, f"{name} differs from upstream"
    assert "Apache License" in (CRDS / "LICENSE").read_text()[:200]
    version = re.search(r"\*\*KubeRay v(\d+\.\d+\.\d+)\*\*", readme)
    assert version, "crds/README.md must name the KubeRay release"
    docs = (REPO / "docs" / "kubernetes.md").read_text()
    assert f"--version {version.group(1)}" in docs, "docs/kubernetes.md must install the operator of the vendored CRDs"


@pytest.mark.parametrize("doc", [doc for _, doc in RAY_DOCS], ids=RAY_IDS)
def test_manifest_matches_kuberay_crd(doc: dict[str, Any]) -> None:
    assert schema_errors(doc) == []


def _rename(obj: dict[str, Any], old: str, new: str) -> None:
    obj[new] = obj.pop(old)


def _first_worker(doc: dict[str, Any]) -> dict[str, Any]:
    return cluster_spec(doc)["workerGroupSpecs"][0]


BREAKAGES: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    # name: (how to break a copy of the RayJob, the path the schema error must point at)
    "misspelled rayClusterSpec": (lambda d: _rename(d["spec"], "rayClusterSpec", "rayClusterSpc"), "spec"),
    "replicas as text": (lambda d: _first_worker(d).update(replicas="two"), "workerGroupSpecs.0.replicas"),
    "rayStartParams value not a string": (
        lambda d: cluster_spec(d)["headGroupSpec"]["rayStartParams"].update({"num-gpus": 0}),
        "rayStartParams.num-gpus"),
    "no maxReplicas": (lambda d: _first_worker(d).pop("maxReplicas"), "workerGroupSpecs.0"),
    "unknown auth mode": (lambda d: cluster_spec(d)["authOptions"].update(mode="password"), "authOptions.mode"),
    "maxReplicas beyond int32": (
        lambda d: _first_worker(d).update(maxReplicas=2**31), "workerGroupSpecs.0.maxReplicas"),
    "misspelled container field": (
        lambda d: _rename(_first_worker(d)["template"]["spec"]["containers"][0], "resources", "resource"),
        "containers.0"),
}


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_broken_copy_fails_schema(breakage: str) -> None:
    job = next(doc for _, doc in RAY_DOCS if doc["kind"] == "RayJob")
    broken = copy.deepcopy(job)
    mutate, where = BREAKAGES[breakage]
    mutate(broken)
    errors = schema_errors(broken)
    assert errors, f"a RayJob with {breakage} passed schema validation: the check does not bite"
    assert any(where in error.split(":")[0] for error in errors), errors


def _shell_commands(text: str) -> list[list[str]]:
    """The simple commands of a shell string (split at ; && || | and newlines), a leading `exec` dropped."""
    lexer = shlex.shlex(text, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token in (";", "&&", "||", "|", "&"):
            commands.append([])
        else:
            commands[-1].append(token)
    return [cmd[1:] if cmd[:1] == ["exec"] else cmd for cmd in commands if cmd]


def check_nslab_command(argv: list[str]) -> tuple[str, Any]:
    """`python -m pipelines.<module> ARGS`: the module exists, its parser takes ARGS, --config exists and loads."""
    assert argv[:2] == ["python", "-m"] and len(argv) > 2 and argv[2].startswith("pipelines."), \
        f"not an nslab command: {shlex.join(argv)}"
    module = argv[2].removeprefix("pipelines.")
    assert (REPO / "pipelines" / f"{module}.py").is_file(), f"pipelines/{module}.py does not exist"
    parser = importlib.import_module(f"pipelines.{module}").build_parser()
    try:
        args = parser.parse_args(argv[3:])
    except SystemExit as exc:  # nslab's parsers exit 2 with a one-line error on stderr
        raise AssertionError(f"pipelines.{module} rejects {shlex.join(argv[3:])} (exit {exc.code})") from None
    config = getattr(args, "config", None)
    if config is not None:
        assert (REPO / config).is_file(), f"--config {config} does not exist in the repository"
        if module == "study":
            from orchestrator.config.loader import load_config
            from orchestrator.config.study import StudyFile

            return module, (args, load_config(REPO / config, StudyFile))
    return module, (args, None)


@pytest.mark.parametrize("doc", [doc for _, doc in RAY_DOCS if doc["kind"] == "RayJob"],
                         ids=[label for label, doc in RAY_DOCS if doc["kind"] == "RayJob"])
def test_rayjob_entrypoint_is_a_real_study(doc: dict[str, Any]) -> None:
    commands = _shell_commands(doc["spec"]["entrypoint"])
    assert len(commands) == 1, f"the entrypoint should be one nslab command, not {commands}"
    module, (args, study) = check_nslab_command(commands[0])
    assert module == "study" and study is not None
    assert args.keep_gpu, "--keep-gpu: GPU workers scale from zero, so the study must keep its GPU request"
    assert args.storage, "--storage: trials on several pods need the shared PVC for their results"
    # One trial must fit on one GPU worker, or it waits forever.
    for name, pod in pod_specs(doc):
        if name == "head":
            continue
        limits = pod["containers"][0]["resources"]["limits"]
        assert study.study.resources.gpu <= int(limits["nvidia.com/gpu"]), f"a trial needs more GPU than {name} has"
        assert study.study.resources.cpu <= float(limits["cpu"]), f"a trial needs more CPU than {name} has"


def test_commands_in_kubernetes_docs_are_real() -> None:
    """Every `python -m pipelines.<module> ...` in docs/kubernetes.md's code blocks parses as in the manifests."""
    blocks = re.findall(r"^```[a-z]*\n(.*?)^```", (REPO / "docs" / "kubernetes.md").read_text(), flags=re.M | re.S)
    found = 0
    for line in "\n".join(blocks).replace("\\\n", " ").splitlines():
        start = line.find("python -m pipelines.")
        if start >= 0:
            command = re.split(r"\s#\s", line[start:])[0]  # drop a trailing comment
            check_nslab_command(_shell_commands(command)[0])
            found += 1
    assert found >= 2, "docs/kubernetes.md shows no nslab command"


@pytest.mark.parametrize("doc", [doc for _, doc in RAY_DOCS], ids=RAY_IDS)
def test_head_runs_the_authenticated_tracking_server(doc: dict[str, Any]) -> None:
    server = sidecar(doc)
    script = " ".join(server.get("command", []) + server.get("args", []))
    commands = [cmd for cmd in _shell_commands(script) if "pipelines.tracking_server" in cmd]
    assert len(commands) == 1
    module, (args, _) = check_nslab_command(commands[0])
    assert module == "tracking_server" and args.auth and args.host == "0.0.0.0"
    ports = {p["containerPort"] for c in head_pod(doc)["containers"] for p in c.get("ports", [])}
    assert args.port in ports, f"the server's port {args.port} is not declared on the head"
    # The sidecar installs mlflow at pyproject's pin and nslab without its dependencies.
    assert f'"mlflow[auth]=={pyproject_pin("mlflow")}"' in script
    assert re.search(r"pip install [^;]*--no-deps \"\$NSLAB_SOURCE\"", script), script


@pytest.mark.slow
def test_tracking_server_needs_only_what_the_sidecar_installs() -> None:
    """The sidecar gets mlflow[auth] and nslab --no-deps on the Ray image (which has pydantic and pyyaml): the
    server's module must not import torch, numpy, ray, ... at start-up."""
    code = ("import json, sys, sysconfig; before = set(sys.modules); import pipelines.tracking_server; "
            "sp = (sysconfig.get_paths()['purelib'], sysconfig.get_paths()['platlib']); "
            "print(json.dumps(sorted({n.split('.')[0] for n, m in list(sys.modules.items()) "
            "if n not in before and (getattr(m, '__file__', None) or '').startswith(sp)})))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60, check=True)
    third_party = set(json.loads(out.stdout))
    allowed = {"pydantic", "pydantic_core", "annotated_types", "typing_extensions", "typing_inspection", "yaml",
               "_yaml", "mlflow"}
    assert third_party <= allowed, (f"pipelines.tracking_server now imports {sorted(third_party - allowed)} at "
                                    "start-up; the MLflow sidecar in deploy/kuberay/ does not install them")


def _images() -> Iterator[tuple[str, str]]:
    for path in MANIFESTS:
        for doc in load_documents(path):
            for match in re.finditer(r'"image": "([^"]+)"', json.dumps(doc)):
                yield path.name, match.group(1)


def test_ray_version_matches_pyproject() -> None:
    ray_pin = pyproject_pin("ray")
    python = re.search(r">=\s*(\d+)\.(\d+)", tomllib.loads((REPO / "pyproject.toml").read_text())
                       ["project"]["requires-python"])
    assert python
    images = list(_images())
    assert images
    for name, image in images:
        match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)(-gpu)?", image)
        assert match, f"{name}: {image} is not a rayproject/ray:<version>-py<XY>[-gpu] image"
        assert match.group(1) == ray_pin, f"{name}: {image} runs Ray {match.group(1)}, pyproject pins ray=={ray_pin}"
        assert match.group(2, 3) == python.group(1, 2), f"{name}: {image} is not Python {'.'.join(python.groups())}"
    for label, doc in RAY_DOCS:
        assert cluster_spec(doc)["rayVersion"] == ray_pin, f"{label}: rayVersion differs from the ray pin"
        workers = [pod["containers"][0]["image"] for name, pod in pod_specs(doc) if name != "head"]
        assert workers, f"{label}: no worker group"
        assert all(image.endswith("-gpu") for image in workers), f"{label}: GPU workers need a -gpu image"


def test_no_password_in_any_manifest() -> None:
    secret = next(doc for doc in load_documents(SECRET_EXAMPLE) if doc["kind"] == "Secret")
    keys = set(secret.get("stringData", {})) | set(secret.get("data", {}))
    refs = 0
    for path in MANIFESTS:
        if path == SECRET_EXAMPLE:
            continue
        for doc in load_documents(path):
            for text in re.findall(r'"((?:[^"\\]|\\.)*)"', json.dumps(doc)):  # every string, keys included
                assert not re.search(r"(PASSWORD|TOKEN)\s*[=:]\s*[^\s$\"']", text, flags=re.I), \
                    f"{path.name}: a literal credential: {text[:80]}"
            for env in _all_env(doc):
                if "PASSWORD" in env["name"].upper() or "TOKEN" in env["name"].upper():
                    ref = env.get("valueFrom", {}).get("secretKeyRef")
                    assert "value" not in env and ref, f"{path.name}: {env['name']} must come from a secretKeyRef"
                    if "PASSWORD" in env["name"].upper():
                        assert ref["name"] == secret["metadata"]["name"] and ref["key"] in keys, \
                            f"{path.name}: {env['name']} reads {ref}, which secret.example.yaml does not define"
                        refs += 1
    assert refs, "no credential is read from the Secret at all"


def _all_env(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    def walk(node: Any) -> Iterator[dict[str, Any]]:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "env" and isinstance(value, list):
                    yield from value
                else:
                    yield from walk(value)
        elif isinstance(node, list):
            for item in node:
                yield from walk(item)

    yield from walk(doc)
    if doc.get("kind") == "RayJob":  # the runtime env's env_vars are plain text in the manifest
        runtime_env = yaml.safe_load(doc["spec"].get("runtimeEnvYAML") or "{}")
        yield from ({"name": k, "value": v} for k, v in runtime_env.get("env_vars", {}).items())


def test_secret_example_holds_only_placeholders(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from pipelines.tracking_server import server_command

    text = SECRET_EXAMPLE.read_text()
    assert "EXAMPLE ONLY" in text.splitlines()[0]
    (secret,) = load_documents(SECRET_EXAMPLE)
    assert secret["kind"] == "Secret" and "nslab/example" in secret["metadata"]["annotations"]
    values = secret.get("stringData", {})
    assert set(values) == {"MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"}
    for key in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_TRACKING_PASSWORD"):
        assert "CHANGE-ME" in values[key], f"{key}: use a visible placeholder"
    # The server refuses the placeholder, so a cluster started with the example cannot run with it.
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", values["MLFLOW_AUTH_ADMIN_PASSWORD"])
    with pytest.raises(ValueError, match="12 characters"):
        server_command(tmp_path, "0.0.0.0", 5000, auth=True, workers=1)


@pytest.mark.parametrize("doc", [doc for _, doc in RAY_DOCS], ids=RAY_IDS)
def test_gpu_workers_autoscale_from_zero(doc: dict[str, Any]) -> None:
    spec = cluster_spec(doc)
    assert spec.get("enableInTreeAutoscaling") is True
    assert spec["workerGroupSpecs"], "no worker group"
    for group in spec["workerGroupSpecs"]:
        resources = group["template"]["spec"]["containers"][0]["resources"]
        assert int(resources["limits"]["nvidia.com/gpu"]) >= 1, f"{group['groupName']}: no nvidia.com/gpu limit"
        assert group["minReplicas"] == 0, f"{group['groupName']}: GPU workers should scale from zero"
        assert group.get("replicas", 0) <= group["maxReplicas"] and group["maxReplicas"] > 0
        # KubeRay refuses resources in both rayStartParams and the group's `resources` (validation.go).
        params = group.get("rayStartParams", {})
        assert not ({"num-cpus", "num-gpus", "memory", "resources"} & set(params) and group.get("resources"))
    head = head_pod(doc)["containers"][0]["resources"]
    assert "nvidia.com/gpu" not in head.get("limits", {}), "the head is the CPU node"


@pytest.mark.parametrize("doc", [doc for _, doc in RAY_DOCS], ids=RAY_IDS)
def test_head_and_workers_share_the_pvc(doc: dict[str, Any]) -> None:
    (pvc,) = load_documents(PVC_FILE)
    assert pvc["kind"] == "PersistentVolumeClaim" and pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    claim = pvc["metadata"]["name"]
    mounts = set()
    for name, pod in pod_specs(doc):
        volumes = {v["name"] for v in pod["volumes"] if v.get("persistentVolumeClaim", {}).get("claimName") == claim}
        assert volumes, f"{name} does not mount the PVC {claim}"
        paths = {m["mountPath"] for m in pod["containers"][0]["volumeMounts"] if m["name"] in volumes}
        assert len(paths) == 1, f"{name}'s Ray container mounts {claim} at {paths or 'no path'}"
        mounts |= paths
    assert len(mounts) == 1, f"head and workers mount {claim} at different paths: {mounts}"
    mount = Path(mounts.pop())
    server = sidecar(doc)
    store = re.search(r"--store (\S+)", " ".join(server.get("args", [])))
    assert store and mount in Path(store.group(1)).parents, "the MLflow store is not on the PVC"
    assert any(m["mountPath"] == str(mount) for m in server["volumeMounts"])
    if doc["kind"] == "RayJob":
        storage = re.search(r"--storage (\S+)", doc["spec"]["entrypoint"])
        assert storage and mount in Path(storage.group(1)).parents, "the study's --storage is not on the PVC"


@pytest.mark.parametrize("doc", [doc for _, doc in RAY_DOCS], ids=RAY_IDS)
def test_tracking_uri_is_the_head_service(doc: dict[str, Any]) -> None:
    # KubeRay v1.7.0 (utils.GenerateHeadServiceName): RayJob and RayCluster heads are served as <name>-head-svc,
    # with the ports of the head's Ray container (common/service.go, getPortsFromCluster).
    service = f"{doc['metadata']['name']}-head-svc"
    port = next(p["containerPort"] for p in head_pod(doc)["containers"][0]["ports"] if p["name"] == "mlflow")
    uri = f"http://{service}:{port}"
    for container in containers(doc):
        if container is not sidecar(doc):
            assert env_value(container, "MLFLOW_TRACKING_URI") == uri, f"{container['name']}: tracking URI != {uri}"
    if doc["kind"] == "RayJob":
        assert re.search(rf"--tracking-uri {re.escape(uri)}(\s|$)", doc["spec"]["entrypoint"])
    # MLflow 3 rejects Host headers outside MLFLOW_SERVER_ALLOWED_HOSTS (mlflow.server.security_utils:
    # fnmatch patterns, `*` allows all); the pods' and the port-forwarded browser's must pass.
    allowed = [h.strip() for h in (env_value(sidecar(doc), "MLFLOW_SERVER_ALLOWED_HOSTS") or "").split(",")]
    for host in (f"{service}:{port}", f"127.0.0.1:{port}", f"localhost:{port}"):
        assert any(fnmatch.fnmatch(host, pattern) for pattern in allowed), f"MLflow would refuse Host {host}"
    # KubeRay's name limits (RayJob names leave room for the generated cluster's suffix) and DNS-1035.
    name, limit = doc["metadata"]["name"], 47 if doc["kind"] == "RayJob" else 53
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= limit, f"{name}: not a valid name"


@pytest.mark.parametrize("doc", [doc for _, doc in RAY_DOCS if doc["kind"] == "RayJob"],
                         ids=[label for label, doc in RAY_DOCS if doc["kind"] == "RayJob"])
def test_rayjob_runtime_env(doc: dict[str, Any]) -> None:
    from ray.runtime_env import RuntimeEnv

    spec = doc["spec"]
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    RuntimeEnv(**runtime_env)  # Ray 2.60's own validation of the fields
    working_dir = runtime_env["working_dir"]
    assert re.fullmatch(r"(https|s3|gs)://\S+\.zip", working_dir), \
        f"working_dir {working_dir}: the submitter pod has no checkout, so it must be a remote .zip"
    assert runtime_env["pip"]["packages"] == ["${RAY_RUNTIME_ENV_CREATE_WORKING_DIR}"], "pip must install nslab"
    assert runtime_env["env_vars"]["NSLAB_GIT_COMMIT"] in working_dir, "NSLAB_GIT_COMMIT is not the zip's commit"
    assert env_value(sidecar(doc), "NSLAB_SOURCE") == working_dir, "the MLflow server runs other code than the job"
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec.get("ttlSecondsAfterFinished", -1) >= 0, "without ttlSecondsAfterFinished the job is never deleted"
