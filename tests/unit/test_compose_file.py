"""compose.yaml against the compose spec (check-jsonschema's vendored schema) and
the rules the schema cannot state: dependencies exist, healthy conditions have a
healthcheck to wait on, scalable services can be scaled, one image for the mesh,
and the cpu/gpu profiles."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.api.config import ApiConfig

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose.yaml"
MESH = {"kvcache", "scheduler", "api", "tokenizer", "worker", "tts"}
SCALABLE = {"tokenizer", "worker", "tts"}


@pytest.fixture(scope="module")
def services() -> dict[str, dict[str, Any]]:
    spec = yaml.safe_load(COMPOSE.read_text())
    return spec["services"]


def _check_jsonschema() -> str | None:
    beside = Path(sys.executable).with_name("check-jsonschema")
    return str(beside) if beside.exists() else shutil.which("check-jsonschema")


def test_compose_file_matches_the_compose_spec() -> None:
    tool = _check_jsonschema()
    if tool is None:
        pytest.skip("check-jsonschema is not installed (test extra check-jsonschema==0.39.0)")
    done = subprocess.run(
        [tool, "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
        capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def _depends_on(service: dict[str, Any]) -> dict[str, dict[str, Any]]:
    deps = service.get("depends_on", {})
    if isinstance(deps, list):  # the short form: started, no condition
        return {name: {"condition": "service_started"} for name in deps}
    return deps


def test_dependencies_exist_and_healthy_ones_have_healthchecks(
        services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        for target, how in _depends_on(service).items():
            assert target in services, f"{name} depends on unknown service {target}"
            assert target != name
            if how.get("condition") == "service_healthy":
                check = services[target].get("healthcheck")
                assert check and not check.get("disable") and check.get("test"), (
                    f"{name} waits for {target} to be healthy, which has no healthcheck")


def test_dependencies_have_no_cycle(services: dict[str, dict[str, Any]]) -> None:
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, f"dependency cycle: {' -> '.join((*path, name))}"
        if name in done:
            return
        for target in _depends_on(services[name]):
            visit(target, (*path, name))
        done.add(name)

    for name in services:
        visit(name, ())


def test_scalable_services_have_no_fixed_host_ports_or_names(
        services: dict[str, dict[str, Any]]) -> None:
    for name in SCALABLE | {"worker-gpu"}:
        service = services[name]
        assert "container_name" not in service, name
        for port in service.get("ports", []):
            published = port.get("published") if isinstance(port, dict) else (
                str(port).rsplit(":", 1)[0] if ":" in str(port) else None)
            assert not published, f"{name} publishes host port {published}"


def test_one_image_for_every_mesh_service(services: dict[str, dict[str, Any]]) -> None:
    mesh = {name: s for name, s in services.items() if name in MESH or name == "worker-gpu"}
    assert set(mesh) >= MESH
    assert len({s.get("image") for s in mesh.values()}) == 1
    for name, service in mesh.items():
        base = name.removesuffix("-gpu")
        assert service["command"] in ([f"services.{base}"], f"services.{base}"), name
        assert service.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"


def test_cpu_and_gpu_profiles(services: dict[str, dict[str, Any]]) -> None:
    gpu = services["worker-gpu"]
    assert gpu["profiles"] == ["gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d.get("capabilities", []) for d in devices)
    assert gpu["environment"]["MESHSERVE_DEVICE"].startswith("cuda")
    cpu = services["worker"]
    assert cpu["profiles"] == ["cpu"] and cpu["environment"]["MESHSERVE_DEVICE"] == "cpu"
    # A plain `docker compose up` is the CPU mesh: .env selects the cpu profile.
    env_file = (ROOT / ".env").read_text().splitlines()
    assert "COMPOSE_PROFILES=cpu" in env_file
    # Everything else runs in either profile.
    for name, service in services.items():
        if name not in ("worker", "worker-gpu"):
            assert "profiles" not in service, name


def _seconds(duration: str) -> float:
    """A compose duration such as ``45s``, ``1m30s`` or ``500ms`` in seconds."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * units[u] for n, u in parts)


def test_api_drains_within_its_stop_grace_period(services: dict[str, dict[str, Any]]) -> None:
    api = services["api"]
    defaults = ApiConfig()
    # The runtime SIGKILLs after stop_grace_period: the drain (and the grace for the
    # requests it then fails) must fit in it, with a second to exit.
    assert _seconds(api["stop_grace_period"]) >= (
        defaults.shutdown_timeout_s + defaults.shutdown_grace_s + 1)
    assert "/health/ready" in api["healthcheck"]["test"]


def _needs(services: dict[str, dict[str, Any]], name: str) -> set[str]:
    """Every service ``name`` depends on, directly or through others."""
    found: set[str] = set()
    todo = list(_depends_on(services[name]))
    while todo:
        target = todo.pop()
        if target not in found:
            found.add(target)
            todo.extend(_depends_on(services[target]))
    return found


def test_the_api_stops_first_and_drains_with_the_mesh_still_there(
        services: dict[str, dict[str, Any]]) -> None:
    # Compose stops a service before what it depends on. The api depends on every
    # other mesh service, so `down` stops it first and its drain still has
    # tokenizers, workers and the scheduler to finish the requests in flight.
    others = (MESH | {"worker-gpu"}) - {"api"}
    assert _needs(services, "api") >= others, _needs(services, "api")
    for name in services:
        assert "api" not in _needs(services, name), f"{name} would stop after the api"
    # The replicas' readiness needs the api: the api waits only for them to start.
    for name in SCALABLE | {"worker-gpu"}:
        assert _depends_on(services["api"])[name]["condition"] == "service_started", name
    # Either worker exists, by profile.
    for name in ("worker", "worker-gpu"):
        assert _depends_on(services["api"])[name]["required"] is False, name
