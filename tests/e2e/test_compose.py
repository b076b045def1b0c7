"""compose.yaml for real: the image built from the shipped Dockerfile, the mesh up
under podman-compose, a chat completion through the api container, tokenizer scaled
to 3 and the worker restarted while requests flow, every request answered, and the
spans of every service received by this test's OTLP receiver.

How it runs here (see /work/shared/CONTAINERS.md): rootful podman with runc and a
CONTAINERS_CONF of our own (ulimits), a stand-in ``python:3.11-slim`` made with
debootstrap when no registry can be reached, pip inside the build reaching the index
through the host's CA bundle and finding torch's CPU wheel in the host's wheel folder
(both mounted into the build's RUN steps, never baked into the shipped files).

An override file replaces what cannot run here and nothing else: the collector and
Jaeger images cannot be pulled, so they get no container and every mesh service
exports to this test's receiver instead; the gpu worker gets none (no GPU, and
podman-compose 1.0.3 ignores profiles). podman-compose 1.0.3 also ignores
``--scale`` and ``depends_on`` conditions and runs healthchecks only through systemd:
the test scales with ``deploy.replicas`` in a second override and runs every
container's healthcheck itself (``podman healthcheck run``).

Where containers cannot run (no podman and no way to install it, not root, no
Debian mirror), the test skips and says why.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import anyio
import grpc
import httpx
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

from shared.curve import create_keys
from tests.e2e.mesh import free_port
from tests.otlp import OtlpCollector, ReceivedSpan

REPO = Path(__file__).resolve().parents[2]
TOOLS = ("podman", "podman-compose", "runc", "debootstrap")
BASE_IMAGE = "python:3.11-slim"  # the Dockerfile's FROM
IMAGE = "meshserve:latest"  # compose.yaml's image
IMAGE_UID = 1000  # the Dockerfile's MESHSERVE_UID default
MODEL = "meshserve-tiny-llama"
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
INSTALL_TIMEOUT_S = 600
BUILD_TIMEOUT_S = 900
COMPOSE_TIMEOUT_S = 300
HEALTH_DEADLINE_S = 180.0
MESH_SERVICES = ("kvcache", "scheduler", "api", "tokenizer", "worker", "tts")
TRACED = {"api", "tokenizer", "scheduler", "kvcache", "worker"}

CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
runtime = "runc"
"""

pytestmark = [pytest.mark.slow]


def _run(cmd: list[str], env: dict[str, str], timeout: float,
         cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, env=env, cwd=cwd, timeout=timeout, text=True,
                          capture_output=True, check=False)


def _check(done: subprocess.CompletedProcess[str]) -> str:
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(done.args)} failed ({done.returncode}):\n"
                             f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done.stdout


def _install_tools() -> str | None:
    """None once every tool is there, else why containers cannot run here."""
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if not missing:
        return None
    if os.geteuid() != 0:
        return f"{', '.join(missing)} missing and not root to install them"
    if shutil.which("apt-get") is None:
        return f"{', '.join(missing)} missing and no apt-get to install them"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-q"],
                ["apt-get", "install", "-y", "-q", "podman", "runc", "podman-compose",
                 "debootstrap"]):
        try:
            done = _run(cmd, env, INSTALL_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return f"{' '.join(cmd)} timed out"
        if done.returncode != 0:
            return f"{' '.join(cmd)} failed: {done.stderr.strip()[-500:]}"
    still = [t for t in TOOLS if shutil.which(t) is None]
    return f"{', '.join(still)} still missing after apt-get install" if still else None


def _debian_mirror() -> str:
    """The first Debian mirror apt uses here (deb822 or one-line sources)."""
    for path in [Path("/etc/apt/sources.list"),
                 *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            words = line.split()
            if line.startswith("URIs:") and len(words) > 1 and "security" not in words[1]:
                return words[1]
            if words[:1] == ["deb"] and len(words) > 2 and "security" not in words[2]:
                return next(w for w in words[1:] if w.startswith("http"))
    return "http://deb.debian.org/debian"


def _ensure_base_image(env: dict[str, str], work: Path) -> str | None:
    """Tag a Debian bookworm (Python 3.11) image as the Dockerfile's FROM unless one
    exists: pip and python on PATH from a venv, as python:3.11-slim has them."""
    if _run(["podman", "image", "exists", BASE_IMAGE], env, 60).returncode == 0:
        return None
    root = work / "rootfs"
    try:
        done = _run(["debootstrap", "--variant=minbase",
                     "--include=python3,python3-venv,python-is-python3,ca-certificates",
                     "bookworm", str(root), _debian_mirror()], env, INSTALL_TIMEOUT_S)
        if done.returncode != 0:
            return f"debootstrap failed: {done.stderr.strip()[-500:]}"
        _check(_run(["chroot", str(root), "python3", "-m", "venv", "/usr/local/python"],
                    env, 120))
        tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
        try:
            imported = subprocess.run(
                ["podman", "import", "--change",
                 "ENV PATH=/usr/local/python/bin:/usr/local/sbin:/usr/local/bin:"
                 "/usr/sbin:/usr/bin:/sbin:/bin", "--change", 'CMD ["python3"]',
                 "-", BASE_IMAGE],
                stdin=tar.stdout, env=env, capture_output=True, text=True, timeout=300,
                check=False)
        finally:
            assert tar.stdout is not None
            tar.stdout.close()
            tar.wait()
        _check(imported)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return None


def _wheel_dir() -> Path | None:
    """The host's local wheel folder holding the CPU torch wheel, if any."""
    for folder in [os.environ.get("PIP_FIND_LINKS", ""), "/opt/wheels"]:
        if folder and Path(folder).is_dir() and any(Path(folder).glob("torch-*.whl")):
            return Path(folder)
    return None


def _build_image(env: dict[str, str], work: Path) -> None:
    """Build the shipped Dockerfile; the host's CA bundle and wheel folder reach the
    RUN steps through build-time mounts and a pip.conf, not through the Dockerfile."""
    pip_conf = ["[global]"]
    mounts: list[str] = []
    if HOST_CA.is_file():
        pip_conf.append("cert = /run/host-ca.crt")
        mounts += ["--volume", f"{HOST_CA}:/run/host-ca.crt:ro"]
    wheels = _wheel_dir()
    if wheels is not None:
        pip_conf.append("find-links = /wheels")
        mounts += ["--volume", f"{wheels}:/wheels:ro"]
    (work / "pip.conf").write_text("\n".join(pip_conf) + "\n")
    mounts += ["--volume", f"{work / 'pip.conf'}:/etc/pip.conf:ro"]
    _check(_run(["podman", "build", "--tag", IMAGE, *mounts, str(REPO)], env,
                BUILD_TIMEOUT_S))


@pytest.fixture(scope="module")
def podman_env() -> Iterator[dict[str, str]]:
    """The environment podman and podman-compose run with; the image is built."""
    reason = _install_tools()
    if reason:
        pytest.skip(f"containers cannot run here: {reason}")
    work = Path(tempfile.mkdtemp(prefix="ms-compose-"))
    try:
        (work / "containers.conf").write_text(CONTAINERS_CONF)
        env = {**os.environ, "CONTAINERS_CONF": str(work / "containers.conf")}
        probe = _run(["podman", "info"], env, 120)
        if probe.returncode != 0:
            pytest.skip(f"containers cannot run here: podman info: {probe.stderr[-500:]}")
        reason = _ensure_base_image(env, work)
        if reason:
            pytest.skip(f"containers cannot run here: no base image: {reason}")
        _build_image(env, work)
        yield env
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _mesh_keys(work: Path) -> Path:
    """The CURVE keys compose mounts as secrets, owned by the image's user (uid 1000)
    as a user running `meshserve keys` with that uid would have them."""
    key_dir = work / "keys"
    create_keys(key_dir)
    for path in [key_dir, *key_dir.iterdir()]:
        os.chown(path, IMAGE_UID, IMAGE_UID)
    return key_dir


def _override(receiver_port: int) -> str:
    """What cannot run here, replaced; every mesh service exports to the test."""
    telemetry = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://host.containers.internal:{receiver_port}",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    services: dict[str, object] = {s: {"environment": telemetry} for s in MESH_SERVICES}
    for absent in ("worker-gpu", "otel-collector", "jaeger"):
        services[absent] = {"deploy": {"replicas": 0}}
    return json.dumps({"services": services})  # JSON is YAML


class Compose:
    """podman-compose on compose.yaml plus override files, as one project."""

    def __init__(self, env: dict[str, str], work: Path, overrides: list[str]) -> None:
        self.project = f"mstest{uuid.uuid4().hex[:8]}"
        self.env = env
        self.files = ["-f", str(REPO / "compose.yaml")]
        for i, text in enumerate(overrides):
            path = work / f"override-{i}.yaml"
            path.write_text(text)
            self.files += ["-f", str(path)]

    def add_override(self, work: Path, text: str) -> None:
        path = work / f"override-{len(self.files) // 2}.yaml"
        path.write_text(text)
        self.files += ["-f", str(path)]

    def __call__(self, *args: str) -> str:
        return _check(_run(["podman-compose", "-p", self.project, *self.files, *args],
                           self.env, COMPOSE_TIMEOUT_S, cwd=REPO))

    def containers(self, service: str | None = None) -> list[str]:
        label = f"label=com.docker.compose.project={self.project}"
        out = _check(_run(["podman", "ps", "-a", "--filter", label, "--format",
                           "{{.Names}} {{.Labels}}"], self.env, 60))
        names = [line.split()[0] for line in out.splitlines() if line.strip()]
        if service is None:
            return names
        return [n for n in names if n.startswith(f"{self.project}_{service}_")]

    def healthy(self, name: str) -> bool:
        """Run the container's own healthcheck (podman needs systemd to time it)."""
        return _run(["podman", "healthcheck", "run", name], self.env, 60).returncode == 0

    def logs(self) -> str:
        tails = []
        for name in self.containers():
            done = _run(["podman", "logs", "--tail", "15", name], self.env, 60)
            tails.append(f"== {name}\n{done.stdout[-2500:]}{done.stderr[-2500:]}")
        return "\n".join(tails)

    def down(self) -> None:
        """Everything this project started goes, whatever state it is in."""
        _run(["podman-compose", "-p", self.project, *self.files, "down", "-t", "5"],
             self.env, COMPOSE_TIMEOUT_S, cwd=REPO)
        for name in self.containers():
            _run(["podman", "rm", "-f", "-t", "0", name], self.env, 60)
        _run(["podman", "network", "rm", "-f", f"{self.project}_default"], self.env, 60)


async def _wait_healthy(client: httpx.AsyncClient, compose: Compose,
                        tokenizers: int) -> None:
    """Polled with a deadline: no event crosses into the containers."""
    deadline = time.monotonic() + HEALTH_DEADLINE_S
    last = ""
    while time.monotonic() < deadline:
        try:
            response = await client.get("/health")
            last = response.text
            report = response.json()
            if response.status_code == 200 and report["tokenizers"] == tokenizers:
                containers = compose.containers()
                checks = [await anyio.to_thread.run_sync(compose.healthy, n)
                          for n in containers]
                if all(checks):
                    return
                last = f"healthchecks: {dict(zip(containers, checks, strict=True))}"
        except (httpx.TransportError, ValueError) as e:
            last = repr(e)
        await anyio.sleep(1.0)
    raise AssertionError(f"mesh not healthy in {HEALTH_DEADLINE_S} s: {last}\n"
                         f"{compose.logs()}")


async def _chat(client: httpx.AsyncClient, prompt: str, max_tokens: int,
                first_token: anyio.Event | None = None) -> tuple[str, str | None]:
    """A streamed chat completion: (text, finish reason)."""
    text, finish = [], None
    body = {"model": MODEL, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "messages": [{"role": "user", "content": prompt}]}
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = json.loads(line[len("data: "):])["choices"][0]
            text.append(choice["delta"].get("content") or "")
            finish = choice.get("finish_reason") or finish
            if first_token is not None and text:
                first_token.set()
    return "".join(text), finish


@pytest.mark.anyio
async def test_compose_mesh_scales_restarts_and_traces(
        podman_env: dict[str, str], tmp_path: Path) -> None:
    collector = OtlpCollector()
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    # All interfaces: the containers reach the host through podman's bridge.
    receiver_port = server.add_insecure_port("0.0.0.0:0")
    await server.start()
    compose = Compose(podman_env, tmp_path, [_override(receiver_port)])
    api_port = free_port()
    compose.env = {**compose.env, "MESHSERVE_API_PORT": str(api_port),
                   "MESHSERVE_KEYS_DIR": str(_mesh_keys(tmp_path))}
    started = time.monotonic()
    try:
        await anyio.to_thread.run_sync(compose, "up", "-d", "--no-build")
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{api_port}",
                                     timeout=120) as client:
            await _wait_healthy(client, compose, tokenizers=1)
            up_s = time.monotonic() - started

            text, finish = await _chat(client, "hello from compose", 8)
            assert finish == "length" and text

            compose.add_override(tmp_path, json.dumps(
                {"services": {"tokenizer": {"deploy": {"replicas": 3}}}}))
            await anyio.to_thread.run_sync(compose, "up", "-d", "--no-build")
            assert len(compose.containers("tokenizer")) == 3
            await _wait_healthy(client, compose, tokenizers=3)

            # Requests in flight when the worker goes, and more sent while it is
            # away: the scheduler requeues them on the restarted worker.
            answers: list[tuple[str, str | None]] = []
            in_flight = [anyio.Event() for _ in range(6)]

            async def ask(i: int, first: anyio.Event | None) -> None:
                # Long enough that the first six are still decoding when the worker
                # goes down, so they really are re-queued and recomputed.
                answers.append(await _chat(client, f"request {i} of the flow", 400, first))

            async with anyio.create_task_group() as tg:
                for i, first in enumerate(in_flight):
                    tg.start_soon(ask, i, first)
                for first in in_flight:
                    await first.wait()
                restart = anyio.Event()

                async def restart_worker() -> None:
                    await anyio.to_thread.run_sync(compose, "restart", "worker")
                    restart.set()
                tg.start_soon(restart_worker)
                for i in range(6, 12):
                    tg.start_soon(ask, i, None)
                await restart.wait()
            assert len(answers) == 12
            assert all(finish == "length" and text for text, finish in answers), answers
            scheduler_log = _run(["podman", "logs", *compose.containers("scheduler")],
                                 compose.env, 60)
            assert "requeued requests of a lost worker" in (
                scheduler_log.stdout + scheduler_log.stderr), compose.logs()
            await _wait_healthy(client, compose, tokenizers=3)

        def traced(spans: list[ReceivedSpan]) -> bool:
            return {s.service for s in spans} >= TRACED and len(
                {s.resource.get("service.instance.id") for s in spans
                 if s.service == "tokenizer"}) >= 2
        spans = await collector.wait_until(traced, timeout=60)
        print(f"compose: healthy {up_s:.1f} s after up; {len(spans)} spans received")
    finally:
        await anyio.to_thread.run_sync(compose.down)
        await server.stop(None)
    assert {s.service for s in spans} >= TRACED
