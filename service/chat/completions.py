"""Chat completions, independent of transport: the whole request path, top to bottom.

validate (and render the prompt) -> generation request -> engine -> events ->
tool-call parser -> a completion or chunks. The gRPC servicer and the REST shim
both call this, so both get the same validation, limits and errors
(ServiceError). Validation (which renders and tokenizes the prompt) runs in the
worker pool, off the event loop. Until its first event a request is queued in
the engine, and a drain refuses it at once (UNAVAILABLE) rather than letting
it wait out the grace period only to be cut off.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing

import grpc

from service.admission import Call
from service.backends.base import Event
from service.chat.responses import ENGINE_ERRORS, Answer, engine_error
from service.chat.validation import ValidChat, validate_chat
from service.config import ServerConfig
from service.errors import ServiceError
from service.gen.llmserve.v1 import chat_pb2
from service.metrics import RequestTimer
from service.models.registry import ModelRegistry
from service.worker_pool import WorkerPool

REFUSED_QUEUED = "the server is shutting down and the request had not started; retry on another replica"


class ChatCompletions:
    def __init__(self, registry: ModelRegistry, limits: ServerConfig, pool: WorkerPool) -> None:
        self._registry = registry
        self._limits = limits
        self._pool = pool
        self._draining = asyncio.Event()

    def refuse_queued(self) -> None:
        """From now on, requests that have no event yet end with UNAVAILABLE (see `_started`)."""
        self._draining.set()

    async def _validate(self, req: chat_pb2.ChatCompletionRequest) -> ValidChat:
        return await self._pool.run(validate_chat, req, self._registry, self._limits)

    async def _started(self, valid: ValidChat, call: Call) -> AsyncIterator[Event]:
        """The engine's events for the request; while none has come it is waiting in the engine's queue, and
        a drain takes it out (closing the engine's stream aborts it there)."""
        async with aclosing(valid.model.engine.generate(valid.generation_request(call))) as events:
            first = asyncio.ensure_future(anext(events, None))
            draining = asyncio.ensure_future(self._draining.wait())
            try:
                await asyncio.wait({first, draining}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                draining.cancel()
                if not first.done():
                    first.cancel()
                await asyncio.gather(first, draining, return_exceptions=True)
            if first.cancelled():
                raise ServiceError(grpc.StatusCode.UNAVAILABLE, REFUSED_QUEUED)
            event = first.result()
            if event is None:
                return
            yield event
            async for event in events:
                yield event

    async def create(self, req: chat_pb2.ChatCompletionRequest, call: Call) -> chat_pb2.ChatCompletion:
        valid = await self._validate(req)
        timer = RequestTimer(valid.model.name, len(valid.prompt))
        answer = Answer(valid)
        try:
            async with aclosing(self._started(valid, call)) as events:
                async for event in events:
                    timer.on_event(event)
                    answer.collect(event)
        except ENGINE_ERRORS as e:
            raise engine_error(e, valid.budget_field) from None
        return answer.completion()

    async def stream(self, req: chat_pb2.ChatCompletionRequest,
                     call: Call) -> AsyncIterator[chat_pb2.ChatCompletionChunk]:
        """Yields chunks. Events that arrive while the consumer is busy are coalesced into one chunk,
        so a slow client costs the engine nothing and holds at most its own output in memory."""
        valid = await self._validate(req)
        timer = RequestTimer(valid.model.name, len(valid.prompt))
        answer = Answer(valid)
        pending: list[Event] = []
        ready = asyncio.Event()
        done: list[BaseException | None] = []

        async def pump() -> None:
            try:
                async with aclosing(self._started(valid, call)) as events:
                    async for event in events:
                        timer.on_event(event)
                        pending.append(event)
                        ready.set()
                done.append(None)
            except (*ENGINE_ERRORS, ServiceError) as e:
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
                raise engine_error(done[0], valid.budget_field) from None  # type: ignore[arg-type]
            if valid.include_usage:
                yield answer.usage_chunk()
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
