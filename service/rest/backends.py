"""What the REST shim talks to: the chat path in this process, or a remote llmserve (service.rest.upstream).

Both implement ChatBackend, so the shim's routes, JSON mapping and error table
do not know which one they front. In process there is no extra hop: the shim
calls ChatCompletions directly, through the same Admission as the gRPC
servicer (keys, phase, in-flight count), so a drain waits for REST streams too.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Protocol

from service.admission import Admission, Call, Phase
from service.chat.catalog import list_models
from service.chat.completions import ChatCompletions
from service.gen.llmserve.v1 import chat_pb2
from service.models.registry import ModelRegistry

SEND_KEY = "send the header 'Authorization: Bearer <key>'"


class ChatBackend(Protocol):
    admission: Admission  # whose drain counts this backend's calls, and whose cutoff ends them

    def admit(self, call: Call) -> None:
        """Raises ServiceError when the caller may not be served now (key, loading, draining)."""

    async def create(self, req: chat_pb2.ChatCompletionRequest, call: Call) -> chat_pb2.ChatCompletion: ...

    def stream(self, req: chat_pb2.ChatCompletionRequest, call: Call) -> AsyncIterator[chat_pb2.ChatCompletionChunk]:
        ...

    async def list_models(self, call: Call) -> chat_pb2.ListModelsResponse: ...

    async def readiness(self) -> tuple[bool, str]:
        """Whether to answer /health/ready with 200, and a word saying why."""
        ...


class InProcessBackend:
    def __init__(self, completions: ChatCompletions, registry: ModelRegistry, admission: Admission) -> None:
        self._completions = completions
        self._registry = registry
        self.admission = admission

    def admit(self, call: Call) -> None:
        self.admission.check_key(call.authorization, SEND_KEY)
        self.admission.admit()

    async def create(self, req: chat_pb2.ChatCompletionRequest, call: Call) -> chat_pb2.ChatCompletion:
        with self.admission.tracked():
            return await self._completions.create(req, call)

    async def stream(self, req: chat_pb2.ChatCompletionRequest,
                     call: Call) -> AsyncIterator[chat_pb2.ChatCompletionChunk]:
        with self.admission.tracked():
            async with aclosing(self._completions.stream(req, call)) as chunks:
                async for chunk in chunks:
                    yield chunk

    async def list_models(self, call: Call) -> chat_pb2.ListModelsResponse:
        return list_models(self._registry)

    async def readiness(self) -> tuple[bool, str]:
        """As the gRPC health of llmserve.v1.ChatService: serving, with at least one model that can generate."""
        if self.admission.phase is not Phase.SERVING:
            return False, self.admission.phase.value
        models = self._registry.serving()
        if any(models.values()):
            return True, self.admission.phase.value
        return False, "no model can generate now: " + ", ".join(models)
