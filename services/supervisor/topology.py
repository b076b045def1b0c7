"""The mesh as containers see it: one source of truth for compose.yaml and the
Kubernetes manifests (``deploy/k8s/``, written by `meshserve deploy k8s`).

Which services exist, which are singletons, the ports the singletons bind and the
``tcp://<service>:<port>`` addresses replicas connect to, each service's command,
environment, probes and resources. Pure data, no I/O: the manifest generator
(``k8s_objects.py``) builds from it and the tests check compose.yaml against it,
so the two deployments cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.supervisor.mesh_plan import SCALABLE, SINGLETONS, START_ORDER
from shared.config import env_name

IMAGE = "meshserve:latest"
# The Dockerfile's ENTRYPOINT: a service's command is the module it runs.
ENTRYPOINT = ("python", "-m")
# The Dockerfile's user (MESHSERVE_UID) and its home (torch and Triton caches).
IMAGE_UID = 1000
IMAGE_HOME = "/home/meshserve"
# Where a container finds the mesh's CURVE keys (compose secrets, a k8s Secret).
CURVE_DIR = "/run/secrets"
CURVE_FILES = ("server.key_secret", "client.key_secret")
OTEL_ENDPOINT = "http://otel-collector:4317"
HTTP_PORT = 8000
# compose's start_period and the probes' cadence (interval, timeout, retries).
START_PERIOD_S = 60
PROBE_PERIOD_S = 5
PROBE_TIMEOUT_S = 5
PROBE_FAILURES = 3
# The api drains for MESHSERVE_SHUTDOWN_TIMEOUT_S (30 s) plus its grace (5 s) on
# SIGTERM; the runtime must not SIGKILL it before (compose's stop_grace_period).
API_STOP_GRACE_S = 45
HEALTHCHECK = ("python", "-m", "shared.healthcheck")
# Set from outside the file (compose: the caller's environment; k8s: an optional
# Secret): MESHSERVE_API_KEY, comma-separated keys the HTTP API requires.
API_KEY_ENV = env_name("api_key")


@dataclass(frozen=True, slots=True)
class ZmqPort:
    """A ZMQ ROUTER a singleton binds, by the ``MeshAddresses`` field naming it."""

    setting: str  # e.g. "scheduler_addr"
    service: str  # the singleton that binds it, and its DNS name
    port: int
    name: str  # a k8s port name (at most 15 characters)

    @property
    def address(self) -> str:
        return f"tcp://{self.service}:{self.port}"


ZMQ_PORTS = (
    ZmqPort("api_addr", "api", 5555, "zmq-api"),
    ZmqPort("scheduler_addr", "scheduler", 5556, "zmq-scheduler"),
    ZmqPort("kvcache_addr", "kvcache", 5557, "zmq-kvcache"),
    ZmqPort("speech_addr", "api", 5558, "zmq-speech"),
)


@dataclass(frozen=True, slots=True)
class Resources:
    """A container's requests and limits, as Kubernetes spells quantities."""

    cpu: str
    memory: str
    cpu_limit: str
    memory_limit: str
    gpus: int = 0

    def as_k8s(self) -> dict[str, dict[str, str]]:
        requests = {"cpu": self.cpu, "memory": self.memory}
        limits = {"cpu": self.cpu_limit, "memory": self.memory_limit}
        if self.gpus:
            # An extended resource: requests must equal limits.
            requests["nvidia.com/gpu"] = limits["nvidia.com/gpu"] = str(self.gpus)
        return {"requests": requests, "limits": limits}


@dataclass(frozen=True, slots=True)
class Autoscale:
    """A HorizontalPodAutoscaler on CPU utilization (of the requests)."""

    min_replicas: int
    max_replicas: int
    cpu_percent: int = 70


@dataclass(frozen=True, slots=True)
class MeshService:
    """One process kind of the mesh, run as `python -m services.<name>`."""

    name: str
    resources: Resources
    replicas: int = 1
    env: tuple[tuple[str, str], ...] = ()  # on top of mesh_env()
    autoscale: Autoscale | None = None
    http_port: int | None = None  # the api's HTTP port

    @property
    def singleton(self) -> bool:
        return self.name in SINGLETONS

    @property
    def args(self) -> tuple[str, ...]:
        """The command after the image's ENTRYPOINT (compose's ``command``)."""
        return (f"services.{self.name}",)

    @property
    def zmq_ports(self) -> tuple[ZmqPort, ...]:
        return tuple(p for p in ZMQ_PORTS if p.service == self.name)

    def environment(self) -> dict[str, str]:
        return {**mesh_env(), **dict(self.env)}


@dataclass(frozen=True, slots=True)
class WorkerVariant:
    """How the worker runs on one kind of node (compose profile, k8s overlay)."""

    overlay: str  # the k8s overlay and the compose profile
    compose_service: str
    device: str  # MESHSERVE_DEVICE
    resources: Resources
    # Taints a GPU node pool commonly carries (the NVIDIA device plugin's docs).
    tolerations: tuple[dict[str, str], ...] = ()


def mesh_env() -> dict[str, str]:
    """What every mesh container gets: the singletons' addresses by service name,
    CURVE keys from the secret mount, the replica id from the (unique) hostname,
    OTLP export to the collector."""
    env = {env_name("curve_dir"): CURVE_DIR}
    env.update({env_name(p.setting): p.address for p in ZMQ_PORTS})
    env[env_name("replica_from_hostname")] = "true"
    env["OTEL_EXPORTER_OTLP_ENDPOINT"] = OTEL_ENDPOINT
    env["OTEL_EXPORTER_OTLP_PROTOCOL"] = "grpc"
    return env


SERVICES: dict[str, MeshService] = {
    s.name: s
    for s in (
        MeshService("kvcache", Resources("250m", "512Mi", "1", "2Gi")),
        MeshService("scheduler", Resources("500m", "1Gi", "2", "2Gi")),
        MeshService(
            "api", Resources("500m", "1Gi", "2", "2Gi"),
            env=((env_name("host"), "0.0.0.0"), (env_name("port"), str(HTTP_PORT))),
            http_port=HTTP_PORT,
        ),
        MeshService("tokenizer", Resources("500m", "1Gi", "2", "2Gi"), replicas=2,
                    autoscale=Autoscale(2, 8)),
        # The device comes from the overlay (WORKERS); the base leaves it to "auto".
        MeshService("worker", Resources("1", "2Gi", "4", "8Gi")),
        MeshService("tts", Resources("500m", "1Gi", "2", "2Gi"), autoscale=Autoscale(1, 4)),
    )
}
assert tuple(SERVICES) == START_ORDER
assert {n for n, s in SERVICES.items() if s.singleton} == SINGLETONS
assert set(SERVICES) - SINGLETONS == SCALABLE

WORKERS: dict[str, WorkerVariant] = {
    "cpu": WorkerVariant("cpu", "worker", "cpu", Resources("2", "4Gi", "4", "8Gi")),
    "gpu": WorkerVariant(
        "gpu", "worker-gpu", "cuda", Resources("4", "16Gi", "8", "32Gi", gpus=1),
        tolerations=({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},),
    ),
}


def health_command(service: str, *, live: bool = False) -> tuple[str, ...]:
    """The healthcheck compose runs (readiness) and k8s execs; ``live``: only that
    the process still heartbeats, which a replica does while the api is away."""
    if live:
        return (*HEALTHCHECK, "--live")
    if service == "api":
        return (*HEALTHCHECK, f"http://127.0.0.1:{HTTP_PORT}/health/ready")
    return HEALTHCHECK


def binds(service: str) -> list[int]:
    """Every port ``service`` listens on."""
    ports = [p.port for p in SERVICES[service].zmq_ports]
    http = SERVICES[service].http_port
    return [*ports, http] if http else ports
