"""The tokenizer service as a real subprocess, with the test playing both of its
peers: a ROUTER at the api address and one at the scheduler address.

Every test starts its own replica(s) in their own process group and kills the
group in ``finally``; sockets live in the per-test ``ipc_dir``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest
import zmq
import zmq.asyncio
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from services.tokenizer.config import TokenizerConfig
from services.tokenizer.encoder import PromptEncoder
from services.tokenizer.service import LONG_PROMPT_CHARS, TokenizerService
from shared.config import MeshAddresses, ProcessConfig
from shared.embedded_model import ensure_embedded_model
from shared.mesh import Identity, Received, RouterEndpoint
from shared.protocol.envelope import pack_i32, unpack_i32
from shared.protocol.generation import (
    Abort,
    ChatMessage,
    DetokenizeSpec,
    GenerateRequest,
    Reassign,
    RequestFailed,
    SamplingParams,
    Submit,
    TextBatch,
    TextDelta,
    TokenBatch,
    TokenOutput,
)
from shared.service import ServiceRuntime

pytestmark = pytest.mark.anyio

HEARTBEAT_S = 0.1
REPO_ROOT = Path(__file__).resolve().parents[2]
FromTokenizerToApi = TextBatch | RequestFailed
FromTokenizerToScheduler = Submit | Abort


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return ensure_embedded_model()


@pytest.fixture(scope="module")
def encoder(model_dir: Path) -> PromptEncoder:
    return PromptEncoder.from_folder(model_dir)


@dataclass
class Peers:
    """The test's side of the mesh: the api and scheduler routers, and the replicas."""

    zmq: zmq.asyncio.Context
    api: RouterEndpoint[Any]
    scheduler: RouterEndpoint[Any]
    scheduler_scope: anyio.CancelScope
    logs: dict[int, Path] = field(default_factory=dict)
    processes: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)
    probes: int = 0

    async def expect(self, router: RouterEndpoint[Any], *types: type, timeout: float = 10.0
                     ) -> Received[Any]:
        """The next message of one of ``types``; any other message fails the test."""
        with anyio.fail_after(timeout):
            async for event in router.inbox:
                if not isinstance(event, Received):
                    continue  # PeerJoined and friends
                assert isinstance(event.body, types), f"unexpected {event.body!r}"
                return event
        raise AssertionError("inbox closed")

    async def barrier(self) -> None:
        """Prove that everything sent to replica 0 so far was handled and left no
        message behind: a probe goes through both of its sockets, and its answers
        must be the next messages to arrive (each socket delivers in order)."""
        self.probes += 1
        probe = f"probe-{self.probes}"
        await self.generate(generate_request(probe, prompt="p"))
        assert (await self.expect(self.scheduler, Submit)).body.request_id == probe
        await self.tokens(
            TokenOutput(probe, pack_i32([70]), 0, 1, "length"),
            TokenOutput(f"{probe}-unknown", pack_i32([70]), 0, 1),
        )
        batch = (await self.expect(self.api, TextBatch)).body
        assert [d.request_id for d in batch.deltas] == [probe]
        abort = (await self.expect(self.scheduler, Abort)).body
        assert abort.request_ids == [f"{probe}-unknown"]

    def tokenizer(self, replica: int = 0) -> Any:
        (peer,) = [p for p in self.api.peers_of("tokenizer") if p.hello.replica == replica]
        return peer

    def scheduler_side(self, replica: int = 0) -> Any:
        (peer,) = [
            p for p in self.scheduler.peers_of("tokenizer") if p.hello.replica == replica
        ]
        return peer

    async def generate(self, request: GenerateRequest, replica: int = 0,
                       ctx: Any = None) -> None:
        await self.api.send(self.tokenizer(replica), request, ctx)

    async def submitted(self) -> Submit:
        return (await self.expect(self.scheduler, Submit)).body

    async def tokens(self, *outputs: TokenOutput, replica: int = 0) -> None:
        await self.scheduler.send(self.scheduler_side(replica), TokenBatch(list(outputs)))

    def log_text(self, replica: int = 0) -> str:
        return self.logs[replica].read_text()


def _spawn(ipc_dir: Path, model_dir: Path, replica: int, extra_env: dict[str, str]
           ) -> tuple[subprocess.Popen[bytes], Path]:
    log_path = ipc_dir / f"tokenizer-{replica}.log"
    env = {
        **os.environ,
        "MESHSERVE_API_ADDR": f"ipc://{ipc_dir}/api.sock",
        "MESHSERVE_SCHEDULER_ADDR": f"ipc://{ipc_dir}/scheduler.sock",
        "MESHSERVE_SUPERVISOR_ADDR": "",
        "MESHSERVE_REPLICA": str(replica),
        "MESHSERVE_HEARTBEAT_S": str(HEARTBEAT_S),
        "MESHSERVE_MODEL": str(model_dir),
        "PYTHONUNBUFFERED": "1",  # log lines reach the file as they happen
        **extra_env,
    }
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "services.tokenizer"],
            cwd=REPO_ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, killed as a whole
        )
    return process, log_path


def _stop(process: subprocess.Popen[bytes]) -> int:
    try:
        os.killpg(process.pid, signal.SIGTERM)
        return process.wait(timeout=10)
    except ProcessLookupError:
        return process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
        raise


async def _wait_ready(peers: Peers, replicas: Sequence[int]) -> None:
    # Readiness (both upstreams answered) is only visible in the replica's Hello,
    # re-sent every beat: no event to wait on, so poll it with a deadline.
    with anyio.fail_after(30):
        while True:
            ready = {p.hello.replica for p in peers.api.peers_of("tokenizer") if p.hello.ready}
            joined = {p.hello.replica for p in peers.scheduler.peers_of("tokenizer")}
            if set(replicas) <= ready & joined:
                return
            for replica, process in peers.processes.items():
                assert process.poll() is None, peers.log_text(replica)
            await anyio.sleep(HEARTBEAT_S)


async def _serve_router(
    router: RouterEndpoint[Any], *, task_status: anyio.abc.TaskStatus[anyio.CancelScope]
) -> None:
    """Run a router under its own cancel scope, so a test can stop just that peer."""
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            await tg.start(router.run)
            task_status.started(scope)


@asynccontextmanager
async def tokenizer_mesh(
    ipc_dir: Path, model_dir: Path, replicas: Sequence[int] = (0,),
    extra_env: dict[str, str] | None = None,
    in_process_tracer: trace.Tracer | None = None,
) -> AsyncIterator[Peers]:
    """Routers at the api and scheduler addresses, and tokenizer replicas connected
    to them: subprocesses, or with ``in_process_tracer`` one replica in this process
    (so its spans can be inspected)."""
    ctx = zmq.asyncio.Context()
    api: RouterEndpoint[Any] = RouterEndpoint(
        ctx, f"ipc://{ipc_dir}/api.sock", Identity("api", 0), FromTokenizerToApi,
        heartbeat_s=HEARTBEAT_S,
    )
    scheduler: RouterEndpoint[Any] = RouterEndpoint(
        ctx, f"ipc://{ipc_dir}/scheduler.sock", Identity("scheduler", 0),
        FromTokenizerToScheduler, heartbeat_s=HEARTBEAT_S,
    )
    processes: dict[int, subprocess.Popen[bytes]] = {}
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(api.run)
            peers = Peers(ctx, api, scheduler, await tg.start(_serve_router, scheduler),
                          processes=processes)
            if in_process_tracer is not None:
                runtime = ServiceRuntime(
                    identity=Identity("tokenizer", 0),
                    process=ProcessConfig(heartbeat_s=HEARTBEAT_S),
                    addresses=MeshAddresses(api_addr=api.address,
                                            scheduler_addr=scheduler.address),
                    zmq=ctx,
                )
                service = TokenizerService(
                    runtime, TokenizerConfig(), PromptEncoder.from_folder(model_dir),
                    tracer=in_process_tracer,
                )
                await tg.start(service.run)
            else:
                for replica in replicas:
                    process, log_path = _spawn(ipc_dir, model_dir, replica, extra_env or {})
                    peers.processes[replica] = process
                    peers.logs[replica] = log_path
            await _wait_ready(peers, replicas)
            yield peers
            tg.cancel_scope.cancel()
    finally:
        codes = {r: _stop(p) for r, p in processes.items()}
        api.close()
        scheduler.close()
        ctx.destroy(linger=0)
    # A SIGTERM is a clean shutdown, not a crash.
    assert all(code == 0 for code in codes.values()), codes


def generate_request(request_id: str, **fields: Any) -> GenerateRequest:
    fields.setdefault("sampling", SamplingParams(max_tokens=32))
    fields.setdefault("detokenize", DetokenizeSpec())
    return GenerateRequest(request_id=request_id, **fields)


def one_by_one(request_id: str, ids: Sequence[int], finish_reason: str = "length",
               prompt_tokens: int = 3) -> list[TokenOutput]:
    """One output per id, as a decode step produces them; the last one finishes."""
    return [
        TokenOutput(
            request_id, pack_i32([token_id]), n, prompt_tokens,
            finish_reason if n == len(ids) - 1 else None,
        )
        for n, token_id in enumerate(ids)
    ]


async def collect_text(peers: Peers, request_id: str, outputs: Sequence[TokenOutput]
                       ) -> list[TextDelta]:
    """Send outputs one TokenBatch each; collect this request's deltas until it ends."""
    for out in outputs:
        await peers.tokens(out)
    deltas: list[TextDelta] = []
    while not deltas or deltas[-1].finish_reason is None:
        batch = (await peers.expect(peers.api, TextBatch)).body
        deltas += [d for d in batch.deltas if d.request_id == request_id]
    return deltas


def assert_contiguous(deltas: Sequence[TextDelta]) -> str:
    text = ""
    for delta in deltas:
        assert delta.offset == len(text)
        text += delta.text
    return text


# ---- tests ------------------------------------------------------------------


async def test_completion_and_chat_submit_the_reference_ids(
    ipc_dir: Path, model_dir: Path, encoder: PromptEncoder
) -> None:
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    prompt = "Completions keep working: é, 日本語, 😀"
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there 🤔"},
    ]
    trace_id = 0x0AF7651916CD43DD8448EB211C80319C
    parent = SpanContext(trace_id, 0xB7AD6B7169203331, is_remote=True,
                         trace_flags=TraceFlags(TraceFlags.SAMPLED))
    ctx = trace.set_span_in_context(NonRecordingSpan(parent))
    async with tokenizer_mesh(ipc_dir, model_dir) as peers:
        sampling = SamplingParams(max_tokens=7, temperature=0.0, stop_token_ids=[2])
        spec = DetokenizeSpec(stop=["\n\n"], include_stop_str_in_output=True)
        await peers.generate(
            generate_request("c", prompt=prompt, sampling=sampling, detokenize=spec, priority=3),
            ctx=ctx,
        )
        received = await peers.expect(peers.scheduler, Submit)
        submit = received.body
        assert list(unpack_i32(submit.prompt_token_ids)) == encoder.encode_text(prompt)
        assert list(unpack_i32(submit.prompt_token_ids)) == reference(prompt)["input_ids"]
        assert (submit.request_id, submit.sampling, submit.detokenize, submit.priority) == (
            "c", sampling, spec, 3
        )
        # Submit travels in the GenerateRequest's trace.
        assert f"{trace_id:032x}" in received.envelope.traceparent

        await peers.generate(generate_request(
            "chat", messages=[ChatMessage(**m) for m in chat], add_generation_prompt=True
        ))
        submit = await peers.submitted()
        expected = reference.apply_chat_template(
            chat, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        assert list(unpack_i32(submit.prompt_token_ids)) == expected
        assert expected == encoder.encode_chat(chat, True)

        ids = encoder.encode_text("12 tokens of")
        await peers.generate(generate_request("ids", prompt_token_ids=pack_i32(ids)))
        assert list(unpack_i32((await peers.submitted()).prompt_token_ids)) == ids

        # Long enough to be encoded off the event loop.
        long_prompt = "def long_function(argument):\n    return argument * 2\n" * 400
        assert len(long_prompt) > LONG_PROMPT_CHARS
        await peers.generate(generate_request("long", prompt=long_prompt))
        submit = await peers.submitted()
        assert list(unpack_i32(submit.prompt_token_ids)) == reference(long_prompt)["input_ids"]


async def test_token_batches_become_text_equal_to_the_full_decode(
    ipc_dir: Path, model_dir: Path, encoder: PromptEncoder
) -> None:
    text = "Streaming text: 日本語のテキスト and emoji 😀👍🏽 end."
    ids = encoder.encode_text(text)
    other = encoder.encode_text("second")
    async with tokenizer_mesh(ipc_dir, model_dir) as peers:
        await peers.generate(generate_request("a", prompt="prompt a"))
        await peers.generate(generate_request("b", prompt="prompt b"))
        a_prompt = len(unpack_i32((await peers.submitted()).prompt_token_ids))
        await peers.submitted()

        # Two requests in one TokenBatch come back as one TextBatch.
        await peers.tokens(
            TokenOutput("a", pack_i32(ids[:3]), 0, a_prompt),
            TokenOutput("b", pack_i32(other), 0, 2, "length"),
        )
        both = (await peers.expect(peers.api, TextBatch)).body
        assert sorted(d.request_id for d in both.deltas) == ["a", "b"]
        first = next(d for d in both.deltas if d.request_id == "a")
        b = next(d for d in both.deltas if d.request_id == "b")
        assert (b.text, b.finish_reason, b.completion_tokens) == ("second", "length", 2)

        # The rest one id per batch, with a duplicate of an earlier output thrown in.
        rest = one_by_one("a", ids, "stop", a_prompt)[3:]
        rest.insert(2, TokenOutput("a", pack_i32(ids[2:5]), 2, a_prompt))
        deltas = [first, *await collect_text(peers, "a", rest)]
        assert assert_contiguous(deltas) == encoder.tokenizer.decode(ids) == text
        assert all("\ufffd" not in d.text for d in deltas)
        last = deltas[-1]
        assert (last.finish_reason, last.completion_tokens, last.prompt_tokens) == (
            "stop", len(ids), a_prompt
        )


async def test_n_choices_submit_once_and_detokenize_per_choice(
    ipc_dir: Path, model_dir: Path, encoder: PromptEncoder
) -> None:
    ids = [encoder.encode_text(t) for t in ("first choice", "second one", "third")]
    async with tokenizer_mesh(ipc_dir, model_dir) as peers:
        sampling = SamplingParams(max_tokens=8, seed=5)
        await peers.generate(generate_request("f", prompt="fork me", sampling=sampling, n=3,
                                              cache_salt="tenant"))
        submit = await peers.submitted()
        assert (submit.request_id, submit.n, submit.cache_salt) == ("f", 3, "tenant")
        assert submit.sampling == sampling  # the scheduler adds i to choice i's seed
        prompt_len = len(unpack_i32(submit.prompt_token_ids))
        # A re-sent request is a duplicate while any choice lives: no second Submit.
        await peers.generate(generate_request("f", prompt="fork me", n=3))
        await peers.barrier()
        for i, choice_ids in enumerate(ids):
            deltas = await collect_text(
                peers, f"f-{i}", one_by_one(f"f-{i}", choice_ids, "length", prompt_len))
            assert assert_contiguous(deltas) == encoder.tokenizer.decode(choice_ids)
            assert deltas[-1].prompt_tokens == prompt_len


async def test_stop_string_mid_stream_finishes_aborts_and_never_leaks(
    ipc_dir: Path, model_dir: Path, encoder: PromptEncoder
) -> None:
    ids = encoder.encode_text("stop here STOP and then more text")
    async with tokenizer_mesh(ipc_dir, model_dir) as peers:
        spec = DetokenizeSpec(stop=["STOP"])
        await peers.generate(generate_request("s", prompt="x", detokenize=spec))
        await peers.submitted()
        deltas = await collect_text(peers, "s", one_by_one("s", ids, finish_reason="length"))
        assert assert_contiguous(deltas) == "stop here "
        assert deltas[-1].finish_reason == "stop"
        abort = (await peers.expect(peers.scheduler, Abort)).body
        assert abort == Abort(["s"], reason="stop")
        # Outputs the scheduler had already planned are dropped: no text, no abort.
        await peers.tokens(TokenOutput("s", pack_i32([70]), len(ids), 1))
        await peers.barrier()


async def test_reassign_replays_text_from_offset_zero(
    ipc_dir: Path, model_dir: Path, encoder: PromptEncoder
) -> None:
    ids = encoder.encode_text("taken over mid-way 😀 and finished")
    prompt = encoder.encode_text("the prompt")
    async with tokenizer_mesh(ipc_dir, model_dir) as peers:
        await peers.scheduler.send(
            peers.scheduler_side(),
            Reassign("moved", DetokenizeSpec(), pack_i32(prompt), pack_i32(ids[:6])),
        )
        replay = (await peers.expect(peers.api, TextBatch)).body.deltas
        assert [(d.request_id, d.offset) for d in replay] == [("moved", 0)]
        rest = one_by_one("moved", ids, "stop", len(prompt))[6:]
        deltas = [*replay, *await collect_text(peers, "moved", rest)]
        assert assert_contiguous(deltas) == encoder.tokenizer.decode(ids)
        assert deltas[-1].completion_tokens == len(ids)


async def test_failures_are_forwarded_and_bad_prompts_refused(
    ipc_dir: Path, model_dir: Path
) -> None:
    async with tokenizer_mesh(ipc_dir, model_dir) as peers:
        await peers.generate(generate_request("f", prompt="will fail"))
        await peers.submitted()
        failed = RequestFailed("f", 429, "server_busy", "queue full")
        await peers.scheduler.send(peers.scheduler_side(), failed)
        assert (await peers.expect(peers.api, RequestFailed)).body == failed

        await peers.generate(generate_request("empty", prompt=""))
        refused = (await peers.expect(peers.api, RequestFailed)).body
        assert (refused.request_id, refused.status, refused.code) == (
            "empty", 400, "invalid_request_error"
        )
        await peers.generate(generate_request("oov", prompt_token_ids=pack_i32([5, 70000])))
        refused = (await peers.expect(peers.api, RequestFailed)).body
        assert refused.status == 400 and "70000" in refused.message
        await peers.barrier()  # nothing was submitted


async def test_aborts_drop_the_request(
    ipc_dir: Path, model_dir: Path, encoder: PromptEncoder
) -> None:
    async with tokenizer_mesh(ipc_dir, model_dir) as peers:
        for request_id in ("gone", "moved", "kept"):
            await peers.generate(generate_request(request_id, prompt="p"))
            await peers.submitted()
        await peers.api.send(peers.tokenizer(), Abort(["gone"]))
        # The scheduler gave "moved" to another replica: no longer this one's.
        await peers.scheduler.send(peers.scheduler_side(), Abort(["moved"], reason="reassigned"))
        # Handled before these outputs (the api abort: the barrier's Submit proves it).
        await peers.barrier()
        ids = encoder.encode_text("hello")
        await peers.tokens(
            TokenOutput("gone", pack_i32(ids), 0, 1),
            TokenOutput("moved", pack_i32(ids), 0, 1),
            TokenOutput("kept", pack_i32(ids), 0, 1, "length"),
        )
        batch = (await peers.expect(peers.api, TextBatch)).body
        assert [d.request_id for d in batch.deltas] == ["kept"]
        await peers.barrier()  # stragglers, not unknown ids: no Abort


async def test_garbage_and_wrong_messages_are_rejected_and_service_keeps_serving(
    ipc_dir: Path, model_dir: Path, encoder: PromptEncoder
) -> None:
    async with tokenizer_mesh(ipc_dir, model_dir) as peers:
        # Well-formed, wrong direction: a Submit is something a tokenizer sends.
        await peers.api.send(
            peers.tokenizer(),
            Submit("x", pack_i32([1]), SamplingParams(), DetokenizeSpec()),
        )
        # Garbage on both sockets (logged once per sender and window, then counted).
        await peers.api.socket.send_multipart([peers.tokenizer().identity, b"\x00garbage"])
        await peers.scheduler.socket.send_multipart(
            [peers.scheduler_side().identity, os.urandom(16), os.urandom(64)]
        )
        # Decodes, but names a request this replica never had.
        await peers.tokens(TokenOutput("nobody", pack_i32([70]), 0, 1))
        abort = (await peers.expect(peers.scheduler, Abort)).body
        assert abort.request_ids == ["nobody"]
        # A known request with an inconsistent array fails alone.
        await peers.generate(generate_request("broken", prompt="p"))
        await peers.submitted()
        await peers.tokens(TokenOutput("broken", b"\x01\x02\x03", 0, 1))
        failed = (await peers.expect(peers.api, RequestFailed)).body
        assert (failed.request_id, failed.status, failed.code) == ("broken", 500, "server_error")
        assert (await peers.expect(peers.scheduler, Abort)).body.request_ids == ["broken"]

        # Still serving.
        ids = encoder.encode_text("still alive")
        await peers.generate(generate_request("good", prompt="p"))
        await peers.submitted()
        deltas = await collect_text(peers, "good", one_by_one("good", ids))
        assert assert_contiguous(deltas) == "still alive"
        assert peers.processes[0].poll() is None
        log = peers.log_text()
        assert "bad body" in log  # the Submit, on the api socket
        assert "bad envelope" in log  # the random frames, on the scheduler socket
        assert "unknown request" in log and "corrupt token output" in log


async def test_scheduler_restart_resumes_held_requests(
    ipc_dir: Path, model_dir: Path, encoder: PromptEncoder
) -> None:
    ids = encoder.encode_text("before the restart 😀 and after it")
    # Cut inside the emoji: its first bytes are held back when the scheduler dies.
    decode = encoder.tokenizer.decode
    cut = next(n for n in range(1, len(ids)) if decode(ids[:n]).endswith("\ufffd"))
    async with tokenizer_mesh(ipc_dir, model_dir) as peers:
        sampling = SamplingParams(max_tokens=64, seed=7)
        await peers.generate(generate_request("r1", prompt="p", sampling=sampling,
                                              priority=3, cache_salt="t"))
        first = await peers.submitted()
        await peers.generate(generate_request("r2", prompt="q", sampling=sampling, n=2))
        await peers.submitted()
        # r1 got its ids up to the middle of the emoji; r2's choices nothing yet.
        await peers.tokens(TokenOutput("r1", pack_i32(ids[:cut]), 0, 1))
        deltas = list((await peers.expect(peers.api, TextBatch)).body.deltas)
        assert [d.request_id for d in deltas] == ["r1"]
        assert "\ufffd" not in deltas[0].text
        # The scheduler dies; a new incarnation binds the same address.
        peers.scheduler_scope.cancel()
        restarted: RouterEndpoint[Any] = RouterEndpoint(
            peers.zmq, peers.scheduler.address, Identity("scheduler", 0),
            FromTokenizerToScheduler, heartbeat_s=HEARTBEAT_S,
        )
        try:
            async with anyio.create_task_group() as tg:
                await tg.start(restarted.run)
                resumed = {}
                for _ in range(3):
                    submit = (await peers.expect(restarted, Submit)).body
                    resumed[submit.request_id] = submit
                assert sorted(resumed) == ["r1", "r2-0", "r2-1"]
                r1 = resumed["r1"]
                assert r1.resumed and r1.n == 1
                assert (r1.prompt_token_ids, r1.sampling, r1.priority, r1.cache_salt) == (
                    first.prompt_token_ids, sampling, 3, "t")
                assert list(unpack_i32(r1.output_token_ids)) == ids[:cut]
                # Each choice resumes on its own, with its choice seed.
                assert [resumed[f"r2-{i}"].sampling.seed for i in (0, 1)] == [7, 8]
                assert all(resumed[f"r2-{i}"].output_token_ids == b"" for i in (0, 1))
                # The new scheduler's outputs go on from num_prior = cut: the text
                # completes the emoji, nothing repeated, nothing missing.
                peer = restarted.peers_of("tokenizer")[0]
                for out in one_by_one("r1", ids, "stop")[cut:]:
                    await restarted.send(peer, TokenBatch([out]))
                while deltas[-1].finish_reason is None:
                    batch = (await peers.expect(peers.api, TextBatch)).body
                    deltas += [d for d in batch.deltas if d.request_id == "r1"]
                assert assert_contiguous(deltas) == encoder.tokenizer.decode(ids)
                assert deltas[-1].completion_tokens == len(ids)
                assert "scheduler restarted, resuming held requests" in peers.log_text()
                tg.cancel_scope.cancel()
        finally:
            restarted.close()


async def test_beyond_max_inflight_requests_are_busy(ipc_dir: Path, model_dir: Path) -> None:
    async with tokenizer_mesh(ipc_dir, model_dir, extra_env={"MESHSERVE_MAX_INFLIGHT": "1"}
                              ) as peers:
        assert peers.tokenizer().hello.capacity == 1
        await peers.generate(generate_request("first", prompt="p"))
        await peers.submitted()
        await peers.generate(generate_request("second", prompt="p"))
        busy = (await peers.expect(peers.api, RequestFailed)).body
        assert (busy.request_id, busy.status, busy.code) == ("second", 429, "server_busy")


async def test_two_replicas_register_with_the_api(ipc_dir: Path, model_dir: Path) -> None:
    async with tokenizer_mesh(ipc_dir, model_dir, replicas=(0, 1)) as peers:
        names = sorted(p.name for p in peers.api.peers_of("tokenizer"))
        assert names == ["tokenizer/0", "tokenizer/1"]
        # Each serves its own requests.
        for replica in (0, 1):
            await peers.generate(generate_request(f"on-{replica}", prompt="p"), replica=replica)
            received = await peers.expect(peers.scheduler, Submit)
            assert received.envelope.sender == f"tokenizer/{replica}"


async def test_spans_join_the_request_trace(
    ipc_dir: Path, model_dir: Path, encoder: PromptEncoder
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    parent = SpanContext(0x1234, 0x5678, is_remote=True,
                         trace_flags=TraceFlags(TraceFlags.SAMPLED))
    ctx = trace.set_span_in_context(NonRecordingSpan(parent))
    ids = encoder.encode_text("traced output")
    async with tokenizer_mesh(
        ipc_dir, model_dir, in_process_tracer=provider.get_tracer("test")
    ) as peers:
        await peers.generate(generate_request("t", prompt="a traced prompt"), ctx=ctx)
        submitted = await peers.expect(peers.scheduler, Submit)
        prompt_tokens = len(unpack_i32(submitted.body.prompt_token_ids))
        await collect_text(peers, "t", one_by_one("t", ids, "stop", prompt_tokens))
    spans = {span.name: span for span in exporter.get_finished_spans()}
    encode, finish = spans["tokenizer.encode"], spans["tokenizer.finish"]
    assert encode.parent is not None and encode.parent.span_id == 0x5678
    assert encode.context.trace_id == 0x1234
    assert encode.attributes is not None
    assert encode.attributes["gen_ai.usage.input_tokens"] == prompt_tokens
    # The scheduler's spans hang under the encode span.
    assert f"{encode.context.span_id:016x}" in submitted.envelope.traceparent
    assert finish.parent is not None and finish.parent.span_id == encode.context.span_id
    assert finish.attributes is not None
    assert finish.attributes["gen_ai.usage.output_tokens"] == len(ids)
    assert tuple(finish.attributes["gen_ai.response.finish_reasons"]) == ("stop",)


async def test_a_grammar_that_does_not_compile_is_refused_naming_its_field(
    ipc_dir: Path, model_dir: Path
) -> None:
    """Structured outputs: the replica compiles each grammar against the model's
    tokenizer before submitting; a broken one is a 400 naming the client's field."""
    from shared.grammar import json_schema_grammar, regex_grammar

    async with tokenizer_mesh(ipc_dir, model_dir) as peers:
        broken = SamplingParams(grammar=regex_grammar("a(b"), grammar_field="guided_regex")
        await peers.generate(generate_request("bad", prompt="p", sampling=broken))
        refused = (await peers.expect(peers.api, RequestFailed)).body
        assert (refused.request_id, refused.status) == ("bad", 400)
        assert "`guided_regex`" in refused.message and "unclosed group" in refused.message
        unknown = SamplingParams(grammar=json_schema_grammar({"type": "nonsense"}),
                                 grammar_field="response_format.json_schema")
        await peers.generate(generate_request("odd", prompt="p", sampling=unknown))
        refused = (await peers.expect(peers.api, RequestFailed)).body
        assert refused.status == 400 and "response_format.json_schema" in refused.message
        await peers.barrier()  # neither was submitted

        good = SamplingParams(grammar=json_schema_grammar({"type": "object"}),
                              grammar_field="response_format")
        await peers.generate(generate_request("ok", prompt="p", sampling=good))
        submitted = await peers.submitted()
        assert submitted.request_id == "ok" and submitted.sampling.grammar == good.grammar
