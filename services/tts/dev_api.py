"""``python -m services.tts.dev_api``: an HTTP server with only the speech routes.

For running and testing the tts path on its own (tests, ``bench/tts_bench.py``)
without the text side of the mesh; the real api mounts the same ``SpeechGateway``
and routes beside its text routes. Binds ``MESHSERVE_SPEECH_ADDR`` for tts replicas
and serves ``MESHSERVE_HOST``:``MESHSERVE_PORT`` (port 0: any free port). It logs
``http listening`` with the bound port, and ``tts replica ready`` when a replica can
take requests; ``/health`` answers 200 from then on.
"""

from __future__ import annotations

import anyio
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from services.api.config import ApiConfig
from services.api.server import EmbeddedServer
from services.api.speech import SpeechGateway, speech_routes
from shared.config import load_config
from shared.logs import get_logger
from shared.service import ServiceRuntime, serve

log = get_logger("meshserve.tts.dev_api")


def build_app(gateway: SpeechGateway, request_timeout_s: float) -> Starlette:
    async def health(request: Request) -> Response:
        ready = bool(gateway.ready_replicas())
        return PlainTextResponse("ok" if ready else "no tts replica", 200 if ready else 503)

    async def metrics(request: Request) -> Response:
        return PlainTextResponse(gateway.metrics_text(), media_type="text/plain; version=0.0.4")

    return Starlette(routes=[
        *speech_routes(gateway, request_timeout_s=request_timeout_s),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ])


async def main(runtime: ServiceRuntime) -> None:
    config = load_config(ApiConfig)
    gateway = SpeechGateway(
        runtime.zmq, runtime.addresses.speech_addr, runtime.identity,
        heartbeat_s=runtime.process.heartbeat_s,
    )
    server = EmbeddedServer(uvicorn.Config(
        build_app(gateway, config.request_timeout_s),
        host=config.host, port=config.port, log_config=None, lifespan="off",
        timeout_graceful_shutdown=1,
    ))
    async with anyio.create_task_group() as tg:
        await tg.start(gateway.run)

        async def run_http() -> None:
            # Shielded so uvicorn closes its listener and connections after we are
            # cancelled; should_exit (set below) is what stops it.
            with anyio.CancelScope(shield=True):
                await server.serve()

        async def announce_ready() -> None:
            await gateway.wait_for_replicas(1)  # the gateway logs "tts replica ready"
            runtime.ready = True

        tg.start_soon(run_http)
        tg.start_soon(announce_ready)
        try:
            await server.listening.wait()
            port = server.servers[0].sockets[0].getsockname()[1]
            log.info("http listening", host=config.host, port=port)
            await anyio.sleep_forever()
        finally:
            server.should_exit = True


if __name__ == "__main__":
    serve("api", main)
