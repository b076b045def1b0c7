"""deploy/k8s/: the committed tree is what `meshserve deploy k8s` writes, every
rendered object (base, both overlays, the model-pvc component) validates offline
against the Kubernetes schemas of a fixed version, the offline renderer renders
only what it renders exactly, and the manifests keep the mesh's rules (singletons,
Services by name, probes, policies, non-root)."""

from __future__ import annotations

import random
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from services.supervisor.deploy_cli import stale_files
from services.supervisor.k8s_objects import CURVE_SECRET, PART_OF
from services.supervisor.kustomize import (
    KustomizeError,
    apply_json6902,
    apply_order,
    build,
    tree,
)
from services.supervisor.topology import (
    CURVE_DIR,
    IMAGE_UID,
    SERVICES,
    WORKERS,
    ZMQ_PORTS,
    binds,
    health_command,
)
from shared.config import ProcessConfig, replica_from_hostname

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "k8s"
# The Kubernetes version the manifests must be valid for (kubernetes-validate ships
# its schemas; strict: unknown fields are errors too).
K8S_VERSION = "1.33.0"
RENDERINGS = {
    "base": ("base", ()),
    "cpu": ("overlays/cpu", ()),
    "gpu": ("overlays/gpu", ()),
    "gpu+model-pvc": ("overlays/gpu", ("components/model-pvc",)),
    "cpu+model-pvc": ("overlays/cpu", ("components/model-pvc",)),
}
Obj = dict[str, Any]


def committed_files() -> dict[str, str]:
    return {str(p.relative_to(DEPLOY)): p.read_text() for p in DEPLOY.rglob("*.yaml")}


def render(name: str) -> list[Obj]:
    directory, components = RENDERINGS[name]
    return build(committed_files(), directory, components)


def by_kind(objects: list[Obj], kind: str) -> dict[str, Obj]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def container(deployment: Obj) -> Obj:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only


def env(deployment: Obj) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom"))
            for e in container(deployment).get("env", [])}


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Any attempt to resolve or connect fails the test: validation is offline."""
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access during validation: {args}")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    yield


def test_committed_tree_is_what_the_generator_writes() -> None:
    files = tree((ROOT / "otel" / "collector.yaml").read_text())
    assert stale_files(DEPLOY, files) == [], "run `meshserve deploy k8s` and commit deploy/k8s"


@pytest.mark.parametrize("name", list(RENDERINGS))
def test_every_rendered_object_validates_offline(name: str, no_network: None) -> None:
    objects = render(name)
    assert len(objects) >= 20
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            raise AssertionError(f"{obj['kind']}/{obj['metadata']['name']}: {e}") from e


def test_the_validator_rejects_what_a_cluster_would(no_network: None) -> None:
    worker = by_kind(render("gpu"), "Deployment")["worker"]
    broken = apply_json6902(worker, [{"op": "replace", "path": "/spec/replicas",
                                      "value": "two"}])
    unknown = apply_json6902(worker, [{"op": "add", "path": "/spec/replica", "value": 2}])
    for obj in (broken, unknown):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_overlays_change_only_the_worker() -> None:
    base = {(o["kind"], o["metadata"]["name"]): o for o in render("base")}
    for overlay, variant in WORKERS.items():
        rendered = {(o["kind"], o["metadata"]["name"]): o for o in render(overlay)}
        assert rendered.keys() == base.keys()
        changed = {k for k in base if base[k] != rendered[k]}
        assert changed == {("Deployment", "worker")}, overlay
        worker = rendered[("Deployment", "worker")]
        assert env(worker)["MESHSERVE_DEVICE"] == variant.device
        resources = container(worker)["resources"]
        gpus = {"requests": resources["requests"].get("nvidia.com/gpu"),
                "limits": resources["limits"].get("nvidia.com/gpu")}
        if overlay == "gpu":
            assert gpus == {"requests": "1", "limits": "1"}
            assert worker["spec"]["template"]["spec"]["tolerations"]
        else:
            assert gpus == {"requests": None, "limits": None}
    assert "MESHSERVE_DEVICE" not in env(base[("Deployment", "worker")])


def test_model_pvc_component_mounts_the_claim_where_the_model_is_read() -> None:
    objects = render("gpu+model-pvc")
    (claim,) = by_kind(objects, "PersistentVolumeClaim").values()
    for name, deployment in by_kind(objects, "Deployment").items():
        spec = deployment["spec"]["template"]["spec"]
        claims = [v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"]
                  if "persistentVolumeClaim" in v]
        if name in ("api", "tokenizer", "worker"):
            assert claims == [claim["metadata"]["name"]], name
            assert env(deployment)["MESHSERVE_MODEL"] == "/models"
            assert {"name": "model", "mountPath": "/models", "readOnly": True} in (
                container(deployment)["volumeMounts"])
        else:
            assert not claims and "MESHSERVE_MODEL" not in env(deployment), name


def test_singletons_bind_behind_services_and_replicas_scale() -> None:
    objects = render("cpu")
    deployments, services = by_kind(objects, "Deployment"), by_kind(objects, "Service")
    autoscalers = by_kind(objects, "HorizontalPodAutoscaler")
    budgets = by_kind(objects, "PodDisruptionBudget")
    for name, mesh in SERVICES.items():
        spec = deployments[name]["spec"]
        if mesh.singleton:
            assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}, name
            assert name not in budgets
        else:
            assert spec["strategy"]["type"] == "RollingUpdate", name
            assert budgets[name]["spec"]["selector"] == spec["selector"]
        exposed = [p["port"] for s in services.values()
                   if s["spec"]["selector"] == spec["selector"]["matchLabels"]
                   for p in s["spec"]["ports"]]
        assert sorted(exposed) == sorted(binds(name)), name
        ports = {p["containerPort"] for p in container(deployments[name]).get("ports", [])}
        assert ports == set(binds(name)), name
    assert set(autoscalers) == {"tokenizer", "tts"}
    for name, hpa in autoscalers.items():
        assert hpa["spec"]["scaleTargetRef"]["name"] == name
        assert "cpu" in container(deployments[name])["resources"]["requests"]
    # Replicas say hello through the ZMQ Services before a singleton is ready.
    for port in ZMQ_PORTS:
        assert services[port.service]["spec"]["publishNotReadyAddresses"] is True
    assert "publishNotReadyAddresses" not in services["api-http"]["spec"]


def test_every_address_names_a_service_that_serves_it() -> None:
    objects = render("cpu")
    services = by_kind(objects, "Service")
    deployments = by_kind(objects, "Deployment")
    for name, deployment in deployments.items():
        for key, value in env(deployment).items():
            if not (isinstance(value, str) and "://" in value):
                continue
            host, _, port = value.split("://", 1)[1].rpartition(":")
            service = services[host]
            assert int(port.split("/")[0]) in [p["port"] for p in service["spec"]["ports"]], (
                f"{name} {key}={value}")
            labels = deployments[host]["spec"]["template"]["metadata"]["labels"]
            assert service["spec"]["selector"].items() <= labels.items(), (name, key)


def test_network_policies_admit_only_mesh_pods_to_zmq_ports() -> None:
    objects = render("cpu")
    policies = by_kind(objects, "NetworkPolicy")
    deployments = by_kind(objects, "Deployment")
    mesh_labels = {"app.kubernetes.io/name": PART_OF}
    for name, mesh in SERVICES.items():
        labels = deployments[name]["spec"]["template"]["metadata"]["labels"]
        selecting = [p for p in policies.values() if _selects(p["spec"]["podSelector"], labels)]
        assert len(selecting) == 1, name
        rules = selecting[0]["spec"]["ingress"]
        for zmq in mesh.zmq_ports:
            (rule,) = [r for r in rules if {"protocol": "TCP", "port": zmq.port} in r["ports"]]
            assert rule["from"] == [{"podSelector": {"matchLabels": mesh_labels}}], name
        if not mesh.singleton:
            assert rules == [], name
    # The telemetry pods are not mesh pods: they cannot reach a ZMQ port.
    assert deployments["jaeger"]["spec"]["template"]["metadata"]["labels"][
        "app.kubernetes.io/name"] != PART_OF


def _selects(selector: Obj, labels: dict[str, str]) -> bool:
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    return all(labels.get(e["key"]) in e["values"] for e in selector.get("matchExpressions", []))


def test_pods_run_as_the_image_user_with_probes_keys_and_limits() -> None:
    deployments = by_kind(render("gpu"), "Deployment")
    for name in SERVICES:
        pod = deployments[name]["spec"]["template"]["spec"]
        one = container(deployments[name])
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == IMAGE_UID
        assert one["securityContext"]["readOnlyRootFilesystem"] is True
        assert {m["mountPath"] for m in one["volumeMounts"]} >= {"/tmp", CURVE_DIR}
        (curve,) = [v for v in pod["volumes"] if "secret" in v]
        assert curve["secret"]["secretName"] == CURVE_SECRET
        assert one["resources"]["limits"] and one["resources"]["requests"]
        probes = {k: one[k] for k in ("startupProbe", "livenessProbe", "readinessProbe")}
        if name == "api":
            assert probes["livenessProbe"]["httpGet"]["path"] == "/health/live"
            assert probes["readinessProbe"]["httpGet"]["path"] == "/health/ready"
        else:
            assert probes["readinessProbe"]["exec"]["command"] == list(health_command(name))
            assert probes["livenessProbe"]["exec"]["command"][-1] == "--live"
    for name in ("jaeger", "otel-collector"):
        assert deployments[name]["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"]


def test_the_renderer_refuses_what_it_cannot_render_exactly() -> None:
    files = committed_files()
    files["overlays/cpu/kustomization.yaml"] += "namePrefix: prod-\n"
    with pytest.raises(KustomizeError, match="namePrefix"):
        build(files, "overlays/cpu")
    files = committed_files()
    files["overlays/cpu/kustomization.yaml"] = files[
        "overlays/cpu/kustomization.yaml"].replace("name: worker", "name: nobody")
    with pytest.raises(KustomizeError, match="matches 0 objects"):
        build(files, "overlays/cpu")


def test_json6902_add_replace_remove() -> None:
    doc = {"a": [1, 2], "b": {"c/d": 1, "e": 2}}
    out = apply_json6902(doc, [
        {"op": "add", "path": "/a/-", "value": 3},
        {"op": "add", "path": "/a/0", "value": 0},
        {"op": "replace", "path": "/b/c~1d", "value": 5},
        {"op": "remove", "path": "/b/e"},
        {"op": "add", "path": "/f", "value": {"g": 1}},
    ])
    assert out == {"a": [0, 1, 2, 3], "b": {"c/d": 5}, "f": {"g": 1}}
    assert doc == {"a": [1, 2], "b": {"c/d": 1, "e": 2}}  # not changed in place
    with pytest.raises(KustomizeError):
        apply_json6902(doc, [{"op": "replace", "path": "/missing", "value": 1}])


def test_replica_ids_from_deployment_pod_names() -> None:
    # A ReplicaSet's pods: <deployment>-<pod-template-hash>-<5 random characters>.
    alphabet = "bcdfghjklmnpqrstvwxz2456789"
    rng = random.Random(13)
    names = {f"worker-7d9f8c6b5d-{''.join(rng.choices(alphabet, k=5))}" for _ in range(64)}
    ids = {replica_from_hostname(n) for n in names}
    assert len(ids) == len(names)
    assert all(0 <= i < 2**32 for i in ids)
    assert replica_from_hostname("worker-7d9f8c6b5d-x2k9p") == replica_from_hostname(
        "worker-7d9f8c6b5d-x2k9p")  # a restarted container keeps its pod name
    assert ProcessConfig(replica_from_hostname=True).replica_id() == replica_from_hostname(
        socket.gethostname())


def test_deploy_cli_checks_and_renders(tmp_path: Path) -> None:
    def meshserve(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "services.supervisor", "deploy", "k8s",
                               *args], cwd=ROOT, capture_output=True, text=True, timeout=120,
                              check=False)

    assert meshserve("--check").returncode == 0
    out = tmp_path / "k8s"
    written = meshserve("--out", str(out))
    assert written.returncode == 0, written.stderr
    (out / "base" / "tts.yaml").write_text("# edited by hand\n")
    stale = meshserve("--check", "--out", str(out))
    assert stale.returncode == 1 and "base/tts.yaml" in stale.stderr
    rendered = meshserve("--overlay", "gpu", "--component", "model-pvc")
    assert rendered.returncode == 0, rendered.stderr
    docs = list(yaml.safe_load_all(rendered.stdout))
    assert docs == apply_order(render("gpu+model-pvc"))
    kinds = [d["kind"] for d in docs]
    # What others refer to comes first: `kubectl apply -f -` creates it first.
    assert kinds.index("ConfigMap") < kinds.index("Service") < kinds.index(
        "PersistentVolumeClaim") < kinds.index("Deployment") < kinds.index("NetworkPolicy")
