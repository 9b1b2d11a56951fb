"""A request body that is not the method's message answers INVALID_ARGUMENT, not UNKNOWN.

grpc.aio turns an exception raised by a request deserializer into UNKNOWN
with the Python exception's repr. Bytes that do not decode as the method's
request (corrupt wire format, invalid UTF-8 in a string field, nesting past
the protobuf parser's depth limit) are the client's mistake, and the status
should say so: this interceptor gives each unary-request method a deserializer
that returns the decoding error instead of raising it, and a behaviour that
answers such a request with INVALID_ARGUMENT before the servicer sees it.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import Any

import grpc
from google.protobuf.message import DecodeError


class _Undecodable:
    __slots__ = ("error",)

    def __init__(self, error: DecodeError) -> None:
        self.error = error


async def _refuse(request: _Undecodable, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"the request body is not a valid message: {request.error}")


def _tolerant(decode: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return decode(data)
        except DecodeError as e:
            return _Undecodable(e)
    return deserialize


def _unary_response(behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, _Undecodable):
            await _refuse(request, context)
        return await behavior(request, context)
    return handle


def _stream_response(behavior: Callable[..., Any]) -> Callable[..., Any]:
    if inspect.isasyncgenfunction(behavior):
        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            if isinstance(request, _Undecodable):
                await _refuse(request, context)
            async with aclosing(behavior(request, context)) as responses:  # closed at once when the call ends
                async for response in responses:
                    yield response
        return stream

    async def write(request: Any, context: grpc.aio.ServicerContext) -> None:  # the context.write() style
        if isinstance(request, _Undecodable):
            await _refuse(request, context)
        await behavior(request, context)
    return write


class DecodeErrorsAsInvalidArgument(grpc.aio.ServerInterceptor):
    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
                                handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        deserializer = _tolerant(handler.request_deserializer)
        if handler.response_streaming:
            return handler._replace(request_deserializer=deserializer,
                                    unary_stream=_stream_response(handler.unary_stream))
        return handler._replace(request_deserializer=deserializer, unary_unary=_unary_response(handler.unary_unary))
