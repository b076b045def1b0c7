"""Fuzzing every ROUTER a running mesh binds: the api's tokenizer side and its speech
gateway, the scheduler, the KV manager, the supervisor's health and control sockets.

Each socket gets 10,000 frames (tests/wire_fuzz.py: hypothesis draws, then byte-level
mutants; ``derandomize=True``, so CI runs the same frames every time): garbage,
truncated msgpack, real messages with wrong tags, types and out-of-range values,
broken envelopes, missing and extra frames. After every batch of 500 the process
behind the socket must be alive and answer a probe; at the end no service has died
or restarted and the mesh still serves real requests through the api.

The replicas' sockets (tokenizer, worker, tts connect out) are fuzzed in
tests/integration/test_fuzz_replicas.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import zmq
from hypothesis import HealthCheck, Phase, given, settings

from services.supervisor.control import mesh_keys
from services.supervisor.mesh_plan import CONTROL_SOCKET, SCALABLE, SOCKET_NAMES, START_ORDER
from shared.frames import UNDECODABLE
from shared.protocol.control import (
    RestartRequest,
    ScaleRequest,
    ShutdownRequest,
    StatusRequest,
)
from tests.e2e.mesh import Mesh, start_mesh
from tests.socket_fuzzer import RouterTarget
from tests.wire_fuzz import FAMILIES, fuzz_batch, real_frames

pytestmark = pytest.mark.slow

# 20 examples x 25 drawn frames x 20 frames each (the drawn one and 19 mutants).
EXAMPLES, DRAWN, PER_DRAWN = 20, 25, 20
FRAMES_PER_SOCKET = EXAMPLES * DRAWN * PER_DRAWN
MAX_SCALE = 64  # the supervisor refuses more replicas than this

FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
    phases=[Phase.generate],  # shrinking would re-send against a process already dead
    suppress_health_check=list(HealthCheck),
)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    # Short contexts: fuzzed Submits that are valid generate for real, bounded by this.
    running = start_mesh(tmp_path_factory.mktemp("fuzz"),
                         extra_args=("--set", "max_model_len=64"))
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def zmq_ctx() -> Iterator[zmq.Context[Any]]:
    ctx: zmq.Context[Any] = zmq.Context()
    try:
        yield ctx
    finally:
        ctx.destroy(linger=0)


_control = msgspec.msgpack.Decoder(StatusRequest | RestartRequest | ScaleRequest | ShutdownRequest)


def harmless_control(frames: list[bytes]) -> bool:
    """False for a control request that would really stop, restart or scale the mesh
    under test (the supervisor must obey those); out-of-range ones stay in."""
    if len(frames) != 2:
        return True
    try:
        request = _control.decode(frames[1])
    except UNDECODABLE:
        return True
    match request:
        case ShutdownRequest():
            return False
        case RestartRequest(service=service):
            return service not in START_ORDER
        case ScaleRequest(service=service, replicas=replicas):
            return service not in SCALABLE or not 0 <= replicas <= MAX_SCALE
    return True


def _pids(mesh: Mesh) -> dict[str, int]:
    state = mesh.status()
    pids = {f"{c['service']}/{c['replica']}": c["pid"] for c in state["children"]}
    pids["supervisor"] = state["supervisor_pid"]
    return pids


def _fuzz(target: RouterTarget, family: str, keep: Callable[[list[bytes]], bool]) -> None:
    @FUZZ_SETTINGS
    @given(fuzz_batch(FAMILIES[family], DRAWN, PER_DRAWN))
    def fuzz(batch: list[list[bytes]]) -> None:
        target.send(batch, keep)

    try:
        fuzz()
    finally:
        target.close()


SOCKETS = [
    # (socket file, family, process)
    (SOCKET_NAMES["api_addr"], "api", "api/0"),
    (SOCKET_NAMES["speech_addr"], "speech", "api/0"),
    (SOCKET_NAMES["scheduler_addr"], "scheduler", "scheduler/0"),
    (SOCKET_NAMES["kvcache_addr"], "kvcache", "kvcache/0"),
    (SOCKET_NAMES["supervisor_addr"], "supervisor", "supervisor"),
    (CONTROL_SOCKET, "control", "supervisor"),
]


def test_every_router_survives_fuzzing_and_the_mesh_still_serves(
    mesh: Mesh, zmq_ctx: zmq.Context[Any]
) -> None:
    before = _pids(mesh)
    keys = mesh_keys(Path(mesh.run_dir))
    for socket_name, family, process in SOCKETS:
        address = f"ipc://{Path(mesh.run_dir) / socket_name}"
        if family == "control":
            target = RouterTarget(zmq_ctx, address, before[process], None,
                                  probe_frames=real_frames(StatusRequest(), "cli/1"),
                                  probe_answer="MeshStatus", keys=keys)
            _fuzz(target, family, harmless_control)
        else:
            target = RouterTarget(zmq_ctx, address, before[process], FAMILIES[family].hello,
                                  keys=keys)
            _fuzz(target, family, lambda frames: True)
        assert target.sent >= FRAMES_PER_SOCKET * 0.9, (socket_name, target.sent)

    # The fuzzer's fake replicas stop beating and are reaped within 3 beats; until
    # then the api may route to them, so wait for the real mesh alone.
    _wait_for_real_mesh(mesh)
    after = _pids(mesh)
    assert after == before, f"a service restarted: {before} -> {after}\n{mesh.logs()}"
    restarts = {c["service"]: c["restarts"] for c in mesh.status()["children"]}
    assert not any(restarts.values()), restarts
    _real_requests_succeed(mesh)


def _wait_for_real_mesh(mesh: Mesh, deadline_s: float = 60.0) -> None:
    deadline = time.monotonic() + deadline_s
    report: Any = None
    while time.monotonic() < deadline:
        response = httpx.get(mesh.base_url + "/health", timeout=10)
        report = response.json()
        if response.status_code == 200 and report["tokenizers"] == 1 and report["workers"] == 1:
            return
        time.sleep(0.2)  # polling with a deadline: no event crosses the process boundary
    raise AssertionError(f"the mesh did not settle: {report}\n{mesh.logs()}")


def _real_requests_succeed(mesh: Mesh) -> None:
    with httpx.Client(base_url=mesh.base_url, timeout=120) as client:
        completion = client.post("/v1/completions",
                                 json={"prompt": "The mesh", "max_tokens": 4, "temperature": 0})
        assert completion.status_code == 200, completion.text
        assert completion.json()["usage"]["completion_tokens"] >= 1
        chat = client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
        assert chat.status_code == 200, chat.text
        speech = client.post("/v1/audio/speech", json={
            "model": "tts-1", "input": "still here", "voice": "alloy", "stream": False,
            "response_format": "wav"})
        assert speech.status_code == 200, speech.text
        assert speech.content[:4] == b"RIFF"
