"""Fuzzing the sockets that connect out: a tokenizer (both its DEALERs, to the api and to the
scheduler), a worker, a tts replica, the scheduler's DEALER to the KV manager and
the api's to the scheduler each connect to ROUTERs this test binds, as to their
upstreams, and get 10,000 fuzzed frames per socket (tests/wire_fuzz.py,
derandomized). After every batch of 500 the replica must be alive and answer a real
request over the socket; at the end it still serves.

The singletons' ROUTERs are fuzzed on a whole mesh in tests/e2e/test_fuzz_sockets.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from hypothesis import HealthCheck, Phase, given, settings

from shared.protocol.generation import DetokenizeSpec, GenerateRequest, SamplingParams
from shared.protocol.speech import SpeechStatusRequest
from shared.protocol.step import StepPlan
from tests.integration.procs import mesh_addresses, read_log, running_service
from tests.socket_fuzzer import (
    DealerTarget,
    RouterTarget,
    body_of,
    stack_dump,
    tagged,
    wait_for,
)
from tests.wire_fuzz import FAMILIES, fuzz_batch, real_frames

EXAMPLES, DRAWN, PER_DRAWN = 20, 25, 20

FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
    phases=[Phase.generate], suppress_health_check=list(HealthCheck),
)


@pytest.fixture
def zmq_ctx() -> Iterator[zmq.Context[Any]]:
    ctx: zmq.Context[Any] = zmq.Context()
    try:
        yield ctx
    finally:
        ctx.destroy(linger=0)


def _router(ctx: zmq.Context[Any], address: str) -> zmq.Socket[Any]:
    socket = ctx.socket(zmq.ROUTER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
    socket.setsockopt(zmq.SNDHWM, 100_000)
    socket.bind(address)
    return socket


def _fuzz(target: DealerTarget, family: str, probe: Callable[[], None]) -> None:
    @FUZZ_SETTINGS
    @given(fuzz_batch(FAMILIES[family], DRAWN, PER_DRAWN))
    def fuzz(batch: list[list[bytes]]) -> None:
        target.send(batch)
        probe()

    fuzz()
    assert target.sent == EXAMPLES * DRAWN * PER_DRAWN


def test_a_tokenizer_survives_fuzzing_on_both_sockets(
    ipc_dir: Path, zmq_ctx: zmq.Context[Any]
) -> None:
    addresses = mesh_addresses(ipc_dir)
    api = _router(zmq_ctx, addresses.api_addr)
    scheduler = _router(zmq_ctx, addresses.scheduler_addr)
    # Slow beats: while hypothesis draws a batch nobody answers the other socket's
    # hellos, and a tokenizer without its scheduler rightly refuses work (503).
    with running_service("tokenizer", ipc_dir, {"MESHSERVE_HEARTBEAT_S": "5"}) as proc:
        log = lambda: read_log(ipc_dir, "tokenizer")  # noqa: E731
        to_api = DealerTarget(api, proc.pid, log)
        to_scheduler = DealerTarget(scheduler, proc.pid, log)
        to_scheduler.wait_hello("tokenizer")
        to_api.wait_hello("tokenizer")
        probes = iter(range(1, 1_000_000))

        def probe() -> None:
            """A real request still becomes a Submit at the scheduler."""
            request_id = f"probe-{next(probes)}"
            to_api.welcome()
            to_scheduler.welcome()
            api.send_multipart([to_api.identity, *real_frames(GenerateRequest(
                request_id, SamplingParams(max_tokens=2), DetokenizeSpec(), prompt="hi"))])
            try:
                wait_for(scheduler,
                         lambda f: tagged(f, "Submit") and request_id.encode() in f[-1],
                         f"a Submit of {request_id}")
            except AssertionError as e:
                raise AssertionError(f"{e}\n{stack_dump(proc.pid, log)}") from None

        _fuzz(to_api, "tokenizer-api", probe)
        _fuzz(to_scheduler, "tokenizer-scheduler", probe)
        assert proc.poll() is None


def test_a_worker_survives_fuzzing(ipc_dir: Path, zmq_ctx: zmq.Context[Any]) -> None:
    scheduler = _router(zmq_ctx, mesh_addresses(ipc_dir).scheduler_addr)
    # With a transfer socket, so fuzzed transfer commands reach the KV transfer engine.
    env = {"MESHSERVE_MAX_MODEL_LEN": "64", "MESHSERVE_TRANSFER_ADDR": f"ipc://{ipc_dir}/xfer.sock"}
    with running_service("worker", ipc_dir, env) as proc:
        target = DealerTarget(scheduler, proc.pid)
        target.wait_hello("worker")
        step_ids = iter(range(10**9, 2 * 10**9))

        def probe() -> None:
            """A plan still gets its result."""
            step_id = next(step_ids)
            scheduler.send_multipart([target.identity, *real_frames(StepPlan(step_id))])
            wait_for(scheduler,
                     lambda f: tagged(f, "StepResult") and body_of(f[-1])["step_id"] == step_id,
                     f"the result of step {step_id}\n{read_log(ipc_dir, 'worker')[-3000:]}")

        _fuzz(target, "worker", probe)
        assert proc.poll() is None


def test_a_tts_replica_survives_fuzzing(ipc_dir: Path, zmq_ctx: zmq.Context[Any]) -> None:
    speech = _router(zmq_ctx, mesh_addresses(ipc_dir).speech_addr)
    with running_service("tts", ipc_dir, {"MESHSERVE_ENGINES": "1"}) as proc:
        target = DealerTarget(speech, proc.pid)
        target.wait_hello("tts")

        def probe() -> None:
            speech.send_multipart([target.identity, *real_frames(SpeechStatusRequest())])
            wait_for(speech, lambda f: tagged(f, "SpeechStatus"),
                     f"a SpeechStatus\n{read_log(ipc_dir, 'tts')[-3000:]}")

        _fuzz(target, "tts", probe)
        assert proc.poll() is None


def _router_probe(ctx: zmq.Context[Any], address: str, pid: int) -> RouterTarget:
    """A peer of the singleton's own ROUTER: its hello must still be welcomed."""
    return RouterTarget(ctx, address, pid, None)


@pytest.mark.parametrize(("service", "upstream", "family"), [
    ("scheduler", "kvcache_addr", "scheduler-kvcache"),  # the scheduler's KV socket
    ("api", "scheduler_addr", "api-scheduler"),  # the api's scheduler socket
])
def test_a_singletons_upstream_socket_survives_fuzzing(
    ipc_dir: Path, zmq_ctx: zmq.Context[Any], service: str, upstream: str, family: str
) -> None:
    addresses = mesh_addresses(ipc_dir)
    router = _router(zmq_ctx, getattr(addresses, upstream))
    with running_service(service, ipc_dir, {"MESHSERVE_HEARTBEAT_S": "5"}) as proc:
        target = DealerTarget(router, proc.pid)
        target.wait_hello(service)
        own = _router_probe(zmq_ctx, getattr(addresses, f"{service}_addr"), proc.pid)
        try:
            _fuzz(target, family, own.check)
        finally:
            own.close()
        assert proc.poll() is None, read_log(ipc_dir, service)[-3000:]
