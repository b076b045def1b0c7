"""The Starlette app: OpenAI's text routes over the api actor, /health (/health/ready,
/health/live), /metrics,
and whatever joins through ``extra_routes`` (the speech routes, ``speech_routes.py``).

Every failure is an OpenAI error body with a 4xx/5xx status, including routing
errors and bugs (a 500 with a message, never a traceback). A generation request
owns its flight from ``submit`` until the response is fully sent or the client is
gone; ``ApiActor.release`` runs in every case (shielded from cancellation), which
is what aborts an abandoned request in the mesh.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import aclosing

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from services.api.body import read_json
from services.api.config import ApiConfig
from services.api.disconnect import cancelled_on_disconnect
from services.api.errors import ApiError
from services.api.generation_plan import (
    GenerationPlan,
    PlanContext,
    plan_chat,
    plan_completion,
)
from services.api.metrics import ApiMetrics
from services.api.openai_schema import (
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
)
from services.api.openapi import openapi_route
from services.api.render import ResponseCollector, StreamRenderer, usage_of
from services.api.request_ids import RequestIds, request_id_of
from services.api.requests import ChoiceUpdate, Flight
from services.api.responses import (
    StreamingBody,
    client_gone_response,
    error_response,
    json_response,
)
from services.api.service import ApiActor
from services.api.spans import RequestSpan, context_from_headers
from services.api.tokenize_routes import TokenizeRoutes
from shared.logs import get_logger

log = get_logger("meshserve.api.http")

MetricsSource = Callable[[], str]


class OpenAIRoutes:
    """Handlers of the OpenAI-compatible routes, /health and /metrics."""

    def __init__(
        self,
        actor: ApiActor,
        config: ApiConfig,
        served_model: str,
        metrics_sources: list[MetricsSource] | None = None,
    ) -> None:
        self.actor = actor
        self.config = config
        self.served_model = served_model
        # --served-model-name A B: every alias is listed and accepted; the main name
        # is the first.
        aliases = [n.strip() for n in config.served_model_name.split(",") if n.strip()]
        self.served_models = [served_model, *(n for n in aliases if n != served_model)]
        self.created = int(time.time())
        self.metrics = ApiMetrics(served_model)
        self.metrics_sources = list(metrics_sources or [])

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/models/{model:path}", self.model, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/health/ready", self.health, methods=["GET"]),
            Route("/health/live", self.live, methods=["GET"]),
            Route("/metrics", self.render_metrics, methods=["GET"]),
        ]

    async def render_metrics(self, request: Request) -> Response:
        gauges = self.actor.gauges()
        text = self.metrics.render(gauges.scheduler, gauges.tokenizers, gauges.inflight,
                                   gauges.rejected_messages)
        text += "".join(source() for source in self.metrics_sources)
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    async def api_error(self, request: Request, exc: Exception) -> Response:
        """Errors raised before a response started (validation, admission)."""
        assert isinstance(exc, ApiError)
        self.metrics.request_failed(exc.status, exc.code)
        return error_response(exc)

    async def models(self, request: Request) -> Response:
        return json_response(ModelList(data=[self._card(name) for name in self.served_models]))

    async def model(self, request: Request) -> Response:
        name = request.path_params["model"]
        if name not in self.served_models:
            raise ApiError(404, f"The model `{name}` does not exist.",
                           code="model_not_found", param="model")
        return json_response(self._card(name))

    async def health(self, request: Request) -> Response:
        """/health/ready (and /health): 503 while draining or a service is missing."""
        report = self.actor.health_report()
        return json_response(report, 200 if report.status == "ok" else 503)

    async def live(self, request: Request) -> Response:
        """/health/live: this process serves HTTP (also while draining)."""
        return Response(b'{"status":"ok"}', media_type="application/json")

    async def completions(self, request: Request) -> Response:
        body = await read_json(request, CompletionRequest, self.config.max_request_bytes,
                               self.config.body_timeout_s)
        context = self._plan_context(request, "cmpl", body.model)
        return await self._generate(request, plan_completion(body, context))

    async def chat_completions(self, request: Request) -> Response:
        body = await read_json(request, ChatCompletionRequest, self.config.max_request_bytes,
                               self.config.body_timeout_s)
        context = self._plan_context(request, "chatcmpl", body.model)
        return await self._generate(request, plan_chat(body, context))

    def _plan_context(self, request: Request, id_prefix: str, model: str | None) -> PlanContext:
        """A new response: its id is OpenAI's prefix (``cmpl``, ``chatcmpl``) and the
        request id (``X-Request-Id``); it names the alias the client asked for."""
        rid = request_id_of(request.scope)
        served = model if model in self.served_models else self.served_model
        return PlanContext(
            served_model=served, config=self.config,
            response_id=f"{id_prefix}-{rid}", created=int(time.time()),
        )

    def _card(self, name: str) -> ModelCard:
        return ModelCard(id=name, created=self.created,
                         root=self.config.model or self.served_model,
                         max_model_len=self.actor.max_model_len())

    async def _generate(self, request: Request, plan: GenerationPlan) -> Response:
        span = RequestSpan(plan, context_from_headers(request.headers), request.url.path)
        flight = Flight(plan, span.context)
        try:
            await self.actor.submit(flight)
        except BaseException as error:
            with anyio.CancelScope(shield=True):
                await self.actor.release(flight)
            if isinstance(error, ApiError):
                span.fail(error)
            span.end()
            raise
        log.info("request submitted", request_id=plan.response_id, n=len(plan.requests),
                 stream=plan.stream)
        if plan.stream:
            return await self._start_stream(request, flight, span)
        try:
            return await self._respond(request, flight, span)
        finally:
            with anyio.CancelScope(shield=True):
                await self.actor.release(flight)
            span.end()

    def _closer(
        self, flight: Flight, span: RequestSpan,
        updates: AsyncGenerator[list[ChoiceUpdate], None],
    ) -> Callable[[bool], Awaitable[None]]:
        async def close(disconnected: bool) -> None:
            # Already closed by the body, unless the client left before it started.
            await updates.aclose()
            if disconnected and not flight.finished:
                log.info("client disconnected", request_id=flight.plan.response_id)
                span.client_gone()
                self.metrics.client_disconnected()
            await self.actor.release(flight)
            span.end()

        return close

    async def _updates(
        self, flight: Flight, span: RequestSpan
    ) -> AsyncGenerator[list[ChoiceUpdate], None]:
        """What the flight produces until it is finished; raises its ApiError."""
        timeout = self.config.request_timeout_s
        while not flight.finished:
            # The timeout counts from the mesh's last progress, not from this wait:
            # a buffered answer sleeps through many deltas.
            remaining = flight.last_progress + timeout - time.monotonic()
            with anyio.move_on_after(remaining):
                await flight.wait()
            if not flight.has_news():
                if time.monotonic() - flight.last_progress >= timeout:
                    raise ApiError(504, f"no progress from the mesh in {timeout:g}s; the "
                                   "request was aborted", code="timeout")
                continue
            updates = flight.take()
            if any(update.text for update in updates):
                span.first_token()
            yield updates

    async def _start_stream(self, request: Request, flight: Flight,
                            span: RequestSpan) -> Response:
        """The headers wait for the first delta, the end or the failure: a refusal
        by the mesh (queue full, prompt too long, no scheduler) is a 4xx/5xx with
        ``Retry-After``, not a 200 with an error event. The first delta goes out
        with the headers, so time to first token is unchanged."""
        updates = self._updates(flight, span)
        first: list[ChoiceUpdate] = []
        failure: ApiError | None = None
        try:
            # A client that leaves before the first delta is noticed here: nobody
            # reads the body yet, so StreamingBody's own watch has not started.
            async with cancelled_on_disconnect(request.receive) as watch:
                try:
                    first = await anext(updates)
                except ApiError as error:
                    failure = error
                except StopAsyncIteration:
                    pass  # finished without news: the closing events say it all
        except BaseException:
            await self._end_unstarted(flight, span, updates)
            raise
        if watch.disconnected:
            log.info("client disconnected", request_id=flight.plan.response_id)
            span.client_gone()
            self.metrics.client_disconnected()
            await self._end_unstarted(flight, span, updates)
            return client_gone_response()
        if failure is not None:
            self._failed(flight, span, failure)
            await self._end_unstarted(flight, span, updates)
            return error_response(failure)
        return StreamingBody(self._stream(flight, span, updates, first),
                             self._closer(flight, span, updates))

    async def _end_unstarted(self, flight: Flight, span: RequestSpan,
                             updates: AsyncGenerator[list[ChoiceUpdate], None]) -> None:
        """A stream that ends before its headers went out: aborted in the mesh."""
        with anyio.CancelScope(shield=True):
            await updates.aclose()
            await self.actor.release(flight)
        span.end()

    async def _stream(
        self, flight: Flight, span: RequestSpan,
        updates: AsyncGenerator[list[ChoiceUpdate], None], first: list[ChoiceUpdate],
    ) -> AsyncIterator[bytes]:
        renderer = StreamRenderer(flight.plan)
        async with aclosing(updates):
            try:
                for event in renderer.opening():
                    yield event
                for event in renderer.updates(first):
                    yield event
                async for more in updates:
                    for event in renderer.updates(more):
                        yield event
            except ApiError as error:
                self._failed(flight, span, error)
                for event in renderer.failure(error):
                    yield event
                return
        self._succeeded(flight, span)
        for event in renderer.closing(usage_of(flight.prompt_tokens, flight.completion_tokens)):
            yield event

    def _succeeded(self, flight: Flight, span: RequestSpan) -> None:
        span.succeed(flight)
        self.metrics.request_succeeded(flight.finish_reasons(), flight.prompt_tokens,
                                       flight.completion_tokens, span.ttft_s, span.elapsed_s(),
                                       flight.inter_token_latencies())

    def _failed(self, flight: Flight, span: RequestSpan, error: ApiError) -> None:
        log.info("request failed", request_id=flight.plan.response_id,
                 status=error.status, code=error.code, message=error.message)
        span.fail(error)
        self.metrics.request_failed(error.status, error.code)

    async def _respond(self, request: Request, flight: Flight, span: RequestSpan) -> Response:
        collector = ResponseCollector(flight.plan)
        failure: ApiError | None = None
        async with cancelled_on_disconnect(request.receive) as watch:
            try:
                async for updates in self._updates(flight, span):
                    collector.add(updates)
            except ApiError as error:
                failure = error
        if watch.disconnected:
            log.info("client disconnected", request_id=flight.plan.response_id)
            span.client_gone()
            self.metrics.client_disconnected()
            return client_gone_response()
        if failure is not None:
            self._failed(flight, span, failure)
            return error_response(failure)
        self._succeeded(flight, span)
        usage = usage_of(flight.prompt_tokens, flight.completion_tokens)
        return json_response(collector.render(usage))


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return error_response(ApiError(exc.status_code, str(exc.detail), code=code))


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.error("unhandled error", path=request.url.path, error=repr(exc))
    return error_response(ApiError(500, "internal server error; see the api's log",
                                   code="internal_error"))


def build_app(
    actor: ApiActor,
    config: ApiConfig,
    served_model: str,
    extra_routes: list[BaseRoute] | None = None,
    metrics_sources: list[MetricsSource] | None = None,
) -> Starlette:
    """The api's ASGI app. ``extra_routes`` lets other endpoints (speech) join it;
    each of ``metrics_sources`` appends exposition lines to /metrics."""
    openai_routes = OpenAIRoutes(actor, config, served_model, metrics_sources)
    tokenize_routes = TokenizeRoutes(actor, config, openai_routes.served_models)
    return Starlette(
        routes=openai_routes.routes() + tokenize_routes.routes() + list(extra_routes or [])
        + [openapi_route()],
        middleware=[Middleware(RequestIds)],
        exception_handlers={
            ApiError: openai_routes.api_error,
            HTTPException: _http_error,
            Exception: _unexpected,
        },
    )
