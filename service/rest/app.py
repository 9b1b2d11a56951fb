"""The OpenAI-compatible REST shim, with health and Prometheus metrics, next to the gRPC server or alone.

Routes: POST /v1/chat/completions (JSON, or server-sent events with "stream":
true), GET /v1/models[/{id}], POST /api/v1 (Dataoorts' request wrapper),
/health/live, /health/ready, /metrics. Requests become the contract's
protobuf (service.rest.request) and go through a ChatBackend: ChatCompletions
in this process, or a remote server's gRPC API (service.rest.upstream). Errors
before a stream starts get an HTTP status from service.rest.errors; after it
started, a `data: {"error": ...}` event, then `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterator
from contextlib import aclosing, contextmanager
from typing import Any, TypeVar

import grpc
import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from service.admission import Admission, Call
from service.chat.completions import ChatCompletions
from service.config import Config, ServerConfig
from service.errors import ServiceError
from service.gen.llmserve.v1 import chat_pb2
from service.models.registry import ModelRegistry
from service.rest.backends import ChatBackend, InProcessBackend
from service.rest.errors import dataoorts_error, openai_error
from service.rest.request import ParsedChat, decode_json, parse_chat, parse_dataoorts
from service.rest.response import (
    DONE,
    chunk_event,
    completion_json,
    dataoorts_json,
    dumps,
    event,
    model_json,
    models_json,
)

log = logging.getLogger("llmserve.request")

_INTERNAL = ServiceError(grpc.StatusCode.INTERNAL, "internal error")
PARSE_INLINE_BYTES = 16 * 1024  # larger chat bodies are parsed on a worker thread

T = TypeVar("T")


def _json(body: dict[str, Any], status: int, caller: Call | None) -> Response:
    headers = {"x-request-id": caller.request_id} if caller else None
    return Response(dumps(body).encode(), status, headers, media_type="application/json")


async def _disconnected(receive: Receive) -> None:
    """Returns when the client has gone away (to be called once the request body has been read)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Awaits `work`, cancelling it if the client goes away first, so an abandoned request frees the engine."""
    task = asyncio.ensure_future(work)
    watching = asyncio.ensure_future(_disconnected(request.receive))
    try:
        await asyncio.wait({task, watching}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watching.cancel()
        if not task.done():
            task.cancel()
        await asyncio.gather(task, watching, return_exceptions=True)
    if task.cancelled():
        raise ServiceError(grpc.StatusCode.CANCELLED, "the client closed the connection")
    return task.result()


class EventStream:
    """Server-sent events, one write each; a client that goes away cancels the producer, and so the generation."""

    def __init__(self, events: AsyncIterator[bytes], request_id: str) -> None:
        self._events = events
        self._headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                         (b"x-request-id", request_id.encode())]

    async def _send_all(self, send: Send) -> None:
        async for data in self._events:
            await send({"type": "http.response.body", "body": data, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self._headers})
        sending = asyncio.ensure_future(self._send_all(send))
        watching = asyncio.ensure_future(_disconnected(receive))
        try:
            await asyncio.wait({sending, watching}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (sending, watching):
                task.cancel()
            await asyncio.gather(sending, watching, return_exceptions=True)
            await self._events.aclose()


class RestApi:
    """The routes over one ChatBackend."""

    def __init__(self, config: ServerConfig, backend: ChatBackend) -> None:
        self._config = config
        self._backend = backend

    def _caller(self, request: Request) -> Call:
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        authorization = request.headers.get("authorization", "")
        timeout = request.headers.get("x-request-timeout")
        if timeout is None:
            return Call(request_id, None, authorization)
        try:
            seconds = float(timeout)
        except ValueError:
            seconds = 0.0
        if not 0 < seconds < 1e9:
            raise ServiceError.invalid_field("x-request-timeout",
                                             f"must be a positive number of seconds, got {timeout!r}")
        return Call(request_id, time.monotonic() + seconds, authorization)

    async def _body(self, request: Request) -> dict[str, Any]:
        return decode_json(await self._raw_body(request))

    async def _chat_body(self, request: Request) -> ParsedChat:
        """A large body (a schema of thousands of properties) is decoded and checked on a worker thread: on the
        event loop it would hold up every other stream's chunks."""
        raw = await self._raw_body(request)

        def parse() -> ParsedChat:
            return parse_chat(decode_json(raw), self._config.ignore_unknown_fields)

        return parse() if len(raw) <= PARSE_INLINE_BYTES else await asyncio.to_thread(parse)

    async def _raw_body(self, request: Request) -> bytes:
        limit = self._config.max_message_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise ServiceError.invalid_field("body", f"the request is {declared} bytes; at most {limit} are accepted")
        raw = await request.body()
        if len(raw) > limit:
            raise ServiceError.invalid_field("body", f"the request is {len(raw)} bytes; at most {limit} are accepted")
        return raw

    def _log(self, request: Request, caller: Call | None, started: float, status: int, model: str | None) -> None:
        log.info("request", extra={"request_id": caller and caller.request_id, "method": request.method,
                                   "path": request.url.path, "model": model, "status": status,
                                   "seconds": round(time.monotonic() - started, 4)})

    async def chat_completions(self, request: Request) -> Response | EventStream:
        started, caller, model = time.monotonic(), None, None
        try:
            caller = self._caller(request)
            self._backend.admit(caller)
            parsed = await self._chat_body(request)
            model = parsed.request.model
            if parsed.stream:
                chunks = self._backend.stream(parsed.request, caller)
                try:
                    first = await _unless_disconnected(request, anext(chunks))  # errors until here get a status
                except BaseException:
                    await chunks.aclose()
                    raise
                self._log(request, caller, started, 200, model)
                return EventStream(self._events(first, chunks, parsed.request.stream_options.include_usage),
                                   caller.request_id)
            completion = await _unless_disconnected(request, self._backend.create(parsed.request, caller))
            self._log(request, caller, started, 200, model)
            return _json(completion_json(completion), 200, caller)
        except Exception as e:
            status, body = openai_error(self._service_error(e))
            self._log(request, caller, started, status, model)
            return _json(body, status, caller)

    @staticmethod
    def _service_error(e: Exception) -> ServiceError:
        if isinstance(e, ServiceError):
            return e
        log.error("internal error", exc_info=e)
        return _INTERNAL

    async def _events(self, first: chat_pb2.ChatCompletionChunk, chunks: AsyncIterator[chat_pb2.ChatCompletionChunk],
                      usage_null: bool) -> AsyncIterator[bytes]:
        async with aclosing(chunks):
            try:
                yield chunk_event(first, usage_null)
                async for chunk in chunks:
                    data = chunk_event(chunk, usage_null)
                    if data:
                        yield data
            except Exception as e:
                yield event(openai_error(self._service_error(e))[1])
        yield DONE

    async def dataoorts(self, request: Request) -> Response:
        """POST /api/v1: Dataoorts' wrapper around a unary chat completion."""
        started, caller, model = time.monotonic(), None, None
        try:
            caller = self._caller(request)
            self._backend.admit(caller)
            parsed = parse_dataoorts(await self._body(request), self._config.ignore_unknown_fields)
            model = parsed.request.model
            completion = await _unless_disconnected(request, self._backend.create(parsed.request, caller))
            self._log(request, caller, started, 200, model)
            return _json(dataoorts_json(completion), 200, caller)
        except Exception as e:
            status, body = dataoorts_error(self._service_error(e))
            self._log(request, caller, started, status, model)
            return _json(body, status, caller)

    async def models(self, request: Request) -> Response:
        caller = None
        try:
            caller = self._caller(request)
            self._backend.admit(caller)
            models = await self._backend.list_models(caller)
            wanted = request.path_params.get("model_id")
            if wanted is None:
                return _json(models_json(models), 200, caller)
            for m in models.data:
                if m.id == wanted:
                    return _json(model_json(m), 200, caller)
            served = ", ".join(m.id for m in models.data)
            raise ServiceError(grpc.StatusCode.NOT_FOUND, f"model {wanted!r} is not served here; models: {served}")
        except Exception as e:
            status, body = openai_error(self._service_error(e))
            return _json(body, status, caller)

    async def live(self, _: Request) -> Response:
        return _json({"status": "live"}, 200, None)

    async def ready(self, _: Request) -> Response:
        ok, why = await self._backend.readiness()
        return _json({"status": why}, 200 if ok else 503, None)

    async def metrics(self, _: Request) -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


def create_app(config: ServerConfig, backend: ChatBackend) -> Starlette:
    api = RestApi(config, backend)
    middleware = []
    if config.cors_origin:
        middleware.append(Middleware(CORSMiddleware, allow_origins=config.cors_origin, allow_methods=["GET", "POST"],
                                     allow_headers=["*"], expose_headers=["x-request-id"]))
    return Starlette(middleware=middleware, routes=[
        Route("/v1/chat/completions", api.chat_completions, methods=["POST"]),
        Route("/v1/models", api.models, methods=["GET"]),
        Route("/v1/models/{model_id:path}", api.models, methods=["GET"]),
        Route("/api/v1", api.dataoorts, methods=["POST"]),
        Route("/health/live", api.live),
        Route("/health/ready", api.ready),
        Route("/metrics", api.metrics),
    ])


class _Uvicorn(uvicorn.Server):
    """uvicorn that leaves SIGTERM to the process: uvicorn's own handler would close HTTP at once, before the
    drain that lets running streams finish while /health/ready answers 503."""

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class RestServer:
    """uvicorn inside the caller's event loop, started and stopped with it."""

    def __init__(self, config: ServerConfig, backend: ChatBackend) -> None:
        self._server = _Uvicorn(uvicorn.Config(
            create_app(config, backend), host=config.host, port=config.http_port, log_config=None, access_log=False,
            lifespan="off", timeout_graceful_shutdown=1))
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._server.serve())
        while not self._server.started:
            if self._task.done():
                self._task.result()
                raise SystemExit("HTTP server failed to start")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        self._server.should_exit = True
        if self._task:
            await self._task


class HttpServer(RestServer):
    """The co-located shim: the chat path of this server's process, with its API keys and serving state."""

    def __init__(self, config: Config, completions: ChatCompletions, registry: ModelRegistry,
                 admission: Admission) -> None:
        super().__init__(config.server, InProcessBackend(completions, registry, admission))
