"""Chat completions: a validated request in, ChatCompletion or chunks out.

This is the whole request path, independent of transport: validate -> chat
template -> engine request -> engine events -> choices or chunks. The gRPC
servicer and the REST shim both call it, so both get the same validation,
limits and errors (ServiceError).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import json_format

from service.backends.base import (
    EngineError,
    Event,
    Finished,
    FinishReason,
    GenerationRequest,
    GuidedDecoding,
    InvalidRequest,
    QueueFull,
    TokenDelta,
    TokenLogprob,
)
from service.chat_template import ChatTemplateError
from service.config import ServerConfig
from service.errors import ServiceError
from service.gen.llmserve.v1 import chat_pb2
from service.grammar import check_schema, plain_json
from service.metrics import RequestTimer
from service.models import ModelRegistry, ServedModel
from service.tools import ToolCallParser, add_to_delta, add_to_message, check_tools
from service.validation import sampling_params, tool_mode, validate_chat_request

FINISH_REASONS = {
    FinishReason.STOP: chat_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: chat_pb2.FINISH_REASON_LENGTH,
    FinishReason.CANCELLED: chat_pb2.FINISH_REASON_CANCELLED,
    FinishReason.DEADLINE: chat_pb2.FINISH_REASON_DEADLINE,
}


@dataclass(frozen=True, slots=True)
class Call:
    """What the transport knows of one call."""

    request_id: str
    deadline: float | None = None  # time.monotonic()


def message_dicts(messages: Any) -> list[dict[str, Any]]:
    """OpenAI-shaped dicts, as chat templates expect them."""
    return [json_format.MessageToDict(m, preserving_proto_field_name=True) for m in messages]


def render_prompt(model: ServedModel, messages: Any, tools: list[dict[str, Any]] | None = None,
                  add_generation_prompt: bool = True) -> list[int]:
    try:
        return model.template.encode(message_dicts(messages), tools, add_generation_prompt)
    except ChatTemplateError as e:
        raise ServiceError.invalid_field(e.field, str(e)) from None


@dataclass
class _Prepared:
    model: ServedModel
    request: GenerationRequest
    completion_id: str
    created: int
    tool_names: list[str]  # the tools the model may call: its answers are parsed for a call of one

    def parsers(self) -> list[ToolCallParser]:
        return [ToolCallParser(self.tool_names) for _ in range(self.request.n)]


@dataclass
class _ChoiceState:
    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish: FinishReason | None = None
    completion_tokens: int = 0


def _logprobs_pb(entries: list[TokenLogprob]) -> chat_pb2.ChoiceLogprobs:
    return chat_pb2.ChoiceLogprobs(content=[
        chat_pb2.TokenLogprob(
            token=e.token, logprob=e.logprob, bytes=list(e.bytes),
            top_logprobs=[chat_pb2.TopLogprob(token=t.token, logprob=t.logprob, bytes=list(t.bytes)) for t in e.top],
        ) for e in entries
    ])


def _guided(req: chat_pb2.ChatCompletionRequest) -> GuidedDecoding | None:
    fmt = req.response_format
    if fmt.type == "json_object":
        return GuidedDecoding(json_object=True)
    if fmt.type == "json_schema":
        schema = plain_json(json_format.MessageToDict(fmt.json_schema.schema))
        return GuidedDecoding(json_schema=check_schema(schema, "response_format.json_schema.schema"))
    return None


def _finish_reason(reason: FinishReason, parser: ToolCallParser) -> chat_pb2.FinishReason:
    """A call cut short by max_tokens stays "length": its arguments are incomplete."""
    if parser.called and reason is FinishReason.STOP:
        return chat_pb2.FINISH_REASON_TOOL_CALLS
    return FINISH_REASONS[reason]


def _engine_error(e: Exception) -> ServiceError:
    if isinstance(e, QueueFull):
        return ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"server overloaded, retry later: {e}")
    if isinstance(e, InvalidRequest):
        return ServiceError.invalid_field(e.field, e.message)
    return ServiceError(grpc.StatusCode.INTERNAL, f"engine failure: {e}")


def _finish_error(reason: FinishReason) -> ServiceError | None:
    if reason is FinishReason.DEADLINE:
        return ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded during generation")
    if reason is FinishReason.CANCELLED:
        return ServiceError(grpc.StatusCode.CANCELLED, "request cancelled")
    return None


class ChatCompletions:
    def __init__(self, registry: ModelRegistry, limits: ServerConfig) -> None:
        self._registry = registry
        self._limits = limits

    def _prepare(self, req: chat_pb2.ChatCompletionRequest, call: Call) -> _Prepared:
        validate_chat_request(req, self._limits)
        model = self._registry.get(req.model)
        tools = None
        if req.tools and tool_mode(req) != "none":
            tools = [json_format.MessageToDict(t, preserving_proto_field_name=True) for t in req.tools]
        prompt = render_prompt(model, req.messages, tools)
        try:
            callable_tools, call_grammar = check_tools(req)
            guided = call_grammar or _guided(req)
        except InvalidRequest as e:
            raise ServiceError.invalid_field(e.field, e.message) from None
        context = model.manifest.context_length
        room = context - len(prompt)
        if room <= 0:
            raise ServiceError.invalid_field(
                "messages", f"the prompt has {len(prompt)} tokens; the model's context length is {context}")
        max_tokens = room
        if req.HasField("max_tokens"):
            if req.max_tokens > room and not self._limits.clamp_max_tokens:
                raise ServiceError.invalid_field(
                    "max_tokens", f"the prompt ({len(prompt)} tokens) plus max_tokens ({req.max_tokens}) exceeds "
                                  f"the model's context length ({context})")
            max_tokens = min(req.max_tokens, room)
        request = GenerationRequest(
            request_id=call.request_id,
            prompt_token_ids=prompt,
            sampling=sampling_params(req, max_tokens),
            n=req.n if req.HasField("n") else 1,
            deadline=call.deadline,
            guided=guided,
        )
        return _Prepared(model, request, f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), list(callable_tools))

    def _usage(self, prepared: _Prepared, completion_tokens: int) -> chat_pb2.Usage:
        prompt_tokens = len(prepared.request.prompt_token_ids)
        usage = chat_pb2.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                               total_tokens=prompt_tokens + completion_tokens)
        pricing = prepared.model.manifest.pricing
        if pricing:
            usage.estimated_cost = pricing.cost(prompt_tokens, completion_tokens)
        return usage

    async def create(self, req: chat_pb2.ChatCompletionRequest, call: Call) -> chat_pb2.ChatCompletion:
        prepared = self._prepare(req, call)
        timer = RequestTimer(prepared.model.name, len(prepared.request.prompt_token_ids))
        choices = [_ChoiceState() for _ in range(prepared.request.n)]
        try:
            async with aclosing(prepared.model.engine.generate(prepared.request)) as events:
                async for event in events:
                    timer.on_event(event)
                    state = choices[event.index]
                    if isinstance(event, TokenDelta):
                        state.text.append(event.text)
                        if event.logprobs:
                            state.logprobs.extend(event.logprobs)
                    else:
                        state.finish, state.completion_tokens = event.finish_reason, event.completion_tokens
        except (QueueFull, InvalidRequest, EngineError) as e:
            raise _engine_error(e) from None
        for state in choices:
            error = _finish_error(state.finish) if state.finish else None
            if error:
                raise error
        out = chat_pb2.ChatCompletion(id=prepared.completion_id, object="chat.completion", created=prepared.created,
                                      model=prepared.model.name)
        for i, (state, parser) in enumerate(zip(choices, prepared.parsers(), strict=True)):
            pieces = parser.feed("".join(state.text)) + parser.finish()
            choice = out.choices.add(index=i, finish_reason=_finish_reason(state.finish, parser))
            choice.message.role = "assistant"
            add_to_message(choice.message, pieces)
            if req.logprobs:
                choice.logprobs.CopyFrom(_logprobs_pb(state.logprobs))
        out.usage.CopyFrom(self._usage(prepared, sum(c.completion_tokens for c in choices)))
        return out

    async def stream(self, req: chat_pb2.ChatCompletionRequest,
                     call: Call) -> AsyncIterator[chat_pb2.ChatCompletionChunk]:
        """Yields chunks. Events that arrive while the consumer is busy are coalesced into one chunk,
        so a slow client costs the engine nothing and holds at most its own output in memory."""
        prepared = self._prepare(req, call)
        timer = RequestTimer(prepared.model.name, len(prepared.request.prompt_token_ids))
        pending: list[Event] = []
        ready = asyncio.Event()
        done: list[BaseException | None] = []

        async def pump() -> None:
            try:
                async with aclosing(prepared.model.engine.generate(prepared.request)) as events:
                    async for event in events:
                        timer.on_event(event)
                        pending.append(event)
                        ready.set()
                done.append(None)
            except (QueueFull, InvalidRequest, EngineError) as e:
                done.append(e)
            finally:
                ready.set()

        def chunk() -> chat_pb2.ChatCompletionChunk:
            return chat_pb2.ChatCompletionChunk(id=prepared.completion_id, object="chat.completion.chunk",
                                                created=prepared.created, model=prepared.model.name)

        task = asyncio.create_task(pump())
        parsers = prepared.parsers()
        completion_tokens = 0
        role_sent = False
        try:
            while True:
                await ready.wait()
                ready.clear()
                finished = bool(done)  # read before taking events: every event precedes `done`
                events, pending[:] = list(pending), []
                if events and not role_sent:
                    first = chunk()
                    for i in range(prepared.request.n):
                        first.choices.add(index=i).delta.role = "assistant"
                        first.choices[i].delta.content = ""
                    role_sent = True
                    yield first
                if events:
                    out = chunk()
                    by_index: dict[int, chat_pb2.ChunkChoice] = {}
                    for event in events:
                        choice = by_index.get(event.index)
                        if choice is None:
                            choice = by_index[event.index] = out.choices.add(index=event.index)
                        if isinstance(event, TokenDelta):
                            add_to_delta(choice.delta, parsers[event.index].feed(event.text))
                            if event.logprobs:
                                choice.logprobs.content.extend(_logprobs_pb(event.logprobs).content)
                        elif isinstance(event, Finished):
                            error = _finish_error(event.finish_reason)
                            if error:
                                raise error
                            add_to_delta(choice.delta, parsers[event.index].finish())
                            choice.finish_reason = _finish_reason(event.finish_reason, parsers[event.index])
                            completion_tokens += event.completion_tokens
                    yield out
                if finished:
                    break
            if done[0] is not None:
                raise _engine_error(done[0]) from None  # type: ignore[arg-type]
            if req.stream_options.include_usage:
                last = chunk()
                last.usage.CopyFrom(self._usage(prepared, completion_tokens))
                yield last
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
