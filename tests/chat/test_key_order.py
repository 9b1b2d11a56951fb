"""Keys come in a known order, so the same seeded request gives the same output on every server and front door.

A protobuf Struct keeps no order (upb iterates its map in an order that changes with every process), so schemas
travel as JSON text too (schema_json, parameters_json; the REST shim fills them), and a Struct alone gets one
fixed order: required properties first, in `required` order, then the others by name.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import grpc
import httpx
import pytest

from service.chat.schemas import ordered
from service.gen.llmserve.v1 import chat_pb2, chat_pb2_grpc
from tests.helpers import chat, field_violations, struct

FIELD = "response_format.json_schema.schema"
# Written neither sorted nor required-first, so either rule shows in the output.
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"occupation": {"enum": ["baker", "pilot"]}, "name": {"type": "string", "maxLength": 6},
                   "city": {"enum": ["Oslo", "Lima"]}, "age": {"type": "integer", "minimum": 0, "maximum": 99},
                   "zip": {"type": "string", "pattern": "^[0-9]{3}$"}},
    "required": ["zip", "name", "age", "city", "occupation"],
}
FIXED = ["zip", "name", "age", "city", "occupation"]   # required first, in `required` order
WRITTEN = list(SCHEMA["properties"])


def keys(text: str) -> list[str]:
    return list(json.loads(text))


def fmt(schema: dict[str, Any] | None = None, text: str = "") -> chat_pb2.ResponseFormat:
    given = chat_pb2.JsonSchema(name="person", schema_json=text)
    if schema is not None:
        given.schema.CopyFrom(struct(schema))
    return chat_pb2.ResponseFormat(type="json_schema", json_schema=given)


def test_the_fixed_order() -> None:
    schema = {"type": "object", "required": ["b", "z"],
              "$defs": {"y": {"type": "null"}, "x": {"const": {"q": 1, "p": 2}}},
              "properties": {"a": {"type": "object", "properties": {"d": {}, "c": {}}}, "z": {}, "b": {}, "y": {}},
              "anyOf": [{"properties": {"n": {}, "m": {}}, "required": ["n"]}]}
    out = ordered(schema)
    assert list(out) == sorted(schema) and list(out["properties"]) == ["b", "z", "a", "y"]
    assert list(out["properties"]["a"]["properties"]) == ["c", "d"] and list(out["$defs"]) == ["x", "y"]
    assert list(out["$defs"]["x"]["const"]) == ["p", "q"] and list(out["anyOf"][0]["properties"]) == ["n", "m"]


async def test_schema_json_gives_the_order_and_rest_matches_grpc(stub: chat_pb2_grpc.ChatServiceStub,
                                                                 server: Any) -> None:
    """The client's order, over gRPC (schema_json) and REST (the body): the same answer for the same seed."""
    body = {"model": "demo", "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 120, "seed": 4,
            "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}}
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.config.server.http_port}", timeout=60) as c:
        rest, text_only, both = await asyncio.gather(
            c.post("/v1/chat/completions", json=body),
            stub.CreateChatCompletion(chat(response_format=fmt(text=json.dumps(SCHEMA)), max_tokens=120, seed=4)),
            stub.CreateChatCompletion(chat(response_format=fmt(SCHEMA, json.dumps(SCHEMA)), max_tokens=120, seed=4)))
    answer = rest.json()["choices"][0]["message"]["content"]
    assert keys(answer) == WRITTEN
    assert text_only.choices[0].message.content == both.choices[0].message.content == answer


async def test_a_struct_alone_gets_the_fixed_order(stub: chat_pb2_grpc.ChatServiceStub) -> None:
    replies = await asyncio.gather(*(stub.CreateChatCompletion(chat(response_format=fmt(SCHEMA), max_tokens=120,
                                                                    seed=seed)) for seed in range(3)))
    for reply in replies:
        assert keys(reply.choices[0].message.content) == FIXED


async def test_the_same_request_gives_the_same_answer_on_two_servers(server_process: Any) -> None:
    """Two server processes (each with its own Struct iteration order): a Struct-only schema, a forced tool call
    (whose parameters the chat template also prints), the same answers."""
    tool = chat_pb2.Tool(type="function", function=chat_pb2.FunctionDefinition(name="register", parameters=struct(
        SCHEMA)))
    reqs = [chat(response_format=fmt(SCHEMA), max_tokens=120, seed=11),
            chat(tools=[tool], tool_choice=chat_pb2.ToolChoice(mode="required"), max_tokens=120, seed=11)]
    servers = [server_process(), server_process()]
    answers = []
    for srv in servers:
        await srv.wait_serving()
        async with grpc.aio.insecure_channel(srv.address) as channel:
            stub = chat_pb2_grpc.ChatServiceStub(channel)
            answers.append([await stub.CreateChatCompletion(r, timeout=60) for r in reqs])
    (schema_a, call_a), (schema_b, call_b) = answers
    assert schema_a.choices[0].message.content == schema_b.choices[0].message.content
    assert keys(schema_a.choices[0].message.content) == FIXED
    assert call_a.choices[0].message.tool_calls[0].function.arguments == \
        call_b.choices[0].message.tool_calls[0].function.arguments
    assert schema_a.usage.prompt_tokens == schema_b.usage.prompt_tokens
    assert call_a.usage.prompt_tokens == call_b.usage.prompt_tokens


@pytest.mark.parametrize(("schema", "text", "field", "says"), [
    (None, "{not json", FIELD + "_json", "not valid JSON"),
    (None, "[1, 2]", FIELD + "_json", "must be the text of a JSON object"),
    (SCHEMA, json.dumps({**SCHEMA, "required": ["zip"]}), FIELD + "_json", "not the same schema"),
    (None, json.dumps({"type": "strnig"}), FIELD + "_json", "not a valid JSON schema"),
    ({"type": "strnig"}, json.dumps({"type": "strnig"}), FIELD, "not a valid JSON schema"),
], ids=["not-json", "not-an-object", "differs", "bad-text-only", "bad-both"])
async def test_schema_json_problems_name_the_field(stub: chat_pb2_grpc.ChatServiceStub, schema: Any, text: str,
                                                   field: str, says: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.CreateChatCompletion(chat(response_format=fmt(schema, text), max_tokens=8))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(e.value) == [field] and says in e.value.details()


async def test_parameters_json_gives_the_arguments_order(stub: chat_pb2_grpc.ChatServiceStub) -> None:
    tool = chat_pb2.Tool(type="function", function=chat_pb2.FunctionDefinition(name="register",
                                                                                parameters_json=json.dumps(SCHEMA)))
    reply = await stub.CreateChatCompletion(chat(tools=[tool], tool_choice=chat_pb2.ToolChoice(mode="required"),
                                                 max_tokens=120, seed=2))
    assert keys(reply.choices[0].message.tool_calls[0].function.arguments) == WRITTEN
    tool.function.parameters_json = "[]"
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.CreateChatCompletion(chat(tools=[tool], tool_choice=chat_pb2.ToolChoice(mode="required"),
                                             max_tokens=8))
    assert field_violations(e.value) == ["tools[0].function.parameters_json"]
