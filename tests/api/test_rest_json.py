"""The JSON mapping on its own, for what the demo model's chat path does not produce (tool calls, prices,
-inf log probabilities), and tool-call conversations sent through the shim."""

from __future__ import annotations

import json
from typing import Any

import httpx

from service.gen.llmserve.v1 import chat_pb2
from service.rest.request import parse_chat
from service.rest.response import chunk_event, completion_json

CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}


def test_tool_call_answer_is_openai_shaped() -> None:
    c = chat_pb2.ChatCompletion(id="chatcmpl-1", object="chat.completion", created=1, model="m")
    choice = c.choices.add(index=0, finish_reason=chat_pb2.FINISH_REASON_TOOL_CALLS)
    choice.message.role = "assistant"
    choice.message.content = ""
    choice.message.tool_calls.add(id="call_1", type="function",
                                  function=chat_pb2.FunctionCall(name="get_weather", arguments='{"city": "Oslo"}'))
    c.usage.CopyFrom(chat_pb2.Usage(prompt_tokens=3, completion_tokens=4, total_tokens=7, estimated_cost=2.5e-6))
    out = completion_json(c)
    assert out["choices"][0] == {"index": 0, "message": {"role": "assistant", "content": None, "refusal": None,
                                                         "tool_calls": [CALL]},
                                 "logprobs": None, "finish_reason": "tool_calls"}
    assert out["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7, "estimated_cost": 2.5e-6}


def test_tool_call_deltas_and_non_finite_logprobs() -> None:
    chunk = chat_pb2.ChatCompletionChunk(id="chatcmpl-1", object="chat.completion.chunk", created=1, model="m")
    first = chunk.choices.add(index=0)
    first.delta.tool_calls.add(index=0, id="call_1", type="function",
                               function=chat_pb2.FunctionCall(name="get_weather"))
    first.logprobs.content.add(token="é", logprob=float("-inf"), bytes=[195, 169])
    data = chunk_event(chunk, usage_null=False)
    assert data.startswith(b"data: ") and data.endswith(b"\n\n") and "é".encode() in data
    choice = json.loads(data[6:])["choices"][0]
    assert choice["delta"] == {"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                               "function": {"name": "get_weather", "arguments": ""}}]}
    assert choice["logprobs"]["content"][0]["logprob"] == -9999.0
    later = chat_pb2.ChatCompletionChunk(id="chatcmpl-1", object="chat.completion.chunk", created=1, model="m")
    later.choices.add(index=0).delta.tool_calls.add(index=0, function=chat_pb2.FunctionCall(arguments='{"ci'))
    assert json.loads(chunk_event(later, usage_null=True)[6:]) == {
        "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
        "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"ci'}}]},
                     "logprobs": None, "finish_reason": None}], "usage": None}
    empty = chat_pb2.ChatCompletionChunk(id="chatcmpl-1", object="chat.completion.chunk", created=1, model="m")
    empty.choices.add(index=0)
    assert chunk_event(empty, usage_null=True) == b"", "a chunk with nothing to say is not sent"


def test_tool_turns_parse_into_the_contract() -> None:
    body: dict[str, Any] = {
        "model": "demo",
        "messages": [{"role": "user", "content": "Weather in Oslo?"},
                     {"role": "assistant", "content": None, "tool_calls": [CALL]},
                     {"role": "tool", "tool_call_id": "call_1", "content": "12C"}],
        "tools": [{"type": "function", "function": {"name": "get_weather", "strict": None,
                                                    "parameters": {"type": "object", "default": None}}}],
        "tool_choice": "auto",
    }
    req = parse_chat(body, ignore_unknown=False).request
    assert not req.messages[1].HasField("content") and req.messages[1].tool_calls[0].function.name == "get_weather"
    assert req.tool_choice.mode == "auto" and not req.tools[0].function.HasField("strict")
    assert "default" in req.tools[0].function.parameters.fields, "nulls inside a JSON schema are kept"


async def test_tool_conversation_through_the_shim(server: Any) -> None:
    body = {"model": "demo", "max_tokens": 2,
            "messages": [{"role": "user", "content": "Weather in Oslo?"},
                         {"role": "assistant", "content": None, "tool_calls": [CALL]},
                         {"role": "tool", "tool_call_id": "call_1", "content": "12C"}],
            "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}],
            "tool_choice": "none"}
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.config.server.http_port}", timeout=60) as c:
        r = await c.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["role"] == "assistant"
