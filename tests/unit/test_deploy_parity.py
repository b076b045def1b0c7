"""compose.yaml (written by hand: its comments record podman-compose quirks) and the
Kubernetes manifests (generated from services/supervisor/topology.py) describe the
same mesh: services, commands, environment, ports, healthchecks, images, keys.

compose's ``worker`` (profile cpu) is the cpu overlay's worker, ``worker-gpu``
(profile gpu) the gpu overlay's."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.supervisor.k8s_objects import COLLECTOR_IMAGE, JAEGER_IMAGE
from services.supervisor.topology import (
    API_KEY_ENV,
    API_STOP_GRACE_S,
    CURVE_DIR,
    CURVE_FILES,
    ENTRYPOINT,
    HTTP_PORT,
    IMAGE,
    SERVICES,
    WORKERS,
    health_command,
)
from tests.unit.test_deploy_k8s import by_kind, container, env, render

ROOT = Path(__file__).resolve().parents[2]
Obj = dict[str, Any]


@pytest.fixture(scope="module")
def compose() -> dict[str, Obj]:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def compose_pairs() -> list[tuple[str, str, str]]:
    """(compose service, rendering, k8s Deployment) describing the same containers."""
    pairs = [(name, "cpu", name) for name in SERVICES if name != "worker"]
    pairs += [(v.compose_service, overlay, "worker") for overlay, v in WORKERS.items()]
    return pairs


@pytest.mark.parametrize(("service", "rendering", "deployment"), compose_pairs())
def test_same_command_environment_and_healthcheck(
        compose: dict[str, Obj], service: str, rendering: str, deployment: str) -> None:
    ours = compose["services"][service]
    theirs = by_kind(render(rendering), "Deployment")[deployment]
    one = container(theirs)
    assert ours["image"] == one["image"] == IMAGE
    assert ours["command"] == one["args"]
    assert one["command"] == list(ENTRYPOINT)
    compose_env = {k: (str(v) if v is not None else None) for k, v in ours["environment"].items()}
    k8s_env = env(theirs)
    assert compose_env.keys() == k8s_env.keys(), service
    for key, value in compose_env.items():
        if value is None:  # from outside the file: compose's caller, k8s's Secret
            assert key == API_KEY_ENV and k8s_env[key]["secretKeyRef"]["optional"] is True
        else:
            assert k8s_env[key] == value, (service, key)
    assert ours["healthcheck"]["test"] == " ".join(health_command(deployment))
    probe = one["readinessProbe"]
    if "exec" in probe:
        assert probe["exec"]["command"] == list(health_command(deployment))
    else:
        ports = {p["name"]: p["containerPort"] for p in one["ports"]}
        url = f"http://127.0.0.1:{ports[probe['httpGet']['port']]}{probe['httpGet']['path']}"
        assert ours["healthcheck"]["test"].split()[-1] == url
        assert ports["http"] == HTTP_PORT == int(ours["environment"]["MESHSERVE_PORT"])


def test_same_set_of_services(compose: dict[str, Obj]) -> None:
    in_compose = set(compose["services"])
    in_k8s = set(by_kind(render("cpu"), "Deployment"))
    assert in_compose == in_k8s | {"worker-gpu"}


def test_same_published_ports_and_stop_grace(compose: dict[str, Obj]) -> None:
    objects = render("cpu")
    services = by_kind(objects, "Service")
    api = compose["services"]["api"]
    published = [p.rsplit(":", 1)[1] for p in api["ports"]]
    assert published == [str(p["port"]) for p in services["api-http"]["spec"]["ports"]]
    assert re.fullmatch(r"(\d+)s", api["stop_grace_period"]).group(1) == str(API_STOP_GRACE_S)
    pod = by_kind(objects, "Deployment")["api"]["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == API_STOP_GRACE_S
    jaeger_ui = [p.rsplit(":", 1)[1] for p in compose["services"]["jaeger"]["ports"]]
    assert jaeger_ui == ["16686"]
    assert 16686 in [p["port"] for p in services["jaeger"]["spec"]["ports"]]


def test_same_telemetry(compose: dict[str, Obj]) -> None:
    objects = render("cpu")
    deployments = by_kind(objects, "Deployment")
    collector = compose["services"]["otel-collector"]
    assert collector["image"] == container(deployments["otel-collector"])["image"] == (
        COLLECTOR_IMAGE)
    assert collector["command"] == container(deployments["otel-collector"])["args"]
    assert compose["services"]["jaeger"]["image"] == JAEGER_IMAGE
    assert container(deployments["jaeger"])["image"] == JAEGER_IMAGE
    config = by_kind(objects, "ConfigMap")["otel-collector"]["data"]["collector.yaml"]
    assert config == (ROOT / "otel" / "collector.yaml").read_text()
    source, mounted = collector["volumes"][0].split(":")[:2]
    assert source == "./otel/collector.yaml"
    mounts = container(deployments["otel-collector"])["volumeMounts"]
    assert mounted in [m["mountPath"] for m in mounts]


def test_same_keys(compose: dict[str, Obj]) -> None:
    # compose mounts secret NAME at /run/secrets/NAME: the names are the file names.
    secrets = compose["secrets"]
    assert set(secrets) == {Path(s["file"]).name for s in secrets.values()} == set(CURVE_FILES)
    for name in SERVICES:
        assert compose["services"][name]["environment"]["MESHSERVE_CURVE_DIR"] == CURVE_DIR
        assert set(compose["services"][name]["secrets"]) == set(CURVE_FILES), name
    worker = by_kind(render("gpu"), "Deployment")["worker"]
    (curve,) = [v for v in worker["spec"]["template"]["spec"]["volumes"] if "secret" in v]
    assert [i["path"] for i in curve["secret"]["items"]] == list(CURVE_FILES)


def test_dockerfile_entrypoint_is_the_manifests_command() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    (line,) = [x for x in dockerfile.splitlines() if x.startswith("ENTRYPOINT")]
    assert json.loads(line.removeprefix("ENTRYPOINT").strip()) == list(ENTRYPOINT)
    uid = re.search(r"ARG MESHSERVE_UID=(\d+)", dockerfile)
    assert uid is not None
    pod = by_kind(render("cpu"), "Deployment")["api"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == int(uid.group(1))
