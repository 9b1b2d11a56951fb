"""API keys on the gRPC port, checked from the call's metadata before its body is decoded.

An interceptor sees a call's method and metadata before grpc decodes the
request, so a caller without a valid key costs the server no protobuf parsing
and learns nothing from how its body would have been judged: it gets
UNAUTHENTICATED, whatever it sent. Health checks always answer without a key
(probes carry none); reflection, which hands out the whole API map, needs one
unless the operator opens it (--open-reflection).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from service.admission import Admission
from service.errors import ServiceError

SEND_KEY = "send metadata 'authorization: Bearer <key>'"
_HEALTH = "/grpc.health.v1.Health/"
_REFLECTION = "/grpc.reflection."


def _authorization(details: grpc.HandlerCallDetails) -> str:
    for key, value in details.invocation_metadata or ():
        if key == "authorization":
            return value if isinstance(value, str) else value.decode("latin-1")
    return ""


def _refusal(handler: grpc.RpcMethodHandler, error: ServiceError) -> grpc.RpcMethodHandler:
    """A handler of the same kind that answers UNAUTHENTICATED; its request stays undecoded bytes."""
    async def refuse(_: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(error.code, error.message)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse)
    return grpc.unary_unary_rpc_method_handler(refuse)


class ApiKeys(grpc.aio.ServerInterceptor):
    def __init__(self, admission: Admission, open_reflection: bool) -> None:
        self._admission = admission
        self._open = (_HEALTH, _REFLECTION) if open_reflection else (_HEALTH,)

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or details.method.startswith(self._open):
            return handler
        try:
            self._admission.check_key(_authorization(details), SEND_KEY)
        except ServiceError as e:
            return _refusal(handler, e)
        return handler
