"""The contract's answers -> JSON exactly as OpenAI writes it.

Written by hand rather than through json_format, which would camelCase names,
print int64 as strings, finish_reason as an enum name and omit nulls that
OpenAI clients expect (`logprobs: null`, `finish_reason: null`). Stream chunks
are the hot path: one small dict per chunk, encoded once by the C encoder.
"""

from __future__ import annotations

import json
import math
from typing import Any

from google.protobuf import json_format

from service.gen.llmserve.v1 import chat_pb2

_FINISH_REASON_JSON: dict[int, str | None] = {
    chat_pb2.FINISH_REASON_UNSPECIFIED: None,
    chat_pb2.FINISH_REASON_STOP: "stop",
    chat_pb2.FINISH_REASON_LENGTH: "length",
    chat_pb2.FINISH_REASON_TOOL_CALLS: "tool_calls",
    chat_pb2.FINISH_REASON_CANCELLED: "cancelled",
    chat_pb2.FINISH_REASON_DEADLINE: "deadline",
}
_UNLIKELY = -9999.0  # OpenAI's stand-in for a log probability of -inf, which JSON cannot carry

dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode

DONE = b"data: [DONE]\n\n"


def event(payload: dict[str, Any]) -> bytes:
    """One server-sent event."""
    return b"data: " + dumps(payload).encode() + b"\n\n"


def _logprob(value: float) -> float:
    return value if math.isfinite(value) else _UNLIKELY


def _logprobs(lp: chat_pb2.ChoiceLogprobs) -> dict[str, Any]:
    return {"content": [
        {"token": t.token, "logprob": _logprob(t.logprob), "bytes": list(t.bytes),
         "top_logprobs": [{"token": a.token, "logprob": _logprob(a.logprob), "bytes": list(a.bytes)}
                          for a in t.top_logprobs]}
        for t in lp.content
    ], "refusal": None}


def usage_json(usage: chat_pb2.Usage) -> dict[str, Any]:
    out: dict[str, Any] = {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
                           "total_tokens": usage.total_tokens}
    if usage.HasField("estimated_cost"):
        out["estimated_cost"] = usage.estimated_cost
    return out


def _message(m: chat_pb2.ChatMessage) -> dict[str, Any]:
    out: dict[str, Any] = {"role": m.role or "assistant",
                           "content": m.content if m.HasField("content") and not m.tool_calls else None,
                           "refusal": None}
    if m.tool_calls:
        out["tool_calls"] = [{"id": c.id, "type": c.type or "function",
                              "function": {"name": c.function.name, "arguments": c.function.arguments}}
                             for c in m.tool_calls]
    return out


def completion_json(c: chat_pb2.ChatCompletion) -> dict[str, Any]:
    return {
        "id": c.id, "object": c.object, "created": c.created, "model": c.model,
        "choices": [{"index": ch.index, "message": _message(ch.message),
                     "logprobs": _logprobs(ch.logprobs) if ch.HasField("logprobs") else None,
                     "finish_reason": _FINISH_REASON_JSON[ch.finish_reason]} for ch in c.choices],
        "usage": usage_json(c.usage),
    }


def _tool_call_delta(d: chat_pb2.ToolCallDelta) -> dict[str, Any]:
    out: dict[str, Any] = {"index": d.index}
    if d.id:
        out["id"] = d.id
    if d.type:
        out["type"] = d.type
    function: dict[str, Any] = {"name": d.function.name} if d.function.name else {}
    function["arguments"] = d.function.arguments
    out["function"] = function
    return out


def _delta(d: chat_pb2.Delta) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if d.HasField("role"):
        out["role"] = d.role
    if d.HasField("content"):
        out["content"] = d.content
    if d.tool_calls:
        out["tool_calls"] = [_tool_call_delta(t) for t in d.tool_calls]
    return out


def _says_something(c: chat_pb2.ChunkChoice) -> bool:
    """False for a token that produced no text yet (a partial UTF-8 character held back) and no logprobs."""
    d = c.delta
    return bool(c.finish_reason or d.HasField("content") or d.HasField("role") or d.tool_calls
                or c.HasField("logprobs"))


def chunk_event(chunk: chat_pb2.ChatCompletionChunk, usage_null: bool) -> bytes:
    """The chunk's event, or b"" when it carries nothing a client could see.

    `usage_null`: with stream_options.include_usage OpenAI sends `usage: null` on every chunk but the last.
    """
    choices = [{"index": c.index, "delta": _delta(c.delta),
                "logprobs": _logprobs(c.logprobs) if c.HasField("logprobs") else None,
                "finish_reason": _FINISH_REASON_JSON[c.finish_reason]} for c in chunk.choices if _says_something(c)]
    has_usage = chunk.HasField("usage")
    if not choices and not has_usage:
        return b""
    out: dict[str, Any] = {"id": chunk.id, "object": chunk.object, "created": chunk.created, "model": chunk.model,
                           "choices": choices}
    if has_usage:
        out["usage"] = usage_json(chunk.usage)
    elif usage_null:
        out["usage"] = None
    return event(out)


def model_json(m: chat_pb2.Model) -> dict[str, Any]:
    """OpenAI's four fields, then what llmserve adds (context length, backend, GPU profile, tool format, structured
    output, gRPC workers)."""
    out = {"id": m.id, "object": m.object or "model", "created": m.created, "owned_by": m.owned_by,
           "context_length": m.context_length, "backend": m.backend,
           "profile": json_format.MessageToDict(m.profile, preserving_proto_field_name=True),
           "tool_format": m.tool_format,
           "structured_output": {"forms": list(m.structured_output.forms),
                                 "closes_within_max_tokens": m.structured_output.closes_within_max_tokens}}
    if m.workers:
        out["workers"] = [json_format.MessageToDict(w, preserving_proto_field_name=True,
                                                    always_print_fields_with_no_presence=True) for w in m.workers]
    return out


def models_json(models: chat_pb2.ListModelsResponse) -> dict[str, Any]:
    return {"object": "list", "data": [model_json(m) for m in models.data]}


def dataoorts_json(c: chat_pb2.ChatCompletion) -> dict[str, Any]:
    """The `/api/v1` wrapper: the first choice's text and the usage."""
    text = c.choices[0].message.content if c.choices else ""
    return {"errors": [], "messages": [], "result": {"response": text, "usage": usage_json(c.usage)},
            "success": True}
