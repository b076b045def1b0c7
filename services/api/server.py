"""The api process: the text actor, the speech gateway and uvicorn in one task group.

uvicorn runs *inside* the service's task group rather than owning the event
loop, and without its signal handlers: the api asks ``shared/service.py`` to turn
the first SIGTERM/SIGINT into ``runtime.stop_requested`` (a second one cancels).

Shutdown (drain.py): on SIGTERM new requests get 503 ``shutting_down`` with
``Retry-After`` and /health/ready turns 503, while uvicorn keeps answering; the
requests in flight get ``shutdown_timeout_s`` to finish. What is left then is failed
(503; a stream ends with an error event and ``[DONE]``) and aborted in the mesh, and
gets up to ``shutdown_grace_s`` to be answered. Then the task group is cancelled:
uvicorn stops accepting, closes idle connections, waits up to ``shutdown_grace_s``
for the rest, and the process exits 0.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable, Iterator

import anyio
import uvicorn
from anyio.abc import TaskStatus
from starlette.types import ASGIApp

from services.api.app import build_app
from services.api.auth import ApiKeyCheck, ApiKeyGuard, parse_api_keys
from services.api.config import ApiConfig
from services.api.errors import ApiError
from services.api.http_protocol import bounded_h11
from services.api.metrics import render_auth_metrics
from services.api.service import ApiActor
from services.api.speech_gateway import SpeechGateway
from services.api.speech_routes import speech_routes
from shared.config import load_config
from shared.logs import get_logger
from shared.model_source import served_model_name
from shared.service import ServiceRuntime

log = get_logger("meshserve.api")


class EmbeddedServer(uvicorn.Server):
    """A uvicorn server that leaves signals alone and says when it is listening."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.listening = anyio.Event()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn would install SIGINT/SIGTERM handlers of its own (and re-raise
        # the signal on exit); the service runtime owns signals.
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            self.listening.set()

    def bound_port(self) -> int:
        port: int = self.servers[0].sockets[0].getsockname()[1]
        return port


async def serve_http(
    app: ASGIApp,
    config: ApiConfig,
    on_stop: Callable[[], None],
    *,
    task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` until cancelled; reports the bound port once listening.

    ``on_stop`` runs first on the way out, before uvicorn drains connections.
    """
    server = EmbeddedServer(uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        log_config=None,
        lifespan="off",
        http=bounded_h11(config.header_timeout_s),
        h11_max_incomplete_event_size=config.max_header_bytes,
        timeout_keep_alive=config.keep_alive_timeout_s,  # type: ignore[arg-type]
        timeout_graceful_shutdown=config.shutdown_grace_s,  # type: ignore[arg-type]
    ))

    async def run_server() -> None:
        # Shielded: uvicorn must run its shutdown (close the listener, drain
        # connections) after we are cancelled; it stops once should_exit is set.
        with anyio.CancelScope(shield=True):
            try:
                await server.serve()
            except SystemExit as e:  # uvicorn exits the process when it cannot bind
                raise OSError(f"cannot serve HTTP on {config.host}:{config.port}") from e
        if not server.should_exit:
            raise RuntimeError("the HTTP server stopped on its own")

    async with anyio.create_task_group() as tg:
        tg.start_soon(run_server)
        try:
            await server.listening.wait()
            port = server.bound_port()
            log.info("http listening", host=config.host, port=port)
            task_status.started(port)
            await anyio.sleep_forever()
        finally:
            on_stop()
            server.should_exit = True


async def drain(actor: ApiActor, speech: SpeechGateway, config: ApiConfig) -> None:
    """Refuse new requests, let those in flight finish within ``shutdown_timeout_s``,
    then fail and abort the rest (drain.py has the whole sequence)."""

    def idle() -> bool:
        return not len(actor.registry) and not speech.flights

    actor.drain.start()
    log.info("draining", text_requests=len(actor.registry), speech_requests=len(speech.flights),
             timeout_s=config.shutdown_timeout_s)
    with anyio.move_on_after(config.shutdown_timeout_s):
        await actor.drain.wait_until(idle)
    if idle():
        log.info("drained")
        return
    log.warning("drain deadline passed; failing what is left",
                text_requests=len(actor.registry), speech_requests=len(speech.flights))
    # Failed while the sockets are still open: each handler then answers its client
    # and releases its flight, which aborts the request in the mesh.
    error = ApiError(503, f"the api shut down before this request finished (shutdown "
                     f"timeout {config.shutdown_timeout_s:g} s)", code="shutting_down")
    actor.fail_all(error)
    for flight in list(speech.flights.values()):
        flight.fail(error)
    with anyio.move_on_after(config.shutdown_grace_s):
        await actor.drain.wait_until(idle)


async def main(runtime: ServiceRuntime) -> None:
    config = load_config(ApiConfig)
    served = served_model_name(config.model, config.served_model_name)
    # Before anything serves: the first SIGTERM now means "drain", not "cancel".
    runtime.drains_on_signal = True
    actor = ApiActor(runtime, config)
    speech = SpeechGateway(runtime, config, drain=actor.drain)

    def auth_metrics() -> str:
        # `guard` wraps the app built below; /metrics is served only once it exists.
        zmq_refused = runtime.auth.failures if runtime.auth is not None else 0
        return render_auth_metrics(guard.refusals.count, zmq_refused)

    app = build_app(
        actor, config, served,
        extra_routes=speech_routes(speech, config),
        metrics_sources=[speech.render_metrics, auth_metrics],
    )
    guard = ApiKeyGuard(app, ApiKeyCheck(parse_api_keys(config.api_key)))
    log.info("serving", model=served)
    async with anyio.create_task_group() as tg:
        await tg.start(actor.run)
        await tg.start(speech.run)
        await tg.start(serve_http, guard, config, actor.stop)
        await runtime.stop_requested.wait()
        await drain(actor, speech, config)
        tg.cancel_scope.cancel()
