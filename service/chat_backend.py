"""What the REST shim talks to: the chat path in this process, or a remote llmserve (service.upstream).

Both implement ChatBackend, so the shim's routes, JSON mapping and error table
do not know which one they front. In process there is no extra hop: the shim
calls ChatCompletions directly, with the same API keys, serving phase and
in-flight count as the gRPC servicer, so a drain waits for REST streams too.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Protocol

import grpc

from service.catalog import list_models
from service.chat import Call, ChatCompletions
from service.errors import ServiceError
from service.gen.llmserve.v1 import chat_pb2
from service.models import ModelRegistry
from service.servicer import Phase, ServingState


@dataclass(frozen=True, slots=True)
class Caller:
    """What an HTTP request says about its caller."""

    request_id: str
    authorization: str = ""       # the Authorization header as sent
    timeout: float | None = None  # seconds, from the X-Request-Timeout header


class ChatBackend(Protocol):
    def admit(self, caller: Caller) -> None:
        """Raises ServiceError when the caller may not be served now (key, loading, draining)."""

    async def create(self, req: chat_pb2.ChatCompletionRequest, caller: Caller) -> chat_pb2.ChatCompletion: ...

    def stream(self, req: chat_pb2.ChatCompletionRequest,
               caller: Caller) -> AsyncIterator[chat_pb2.ChatCompletionChunk]: ...

    async def list_models(self, caller: Caller) -> chat_pb2.ListModelsResponse: ...

    async def readiness(self) -> tuple[bool, str]:
        """Whether to answer /health/ready with 200, and a word saying why."""
        ...


def check_api_key(keys: Sequence[str], authorization: str) -> None:
    scheme, _, key = authorization.partition(" ")
    if keys and (scheme.lower() != "bearer" or key not in keys):
        raise ServiceError(grpc.StatusCode.UNAUTHENTICATED,
                           "missing or invalid API key (send the header 'Authorization: Bearer <key>')")


class InProcessBackend:
    def __init__(self, completions: ChatCompletions, registry: ModelRegistry, state: ServingState,
                 api_keys: Sequence[str]) -> None:
        self._completions = completions
        self._registry = registry
        self._state = state
        self._keys = tuple(api_keys)

    def admit(self, caller: Caller) -> None:
        check_api_key(self._keys, caller.authorization)
        self._state.admit()

    @staticmethod
    def _call(caller: Caller) -> Call:
        return Call(caller.request_id, time.monotonic() + caller.timeout if caller.timeout else None)

    async def create(self, req: chat_pb2.ChatCompletionRequest, caller: Caller) -> chat_pb2.ChatCompletion:
        self._state.in_flight += 1
        try:
            return await self._completions.create(req, self._call(caller))
        finally:
            self._state.in_flight -= 1

    async def stream(self, req: chat_pb2.ChatCompletionRequest,
                     caller: Caller) -> AsyncIterator[chat_pb2.ChatCompletionChunk]:
        self._state.in_flight += 1
        try:
            async with aclosing(self._completions.stream(req, self._call(caller))) as chunks:
                async for chunk in chunks:
                    yield chunk
        finally:
            self._state.in_flight -= 1

    async def list_models(self, caller: Caller) -> chat_pb2.ListModelsResponse:
        return list_models(self._registry)

    async def readiness(self) -> tuple[bool, str]:
        return self._state.phase is Phase.SERVING, self._state.phase.value
