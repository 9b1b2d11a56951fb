"""Engine events -> the contract's answers: a whole ChatCompletion, or stream chunks.

Each choice's text goes through its own tool-call parser, in the answer and in
the stream alike, so both agree on what is content and what is a call. A
choice cut off by a cancel, a deadline or a failed worker makes the whole call fail with that
status (CANCELLED, DEADLINE_EXCEEDED, UNAVAILABLE) rather than return a partial answer that looks complete.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

import grpc

from service.backends.base import (
    EngineError,
    Event,
    Finished,
    FinishReason,
    InvalidRequest,
    QueueFull,
    TokenDelta,
    TokenLogprob,
    Unavailable,
)
from service.chat.tool_parsers import CallParser
from service.chat.tools import add_to_delta, add_to_message, call_parser
from service.chat.validation import ValidChat
from service.errors import ServiceError
from service.gen.llmserve.v1 import chat_pb2

_FINISH_REASON_PB = {
    FinishReason.STOP: chat_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: chat_pb2.FINISH_REASON_LENGTH,
    FinishReason.CANCELLED: chat_pb2.FINISH_REASON_CANCELLED,
    FinishReason.DEADLINE: chat_pb2.FINISH_REASON_DEADLINE,
}


def engine_error(e: Exception, budget_field: str = "max_tokens") -> ServiceError:
    """`budget_field`: the name the request gave its token budget, which an engine's refusal calls max_tokens."""
    if isinstance(e, ServiceError):  # raised on the way to the engine (a drain refusing a queued request)
        return e
    if isinstance(e, QueueFull):
        return ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"server overloaded, retry later: {e}")
    if isinstance(e, InvalidRequest):
        return ServiceError.invalid_field(budget_field if e.field == "max_tokens" else e.field, e.message)
    if isinstance(e, Unavailable):
        return ServiceError(grpc.StatusCode.UNAVAILABLE, f"model unavailable, retry later: {e}")
    return ServiceError(grpc.StatusCode.INTERNAL, f"engine failure: {e}")


ENGINE_ERRORS = (QueueFull, InvalidRequest, EngineError, Unavailable)


def _finish_error(reason: FinishReason) -> ServiceError | None:
    if reason is FinishReason.DEADLINE:
        return ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded during generation")
    if reason is FinishReason.CANCELLED:
        return ServiceError(grpc.StatusCode.CANCELLED, "request cancelled")
    if reason is FinishReason.ERROR:
        return ServiceError(grpc.StatusCode.UNAVAILABLE, "the worker generating this answer failed before it "
                                                         "finished (finish reason: error); retry")
    return None


def _finish_reason(reason: FinishReason, parser: CallParser) -> chat_pb2.FinishReason:
    """A call cut short by max_tokens stays "length": its arguments are incomplete."""
    if parser.called and reason is FinishReason.STOP:
        return chat_pb2.FINISH_REASON_TOOL_CALLS
    return _FINISH_REASON_PB[reason]


def _logprobs_pb(entries: list[TokenLogprob]) -> chat_pb2.ChoiceLogprobs:
    return chat_pb2.ChoiceLogprobs(content=[
        chat_pb2.TokenLogprob(
            token=e.token, logprob=e.logprob, bytes=list(e.bytes),
            top_logprobs=[chat_pb2.TopLogprob(token=t.token, logprob=t.logprob, bytes=list(t.bytes)) for t in e.top],
        ) for e in entries
    ])


@dataclass
class _Choice:
    parser: CallParser
    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish: FinishReason | None = None
    completion_tokens: int = 0


class Answer:
    """One request's answer as its events arrive: the choices' state, and the chunks or completion made of it."""

    def __init__(self, valid: ValidChat) -> None:
        self._valid = valid
        self._id = f"chatcmpl-{uuid.uuid4().hex}"
        self._created = int(time.time())
        self._choices = [_Choice(call_parser(valid.tool_names, valid.model.template.tool_format))
                         for _ in range(valid.n)]
        self._role_sent = False

    def usage(self) -> chat_pb2.Usage:
        prompt_tokens = len(self._valid.prompt)
        completion_tokens = sum(c.completion_tokens for c in self._choices)
        usage = chat_pb2.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                               total_tokens=prompt_tokens + completion_tokens)
        pricing = self._valid.model.manifest.pricing
        if pricing:
            usage.estimated_cost = pricing.cost(prompt_tokens, completion_tokens)
        return usage

    # -- unary ------------------------------------------------------------------------------------------------

    def collect(self, event: Event) -> None:
        choice = self._choices[event.index]
        if isinstance(event, TokenDelta):
            choice.text.append(event.text)
            if event.logprobs:
                choice.logprobs.extend(event.logprobs)
        else:
            choice.finish, choice.completion_tokens = event.finish_reason, event.completion_tokens

    def completion(self) -> chat_pb2.ChatCompletion:
        for choice in self._choices:
            error = _finish_error(choice.finish) if choice.finish else None
            if error:
                raise error
        out = chat_pb2.ChatCompletion(id=self._id, object="chat.completion", created=self._created,
                                      model=self._valid.model.name)
        for i, choice in enumerate(self._choices):
            pieces = choice.parser.feed("".join(choice.text)) + choice.parser.finish()
            answer = out.choices.add(index=i, finish_reason=_finish_reason(choice.finish, choice.parser))
            answer.message.role = "assistant"
            add_to_message(answer.message, pieces)
            if self._valid.logprobs:
                answer.logprobs.CopyFrom(_logprobs_pb(choice.logprobs))
        out.usage.CopyFrom(self.usage())
        return out

    # -- stream -----------------------------------------------------------------------------------------------

    def _chunk(self) -> chat_pb2.ChatCompletionChunk:
        return chat_pb2.ChatCompletionChunk(id=self._id, object="chat.completion.chunk", created=self._created,
                                            model=self._valid.model.name)

    def chunks(self, events: list[Event]) -> list[chat_pb2.ChatCompletionChunk]:
        """The chunks for events that arrived together: the role first (once), then one chunk for all of them."""
        if not events:
            return []
        out = []
        if not self._role_sent:
            first = self._chunk()
            for i in range(self._valid.n):
                first.choices.add(index=i).delta.role = "assistant"
                first.choices[i].delta.content = ""
            self._role_sent = True
            out.append(first)
        chunk = self._chunk()
        by_index: dict[int, chat_pb2.ChunkChoice] = {}
        for event in events:
            delta = by_index.get(event.index)
            if delta is None:
                delta = by_index[event.index] = chunk.choices.add(index=event.index)
            choice = self._choices[event.index]
            if isinstance(event, TokenDelta):
                add_to_delta(delta.delta, choice.parser.feed(event.text))
                if event.logprobs:
                    delta.logprobs.content.extend(_logprobs_pb(event.logprobs).content)
            elif isinstance(event, Finished):
                error = _finish_error(event.finish_reason)
                if error:
                    raise error
                add_to_delta(delta.delta, choice.parser.finish())
                delta.finish_reason = _finish_reason(event.finish_reason, choice.parser)
                choice.completion_tokens = event.completion_tokens
        out.append(chunk)
        return out

    def usage_chunk(self) -> chat_pb2.ChatCompletionChunk:
        last = self._chunk()
        last.usage.CopyFrom(self.usage())
        return last
