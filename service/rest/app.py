"""The OpenAI-compatible REST shim, with health and Prometheus metrics, next to the gRPC server or alone.

Routes: POST /v1/chat/completions (JSON, or server-sent events with "stream":
true), GET /v1/models[/{id}], POST /api/v1 (Dataoorts' request wrapper),
/health/live, /health/ready, /metrics. Requests become the contract's
protobuf (service.rest.request) and go through a ChatBackend: ChatCompletions
in this process, or a remote server's gRPC API (service.rest.upstream). Errors
before a stream starts get an HTTP status from service.rest.errors; after it
started, a `data: {"error": ...}` event, then `data: [DONE]`; unknown routes
and methods answer in the same shape. The key is checked before the body is
read; the body is counted as it arrives (413 at the limit, chunked or not),
and a large one is parsed in the worker pool. When a drain's grace period runs
out, running calls end with UNAVAILABLE: 503, or an error event and [DONE].
One file past the usual length: the routes and the admission, body limits and
streaming they share read together; the mapping to and from the contract lives
in request.py and response.py.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import aclosing, contextmanager
from typing import Any, TypeVar

import grpc
import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from service.admission import Admission, Call, request_id
from service.chat.completions import ChatCompletions
from service.config import Config, ServerConfig
from service.errors import ServiceError
from service.gen.llmserve.v1 import chat_pb2
from service.models.registry import ModelRegistry
from service.rest.backends import ChatBackend, InProcessBackend
from service.rest.errors import BodyTooLarge, dataoorts_error, openai_error, route_error
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
from service.worker_pool import WorkerPool

log = logging.getLogger("llmserve.request")

_INTERNAL = ServiceError(grpc.StatusCode.INTERNAL, "internal error")
_CUT_OFF = ServiceError(grpc.StatusCode.UNAVAILABLE, "the server shut down before the request finished (its grace "
                                                     "period ran out); retry on another replica")
INLINE_PARSE_BYTES = 64 * 1024  # bodies up to this are parsed on the event loop: a thread hop would cost more

T = TypeVar("T")


def _json(body: dict[str, Any], status: int, caller: Call | None) -> Response:
    headers = {"x-request-id": caller.request_id} if caller else None
    return Response(dumps(body).encode(), status, headers, media_type="application/json")


async def _disconnected(receive: Receive) -> None:
    """Returns when the client has gone away (to be called once the request body has been read)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _unless_gone(request: Request, work: Awaitable[T], cutoff: asyncio.Event) -> T:
    """Awaits `work`, cancelling it if the client goes away first (so an abandoned request frees the engine) or
    if a drain's grace period runs out (then the client gets UNAVAILABLE)."""
    task = asyncio.ensure_future(work)
    watching = asyncio.ensure_future(_disconnected(request.receive))
    cut = asyncio.ensure_future(cutoff.wait())
    try:
        await asyncio.wait({task, watching, cut}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watching.cancel()
        cut.cancel()
        if not task.done():
            task.cancel()
        await asyncio.gather(task, watching, cut, return_exceptions=True)
    if task.cancelled():
        if cutoff.is_set():
            raise _CUT_OFF
        raise ServiceError(grpc.StatusCode.CANCELLED, "the client closed the connection")
    return task.result()


class EventStream:
    """Server-sent events, one write each; a client that goes away cancels the producer, and so the generation.
    A drain's cutoff ends the stream with an UNAVAILABLE error event and [DONE], each event still whole."""

    def __init__(self, events: AsyncIterator[bytes], request_id: str, cutoff: asyncio.Event) -> None:
        self._events = events
        self._cutoff = cutoff
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
        cut = asyncio.ensure_future(self._cutoff.wait())
        try:
            await asyncio.wait({sending, watching, cut}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (sending, watching, cut):
                task.cancel()
            await asyncio.gather(sending, watching, cut, return_exceptions=True)
            await self._events.aclose()
        if sending.cancelled() and self._cutoff.is_set():
            tail = event(openai_error(_CUT_OFF)[1]) + DONE
            await send({"type": "http.response.body", "body": tail, "more_body": False})


class RestApi:
    """The routes over one ChatBackend."""

    def __init__(self, config: ServerConfig, backend: ChatBackend, pool: WorkerPool) -> None:
        self._config = config
        self._backend = backend
        self._pool = pool
        self._cutoff = backend.admission.cutoff

    def _caller(self, request: Request) -> Call:
        rid = request_id(request.headers.get("x-request-id"))
        authorization = request.headers.get("authorization", "")
        timeout = request.headers.get("x-request-timeout")
        if timeout is None:
            return Call(rid, None, authorization)
        try:
            seconds = float(timeout)
        except ValueError:
            seconds = 0.0
        if not 0 < seconds < 1e9:
            raise ServiceError.invalid_field("x-request-timeout",
                                             f"must be a positive number of seconds, got {timeout!r}")
        return Call(rid, time.monotonic() + seconds, authorization)

    async def _body(self, request: Request) -> bytes:
        """The body, counted as it arrives: past the limit it stops being read (413), whether Content-Length
        announced it or it came chunked."""
        limit = self._config.max_message_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise BodyTooLarge(declared, limit)
        raw = bytearray()
        async for piece in request.stream():
            raw += piece
            if len(raw) > limit:
                raise BodyTooLarge(f"more than {limit}", limit)
        return bytes(raw)

    async def _parsed(self, request: Request, parse: Callable[[dict[str, Any], bool], ParsedChat]) -> ParsedChat:
        raw = await self._body(request)
        ignore = self._config.ignore_unknown_fields
        if len(raw) <= INLINE_PARSE_BYTES:
            return parse(decode_json(raw), ignore)
        return await self._pool.run(lambda: parse(decode_json(raw), ignore))

    def _log(self, request: Request, caller: Call | None, started: float, status: int,
             parsed: ParsedChat | None) -> None:
        log.info("request", extra={"request_id": caller and caller.request_id, "method": request.method,
                                   "path": request.url.path, "model": parsed and parsed.request.model,
                                   "user": (parsed and parsed.request.user) or None, "status": status,
                                   "seconds": round(time.monotonic() - started, 4)})

    async def chat_completions(self, request: Request) -> Response | EventStream:
        started, caller, parsed = time.monotonic(), None, None
        try:
            caller = self._caller(request)
            self._backend.admit(caller)
            parsed = await self._parsed(request, parse_chat)
            if parsed.stream:
                chunks = self._backend.stream(parsed.request, caller)
                try:  # errors until the first chunk get a status
                    first = await _unless_gone(request, anext(chunks), self._cutoff)
                except BaseException:
                    await chunks.aclose()
                    raise
                self._log(request, caller, started, 200, parsed)
                return EventStream(self._events(first, chunks, parsed.request.stream_options.include_usage),
                                   caller.request_id, self._cutoff)
            completion = await _unless_gone(request, self._backend.create(parsed.request, caller), self._cutoff)
            self._log(request, caller, started, 200, parsed)
            return _json(completion_json(completion), 200, caller)
        except Exception as e:
            status, body = openai_error(self._service_error(e))
            self._log(request, caller, started, status, parsed)
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
        started, caller, parsed = time.monotonic(), None, None
        try:
            caller = self._caller(request)
            self._backend.admit(caller)
            parsed = await self._parsed(request, parse_dataoorts)
            completion = await _unless_gone(request, self._backend.create(parsed.request, caller), self._cutoff)
            self._log(request, caller, started, 200, parsed)
            return _json(dataoorts_json(completion), 200, caller)
        except Exception as e:
            status, body = dataoorts_error(self._service_error(e))
            self._log(request, caller, started, status, parsed)
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


class SingleFraming:
    """RFC 9112 §6.3: a request with both Content-Length and Transfer-Encoding may be smuggling another inside its
    body (a proxy in front may frame it by the other header). It is answered 400 and its connection closed, so
    nothing after it is read as a request. h11 would frame it by Transfer-Encoding and carry on."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            names = {name.lower() for name, _ in scope["headers"]}
            if b"content-length" in names and b"transfer-encoding" in names:
                body = dumps({"error": {"message": "a request may not carry both Content-Length and "
                                                   "Transfer-Encoding (RFC 9112 section 6.3)",
                                        "type": "invalid_request_error", "param": None, "code": "invalid_argument"}})
                await Response(body.encode(), 400, {"connection": "close"}, media_type="application/json")(
                    scope, receive, send)
                return
        await self._app(scope, receive, send)


async def _route_error(request: Request, exc: Exception) -> Response:
    status = exc.status_code if isinstance(exc, HTTPException) else 404
    headers = exc.headers if isinstance(exc, HTTPException) else None
    return Response(dumps(route_error(status, request.method, request.url.path)).encode(), status, headers,
                    media_type="application/json")


def create_app(config: ServerConfig, backend: ChatBackend, pool: WorkerPool) -> Starlette:
    api = RestApi(config, backend, pool)
    middleware = [Middleware(SingleFraming)]
    if config.cors_origin:
        middleware.append(Middleware(CORSMiddleware, allow_origins=config.cors_origin, allow_methods=["GET", "POST"],
                                     allow_headers=["*"], expose_headers=["x-request-id"]))
    return Starlette(middleware=middleware, exception_handlers={HTTPException: _route_error}, routes=[
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


def _tls(config: ServerConfig) -> dict[str, Any]:
    """uvicorn's TLS options from the flags that secure the gRPC port: one certificate, one client CA, both ports."""
    if not config.tls_cert or not config.tls_key:
        return {}
    options: dict[str, Any] = {"ssl_certfile": str(config.tls_cert), "ssl_keyfile": str(config.tls_key)}
    if config.tls_client_ca:
        options.update(ssl_ca_certs=str(config.tls_client_ca), ssl_cert_reqs=ssl.CERT_REQUIRED)
    return options


class RestServer:
    """uvicorn inside the caller's event loop, started and stopped with it."""

    def __init__(self, config: ServerConfig, backend: ChatBackend, pool: WorkerPool) -> None:
        self._server = _Uvicorn(uvicorn.Config(
            create_app(config, backend, pool), host=config.host, port=config.http_port, log_config=None,
            access_log=False, lifespan="off", timeout_graceful_shutdown=1, **_tls(config)))
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
                 admission: Admission, pool: WorkerPool) -> None:
        super().__init__(config.server, InProcessBackend(completions, registry, admission), pool)
