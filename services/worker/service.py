"""The worker actor: a DEALER to the scheduler around one ``ModelRunner``.

    scheduler ──StepPlan──▶ inbox ─▶ plan queue (bounded) ─▶ executor ─▶ thread: runner.execute
    scheduler ◀─StepResult───────────────────────────────────────┘

Plans run strictly in arrival order in a worker thread, so the event loop keeps
heartbeating while torch computes; the scheduler runs a step or two ahead, and
those plans wait in the queue. Each plan is launched before the step ahead of it
is collected (``ModelRunner.launch``/``collect``): on CUDA the host prepares step
N+1 while the GPU computes step N, and N's sampled ids come back while N+1 runs.
A full queue is answered at once with an error result ("busy"), never by
blocking the inbox.

While a step call runs in the thread, ``runtime.busy_since`` is set, so every
heartbeat to the supervisor says for how long (``Hello.busy_s``): a step that never
completes (a hung kernel) gets the worker killed and restarted by the supervisor
even though the event loop keeps beating.

KV transfers (``transfer_host.py``) run beside the executor in the same task
group: their commands arrive on the scheduler socket and skip the plan queue, so a
transfer in flight never holds a step back, nor a step a transfer.

A scheduler restart voids every request the worker holds (the new scheduler never
heard of them): each queued plan carries the scheduler incarnation it came from,
and the executor resets the runner before the first plan of a new incarnation and
drops plans of an old one.
"""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import anyio
import msgspec
import torch
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from opentelemetry.context import Context
from opentelemetry.trace import Link, Span, StatusCode

from services.worker.config import WorkerConfig
from services.worker.device import gpu_count, replica_device, resolve_device
from services.worker.kv_transfer.engine import KvTransferEngine
from services.worker.kv_transfer.staging import BlockStager
from services.worker.runner import LaunchedStep, ModelRunner
from services.worker.transfer_host import TransferHost
from shared.config import load_config
from shared.endpoints import connect_dealer
from shared.logs import get_logger
from shared.mesh import DealerEndpoint, Received, UpstreamJoined, UpstreamLost
from shared.model_source import resolve_model_dir
from shared.protocol.common import Rejected
from shared.protocol.envelope import unpack_i32
from shared.protocol.step import StepPlan, StepResult
from shared.protocol.transfer import KvTransferCancel, KvTransferIn, KvTransferOut
from shared.service import ServiceRuntime
from shared.telemetry import span_context_of, tracer

log = get_logger("meshserve.worker")
_tracer = tracer("meshserve.worker")

# Plans that may wait while one computes. The scheduler keeps a couple of steps in
# flight; this is also the ``capacity`` the worker announces in its hello.
PLAN_QUEUE_SIZE = 8


@dataclass(frozen=True, slots=True)
class QueuedPlan:
    plan: StepPlan
    context: Context  # the trace context the plan arrived with
    epoch: int  # which scheduler incarnation sent it


def _num_tokens(plan: StepPlan) -> int:
    """Tokens the plan computes (0 when its array is malformed; the runner says why)."""
    num_tokens = plan.batch.num_tokens
    return sum(unpack_i32(num_tokens)) if len(num_tokens) % 4 == 0 else 0


class WorkerActor:
    def __init__(self, runtime: ServiceRuntime, runner: ModelRunner, overlap: bool = True,
                 fault_stall_file: str = "", transfers: KvTransferEngine | None = None,
                 role: str = "both") -> None:
        self.runner = runner
        self._runtime = runtime
        self._fault_stall_file = fault_stall_file
        self.overlap = overlap and runner.launches_async
        details = msgspec.structs.replace(runner.details(), role=role)
        if transfers is not None:
            details = msgspec.structs.replace(details, transfer_addr=transfers.address)
        # The hello carries the KV geometry the scheduler plans with.
        self.endpoint: DealerEndpoint[StepPlan] = connect_dealer(
            runtime, runtime.addresses.scheduler_addr,
            StepPlan | KvTransferOut | KvTransferIn | KvTransferCancel,
            hello=lambda: runtime.identity.hello(capacity=PLAN_QUEUE_SIZE, worker=details),
        )
        self.transfers = TransferHost(transfers, runner.num_kv_blocks,
                                      self.endpoint.rejections, self.endpoint.send)
        plans_in, plans_out = anyio.create_memory_object_stream[QueuedPlan](PLAN_QUEUE_SIZE)
        self._plans_in: MemoryObjectSendStream[QueuedPlan] = plans_in
        self._plans_out: MemoryObjectReceiveStream[QueuedPlan] = plans_out
        self._epoch = 0  # bumped when the scheduler comes back as a new incarnation
        self._runner_epoch = 0

    async def run(self) -> None:
        async with anyio.create_task_group() as tg:
            await tg.start(self.endpoint.run)
            await tg.start(self.transfers.run)
            tg.start_soon(self._execute_plans)
            async for event in self.endpoint.inbox:
                await self._on_event(event)

    async def _on_event(self, event: object) -> None:
        match event:
            case Received(body=StepPlan() as plan):
                await self._enqueue(QueuedPlan(plan, event.context, self._epoch))
            case Received(body=KvTransferOut() | KvTransferIn() | KvTransferCancel() as command):
                await self.transfers.on_command(command, event.context)
            case Received(body=Rejected() as body):
                log.warning("the scheduler rejected a message", reason=body.reason)
            case Received(body=body, envelope=envelope):
                self.endpoint.rejections.record(
                    envelope.sender, f"{type(body).__name__} is not expected by a worker"
                )
            case UpstreamJoined(welcome=welcome, restarted=restarted):
                if restarted:
                    self._epoch += 1
                    log.warning("scheduler restarted; dropping its requests",
                                incarnation=welcome.incarnation)
                    await self.transfers.cancel_all()
                else:
                    log.info("scheduler reached", incarnation=welcome.incarnation)
            case UpstreamLost(reason=reason):
                log.warning("scheduler unreachable", reason=reason)

    async def _enqueue(self, queued: QueuedPlan) -> None:
        try:
            self._plans_in.send_nowait(queued)
        except anyio.WouldBlock:
            reason = f"worker busy: {PLAN_QUEUE_SIZE} plans already queued"
            self.endpoint.rejections.record("scheduler", f"step {queued.plan.step_id}: {reason}")
            await self.endpoint.send(StepResult(queued.plan.step_id, [], b"", error=reason))

    async def _execute_plans(self) -> None:
        """Launch each plan, and collect the step before it only after that: the
        host prepares step N+1 while the GPU still computes step N, and N's
        tokens cross to the host while N+1 runs. With no plan waiting, the step
        in flight is collected at once (nothing to overlap it with)."""
        in_flight: _InFlight | None = None
        while True:
            if in_flight is None:
                try:
                    queued = await self._plans_out.receive()
                except anyio.EndOfStream:
                    return
            else:
                try:
                    queued = self._plans_out.receive_nowait()
                except anyio.WouldBlock:
                    await self._finish(in_flight)
                    in_flight = None
                    continue
            if queued.epoch < self._epoch:
                continue  # planned by a scheduler that no longer exists
            if queued.epoch > self._runner_epoch:
                if in_flight is not None:
                    await self._finish(in_flight)  # (its result is dropped: stale)
                    in_flight = None
                self.runner.reset()
                self._runner_epoch = queued.epoch
            in_flight = await self._launch(queued, in_flight)
            if not self.overlap:
                await self._finish(in_flight)
                in_flight = None

    async def _launch(self, queued: QueuedPlan, previous: _InFlight | None) -> _InFlight:
        plan = queued.plan
        # One span per step: a child of the scheduler's step span, linked to every
        # request it serves.
        links = [Link(ctx) for ctx in map(span_context_of, plan.trace_links) if ctx.is_valid]
        attributes = {
            "meshserve.step_id": plan.step_id,
            "meshserve.batch_size": len(plan.batch.request_ids),
            "meshserve.num_tokens": _num_tokens(plan),
            "meshserve.new_requests": len(plan.new),
        }
        span = _tracer.start_span("worker.step", context=queued.context, links=links,
                                  attributes=attributes)
        with self._busy():
            launched = await anyio.to_thread.run_sync(self._launch_in_thread, plan)
        if previous is not None:
            await self._finish(previous)
        return _InFlight(queued, launched, span)

    async def _finish(self, in_flight: _InFlight) -> None:
        queued, span = in_flight.queued, in_flight.span
        try:
            with self._busy():
                result = await anyio.to_thread.run_sync(self.runner.collect, in_flight.launched)
            if queued.epoch < self._epoch:
                # The scheduler restarted while this step ran; its step ids start
                # over, so this result could be mistaken for one of the new ones.
                return
            if result.error is not None:
                span.set_status(StatusCode.ERROR, result.error)
                self.endpoint.rejections.record(
                    "scheduler", f"step {queued.plan.step_id}: {result.error}")
            else:
                span.set_attribute("meshserve.sampled", len(result.request_ids))
            await self.endpoint.send(result)
        finally:
            span.end()


    @contextlib.contextmanager
    def _busy(self) -> Iterator[None]:
        """A step call runs in the thread: the heartbeat reports for how long."""
        self._runtime.busy_since = time.monotonic()
        try:
            yield
        finally:
            self._runtime.busy_since = None

    def _launch_in_thread(self, plan: StepPlan) -> LaunchedStep:
        if self._fault_stall_file:
            _stall_if_asked(self._fault_stall_file)
        return self.runner.launch(plan)


def _stall_if_asked(path: str) -> None:
    """Fault injection for the watchdog's tests (``fault_stall_file``): the step
    that finds the file removes it and never returns, like a hung kernel, while
    the event loop keeps beating. Removing it first makes it fire once per mesh,
    not once per restarted incarnation."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return
    log.warning("fault injection: this step never completes", path=path)
    threading.Event().wait()


@dataclass(frozen=True, slots=True)
class _InFlight:
    """A launched step whose tokens are not collected yet."""

    queued: QueuedPlan
    launched: LaunchedStep
    span: Span


def _load_runner(config: WorkerConfig, device: str) -> ModelRunner:
    model_dir = resolve_model_dir(config.model, config.revision)
    return ModelRunner(
        model_dir,
        device=device,
        dtype=config.dtype,
        num_kv_blocks=config.num_kv_blocks,
        block_size=config.block_size,
        max_model_len=config.max_model_len,
        graph_max_batch=config.cuda_graph_max_batch,
        graph_max_tokens=config.cuda_graph_max_tokens,
        quantization=config.quantization,
        kv_cache_dtype=config.kv_cache_dtype,
    )


async def main(runtime: ServiceRuntime) -> None:
    config = load_config(WorkerConfig)
    if config.torch_threads > 0:
        torch.set_num_threads(config.torch_threads)
    elif resolve_device(config.device).type == "cpu":
        # On a CPU host the api, tokenizer and scheduler need cores too: a worker
        # that takes them all makes every step wait on oversubscribed threads.
        torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))
    device = replica_device(config.device, runtime.identity.replica, gpu_count())
    log.info("loading model", model=config.model or "(embedded)", device=device)
    # Off the event loop: loading takes seconds, and the supervisor link keeps beating.
    runner = await anyio.to_thread.run_sync(functools.partial(_load_runner, config, device))
    log.info("model loaded", **msgspec.structs.asdict(runner.details()),
             dtype=str(runner.dtype).removeprefix("torch."),
             quantization=config.quantization or "none",
             kv_cache_dtype=str(runner.kv_cache_dtype).removeprefix("torch."))
    runtime.capacity = PLAN_QUEUE_SIZE
    runtime.ready = True
    await WorkerActor(runtime, runner, overlap=config.overlap_steps,
                      fault_stall_file=config.fault_stall_file,
                      transfers=_transfer_engine(runtime, config, runner),
                      role=config.worker_role).run()


def _transfer_engine(runtime: ServiceRuntime, config: WorkerConfig,
                     runner: ModelRunner) -> KvTransferEngine | None:
    """The worker's KV transfer engine over its cache, when it has a transfer address."""
    if not config.transfer_addr:
        return None
    stager = BlockStager(runner.kv_cache)
    if config.transfer_backend not in ("zmq", "nccl"):
        raise ValueError(f"transfer_backend must be zmq or nccl, not {config.transfer_backend!r}")
    nccl = None
    if config.transfer_backend == "nccl":
        # Imported only when asked for: it brings torch.distributed along.
        from services.worker.kv_transfer.nccl import NcclDataPath

        nccl = NcclDataPath(stager, config.transfer_nccl_store_dir
                            or os.path.join(tempfile.gettempdir(), f"meshserve-nccl-{os.getuid()}"))
    return KvTransferEngine(runtime.zmq, config.transfer_addr, runtime.identity.name, stager,
                            chunk_bytes=config.transfer_chunk_bytes,
                            window=config.transfer_window, auth=runtime.auth, nccl=nccl)
