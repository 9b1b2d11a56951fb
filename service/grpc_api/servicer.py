"""The ChatService RPCs: transport concerns only (request id, deadline, admission, status codes).

API keys are checked before the body is decoded (service.grpc_api.keys). Everything about a
completion itself is in service.chat.completions; this module turns a
ServiceError into a gRPC status with google.rpc.BadRequest field violations,
and never lets an unexpected exception reach a client as a traceback.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from service.admission import Admission, Call, request_id
from service.chat.catalog import list_models, tokenize
from service.chat.completions import ChatCompletions
from service.config import ServerConfig
from service.errors import ServiceError
from service.gen.llmserve.v1 import chat_pb2, chat_pb2_grpc
from service.models.registry import ModelRegistry
from service.worker_pool import WorkerPool

log = logging.getLogger("llmserve.request")

T = TypeVar("T")


def status_for(error: ServiceError) -> grpc.Status:
    status = status_pb2.Status(code=error.code.value[0], message=error.message)
    if error.violations:
        detail = any_pb2.Any()
        detail.Pack(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
            for v in error.violations
        ]))
        status.details.append(detail)
    return rpc_status.to_status(status)


def _metadata(context: grpc.aio.ServicerContext, key: str) -> str | None:
    for k, v in context.invocation_metadata() or ():
        if k == key:
            return v if isinstance(v, str) else v.decode()
    return None


class ChatServicer(chat_pb2_grpc.ChatServiceServicer):
    def __init__(self, completions: ChatCompletions, registry: ModelRegistry, admission: Admission,
                 config: ServerConfig, pool: WorkerPool) -> None:
        self._completions = completions
        self._registry = registry
        self._admission = admission
        self._config = config
        self._pool = pool

    async def _begin(self, context: grpc.aio.ServicerContext) -> Call:
        rid = request_id(_metadata(context, "x-request-id"))
        await context.send_initial_metadata((("x-request-id", rid),))
        self._admission.admit()
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None else None
        return Call(rid, deadline)

    async def _fail(self, context: grpc.aio.ServicerContext, error: ServiceError) -> None:
        status = status_for(error)
        await context.abort(status.code, status.details, status.trailing_metadata)

    def _log(self, method: str, request: object, call: Call | None, started: float, code: grpc.StatusCode,
             usage: chat_pb2.Usage | None = None) -> None:
        extra = {"request_id": call.request_id if call else None, "method": method,
                 "model": getattr(request, "model", None), "user": getattr(request, "user", None) or None,
                 "code": code.name,
                 "seconds": round(time.monotonic() - started, 4)}
        if usage is not None:
            extra.update(prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens)
        log.info("request", extra=extra)

    async def _unary(self, method: str, request: object, context: grpc.aio.ServicerContext,
                     handler: Callable[[Call], Awaitable[T]]) -> T:
        started, call = time.monotonic(), None
        code = grpc.StatusCode.OK
        try:
            call = await self._begin(context)
            with self._admission.tracked():
                response = await handler(call)
            self._log(method, request, call, started, code, getattr(response, "usage", None))
            return response
        except ServiceError as e:
            code = e.code
            self._log(method, request, call, started, code)
            await self._fail(context, e)
        except Exception:
            log.exception("internal error", extra={"method": method, "request_id": call and call.request_id})
            await self._fail(context, ServiceError(grpc.StatusCode.INTERNAL, "internal error"))

    async def CreateChatCompletion(self, request: chat_pb2.ChatCompletionRequest,
                                   context: grpc.aio.ServicerContext) -> chat_pb2.ChatCompletion:
        return await self._unary("CreateChatCompletion", request, context,
                                 lambda call: self._completions.create(request, call))

    async def ListModels(self, request: chat_pb2.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> chat_pb2.ListModelsResponse:
        async def handler(_: Call) -> chat_pb2.ListModelsResponse:
            return list_models(self._registry)
        return await self._unary("ListModels", request, context, handler)

    async def Tokenize(self, request: chat_pb2.TokenizeRequest,
                       context: grpc.aio.ServicerContext) -> chat_pb2.TokenizeResponse:
        async def handler(_: Call) -> chat_pb2.TokenizeResponse:
            return await self._pool.run(tokenize, self._registry, request, self._config)
        return await self._unary("Tokenize", request, context, handler)

    async def StreamChatCompletion(self, request: chat_pb2.ChatCompletionRequest,
                                   context: grpc.aio.ServicerContext) -> AsyncIterator[chat_pb2.ChatCompletionChunk]:
        started, call, usage = time.monotonic(), None, None
        try:
            call = await self._begin(context)
            with self._admission.tracked():
                async for chunk in self._completions.stream(request, call):
                    if chunk.HasField("usage"):
                        usage = chunk.usage
                    yield chunk
            self._log("StreamChatCompletion", request, call, started, grpc.StatusCode.OK, usage)
        except ServiceError as e:
            self._log("StreamChatCompletion", request, call, started, e.code)
            await self._fail(context, e)
        except Exception:
            log.exception("internal error", extra={"method": "StreamChatCompletion",
                                                   "request_id": call and call.request_id})
            await self._fail(context, ServiceError(grpc.StatusCode.INTERNAL, "internal error"))

