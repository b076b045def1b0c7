"""The mesh run from the Kubernetes manifests themselves, on this machine.

The cpu overlay (and, where CUDA is, the gpu overlay) of deploy/k8s/ is rendered
offline (the committed files, as `kubectl kustomize` would), and each mesh
Deployment's container becomes local processes: its ``command`` + ``args``
(``python`` is this interpreter) with its ``env``. What a cluster provides is
replaced, and nothing else:

- Service DNS names -> 127.0.0.1. Every Service port number is remapped to a free
  local port, the same number to the same port everywhere (addresses and the api's
  ``MESHSERVE_PORT``): no two Services share a port number (checked), so one map by
  number is consistent, and tests running beside this one cannot collide with it.
- The ``meshserve-curve`` Secret mount (``/run/secrets``) -> a key dir made with
  `meshserve keys`: CURVE stays on.
- Each pod's unique hostname (``MESHSERVE_REPLICA_FROM_HOSTNAME``) -> an explicit
  ``MESHSERVE_REPLICA``: these processes share one hostname, pods do not.
- The image's ``MESHSERVE_HEALTH_FILE`` (in each pod's /tmp) -> a file per process;
  readiness is the manifests' own probes (exec'd, or the api's HTTP path).
- The ``otel-collector`` Service -> this test's OTLP receiver: the request's trace
  must come back whole (every mesh service). The optional api-key Secret does not
  exist: the API is open, as in the cluster.
- Replicas: 2 tokenizers and 2 workers (`kubectl scale`), no tts (no request needs it).

A chat completion through the api's HTTP port, its trace, then every process is
ended by its process group.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import torch

from services.supervisor.kustomize import build
from services.supervisor.topology import CURVE_DIR, IMAGE
from tests.e2e.mesh import free_port, log_tail
from tests.otlp import otlp_receiver, trace_is_whole

pytestmark = [pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy" / "k8s"
REPLICAS = {"kvcache": 1, "scheduler": 1, "api": 1, "tokenizer": 2, "worker": 2}
READY_DEADLINE_S = 180.0  # cold imports of 7 processes on a loaded 2-core machine
STOP_DEADLINE_S = 30.0
ADDRESS = re.compile(r"^(tcp|http)://([a-z0-9-]+):(\d+)$")
COLLECTOR = "otel-collector"
Obj = dict[str, Any]


@dataclass
class Pod:
    """One replica of a Deployment, as a local process."""

    name: str
    argv: list[str]
    env: dict[str, str]
    readiness: Obj
    log: Path
    process: subprocess.Popen[bytes] | None = None


def rendered_overlay(overlay: str) -> list[Obj]:
    files = {str(p.relative_to(DEPLOY)): p.read_text() for p in DEPLOY.rglob("*.yaml")}
    return build(files, f"overlays/{overlay}")


def port_map(objects: list[Obj]) -> dict[int, int]:
    """Every mesh Service's port number -> a free local port. (The collector's and
    Jaeger's Services both take OTLP on 4317; the collector is mapped by name.)"""
    numbers = [p["port"] for o in objects if o["kind"] == "Service"
               and o["spec"]["selector"]["app.kubernetes.io/name"] == "meshserve"
               for p in o["spec"]["ports"]]
    assert len(numbers) == len(set(numbers)), f"mesh Services share a port: {numbers}"
    return {n: free_port() for n in numbers}


def local_env(container: Obj, ports: dict[int, int], keys: Path,
              collector: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for entry in container["env"]:
        if "value" not in entry:  # valueFrom an optional Secret that does not exist
            assert entry["valueFrom"]["secretKeyRef"]["optional"] is True, entry
            continue
        name, value = entry["name"], entry["value"]
        if match := ADDRESS.match(value):
            scheme, host, port = match.groups()
            value = collector if host == COLLECTOR else (
                f"{scheme}://127.0.0.1:{ports[int(port)]}")
        elif name == "MESHSERVE_PORT":
            value = str(ports[int(value)])
        elif name == "MESHSERVE_CURVE_DIR":
            assert value == CURVE_DIR
            value = str(keys)
        env[name] = value
    assert env.pop("MESHSERVE_REPLICA_FROM_HOSTNAME") == "true"
    return env


def pods(objects: list[Obj], ports: dict[int, int], keys: Path, tmp: Path,
         collector: str) -> list[Pod]:
    # This machine's environment (PATH, PYTHONPATH, the model cache) without any
    # MESHSERVE_* setting of its own: only the manifests configure the mesh.
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MESHSERVE_", "OTEL_"))}
    out = []
    deployments = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Deployment"}
    for name, count in REPLICAS.items():
        (container,) = deployments[name]["spec"]["template"]["spec"]["containers"]
        assert container["image"] == IMAGE
        argv = [*container["command"], *container["args"]]
        assert argv[0] == "python"
        for replica in range(count):
            pod = f"{name}-{replica}"
            env = {**base, **local_env(container, ports, keys, collector),
                   "MESHSERVE_REPLICA": str(replica),
                   "MESHSERVE_HEALTH_FILE": str(tmp / f"{pod}.health.json"),
                   "PYTHONUNBUFFERED": "1"}
            out.append(Pod(pod, [sys.executable, *argv[1:]], env,
                           container["readinessProbe"], tmp / f"{pod}.log"))
    return out


def ready(pod: Pod) -> bool:
    """The manifest's readiness probe, run against the local process."""
    if "httpGet" in pod.readiness:
        url = f"http://127.0.0.1:{pod.env['MESHSERVE_PORT']}{pod.readiness['httpGet']['path']}"
        try:
            return httpx.get(url, timeout=5).status_code == 200
        except httpx.TransportError:
            return False
    command = pod.readiness["exec"]["command"]
    done = subprocess.run([sys.executable, *command[1:]], env=pod.env, capture_output=True,
                          timeout=60, check=False)
    return done.returncode == 0


def stop(pods: list[Pod]) -> None:
    running = [p.process for p in pods if p.process is not None]
    for process in running:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
    for process in running:
        try:
            process.wait(STOP_DEADLINE_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def start(tmp: Path, overlay: str, collector: str) -> tuple[list[Pod], str]:
    """Every pod of ``overlay`` started; returns them and the api's base URL."""
    objects = rendered_overlay(overlay)
    ports = port_map(objects)
    keys = tmp / "keys"
    made = subprocess.run([sys.executable, "-m", "services.supervisor", "keys", "--dir",
                           str(keys)], capture_output=True, text=True, timeout=120, check=False)
    assert made.returncode == 0, made.stderr
    # The image generates the embedded model at build time (Dockerfile): so here,
    # before any service could race to generate it.
    subprocess.run([sys.executable, "-m", "shared.embedded_model"], check=True, timeout=300,
                   capture_output=True)
    mesh = pods(objects, ports, keys, tmp, collector)
    try:
        for pod in mesh:
            with pod.log.open("wb") as log:
                pod.process = subprocess.Popen(pod.argv, env=pod.env, stdout=log,
                                               stderr=subprocess.STDOUT,
                                               stdin=subprocess.DEVNULL,
                                               start_new_session=True)
    except BaseException:
        stop(mesh)
        raise
    (api,) = [p for p in mesh if p.name == "api-0"]
    return mesh, f"http://127.0.0.1:{api.env['MESHSERVE_PORT']}"


def logs(mesh: list[Pod]) -> str:
    return "\n".join(f"--- {p.name} ---\n{log_tail(p.log, 15)}" for p in mesh)


def wait_ready(mesh: list[Pod], base_url: str) -> dict[str, Any]:
    deadline = time.monotonic() + READY_DEADLINE_S
    pending = list(mesh)
    health: dict[str, Any] = {}
    while time.monotonic() < deadline:
        for pod in mesh:
            assert pod.process is not None and pod.process.poll() is None, (
                f"{pod.name} exited\n{logs(mesh)}")
        pending = [p for p in pending if not ready(p)]
        if not pending:
            health = httpx.get(base_url + "/health", timeout=10).json()
            if health["tokenizers"] == 2 and health["workers"] == 2:
                return health
        time.sleep(0.5)  # polling with a deadline: no event crosses the processes
    raise AssertionError(f"not ready: {[p.name for p in pending]}, health {health}\n"
                         f"{logs(mesh)}")


@pytest.mark.anyio
@pytest.mark.parametrize("overlay", [
    "cpu",
    # Both workers on the one local GPU (a cluster gives each its own).
    pytest.param("gpu", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs CUDA")]),
])
async def test_chat_through_the_mesh_the_manifests_describe(tmp_path: Path,
                                                            overlay: str) -> None:
    async with otlp_receiver() as (collector, otlp_env):
        # Blocking work (process starts, probes, stops) runs in threads: the receiver
        # shares this event loop.
        mesh, base_url = await anyio.to_thread.run_sync(
            start, tmp_path, overlay, otlp_env["OTEL_EXPORTER_OTLP_ENDPOINT"])
        try:
            health = await anyio.to_thread.run_sync(wait_ready, mesh, base_url)
            assert health["status"] == "ok"
            async with httpx.AsyncClient(base_url=base_url, timeout=120) as client:
                (model,) = (await client.get("/v1/models")).json()["data"]
                answer = await client.post("/v1/chat/completions", json={
                    "model": model["id"], "max_tokens": 8, "temperature": 0,
                    "messages": [{"role": "user", "content": "Hello from Kubernetes"}]})
            assert answer.status_code == 200, answer.text
            body = answer.json()
            assert body["choices"][0]["message"]["role"] == "assistant"
            assert body["usage"]["completion_tokens"] >= 1
            await collector.wait_until(lambda spans: trace_is_whole(spans, body["id"]),
                                       timeout=90)
        finally:
            await anyio.to_thread.run_sync(stop, mesh)
    for pod in mesh:
        assert pod.process is not None and pod.process.returncode is not None
