"""Chat completions, independent of transport: the whole request path, top to bottom.

validate (and render the prompt) -> generation request -> engine -> events ->
tool-call parser -> a completion or chunks. The gRPC servicer and the REST shim
both call this, so both get the same validation, limits and errors
(ServiceError).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing

from service.admission import Call
from service.backends.base import Event
from service.chat.responses import ENGINE_ERRORS, Answer, engine_error
from service.chat.validation import ValidChat, validate_chat
from service.config import ServerConfig
from service.gen.llmserve.v1 import chat_pb2
from service.metrics import RequestTimer
from service.models.registry import ModelRegistry

# Requests larger than this are validated on a worker thread: checking a schema of thousands of properties takes
# seconds of jsonschema and xgrammar, which on the event loop would hold up every other stream's chunks.
VALIDATE_INLINE_BYTES = 16 * 1024


class ChatCompletions:
    def __init__(self, registry: ModelRegistry, limits: ServerConfig) -> None:
        self._registry = registry
        self._limits = limits

    async def _validate(self, req: chat_pb2.ChatCompletionRequest) -> ValidChat:
        if req.ByteSize() > VALIDATE_INLINE_BYTES:
            return await asyncio.to_thread(validate_chat, req, self._registry, self._limits)
        return validate_chat(req, self._registry, self._limits)

    async def create(self, req: chat_pb2.ChatCompletionRequest, call: Call) -> chat_pb2.ChatCompletion:
        valid = await self._validate(req)
        request = valid.generation_request(call)
        timer = RequestTimer(valid.model.name, len(valid.prompt))
        answer = Answer(valid)
        try:
            async with aclosing(valid.model.engine.generate(request)) as events:
                async for event in events:
                    timer.on_event(event)
                    answer.collect(event)
        except ENGINE_ERRORS as e:
            raise engine_error(e) from None
        return answer.completion()

    async def stream(self, req: chat_pb2.ChatCompletionRequest,
                     call: Call) -> AsyncIterator[chat_pb2.ChatCompletionChunk]:
        """Yields chunks. Events that arrive while the consumer is busy are coalesced into one chunk,
        so a slow client costs the engine nothing and holds at most its own output in memory."""
        valid = await self._validate(req)
        request = valid.generation_request(call)
        timer = RequestTimer(valid.model.name, len(valid.prompt))
        answer = Answer(valid)
        pending: list[Event] = []
        ready = asyncio.Event()
        done: list[BaseException | None] = []

        async def pump() -> None:
            try:
                async with aclosing(valid.model.engine.generate(request)) as events:
                    async for event in events:
                        timer.on_event(event)
                        pending.append(event)
                        ready.set()
                done.append(None)
            except ENGINE_ERRORS as e:
                done.append(e)
            finally:
                ready.set()

        task = asyncio.create_task(pump())
        try:
            while True:
                await ready.wait()
                ready.clear()
                finished = bool(done)  # read before taking events: every event precedes `done`
                events, pending[:] = list(pending), []
                for chunk in answer.chunks(events):
                    yield chunk
                if finished:
                    break
            if done[0] is not None:
                raise engine_error(done[0]) from None  # type: ignore[arg-type]
            if valid.include_usage:
                yield answer.usage_chunk()
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
