"""Tool calling: tool_choice required and named always give a valid call of an allowed tool (20 seeds, unary
and streamed), none never does, the parser finds calls however the text is split, and a whole round trip
(call, tool answer, next turn) works over gRPC, the REST shim and the openai SDK."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any, Literal

import grpc
import jsonschema
import openai
import pydantic
import pytest
from google.protobuf import json_format

from service.chat.schemas import schema_problem
from service.chat.tools import Arguments, CallStart, Content, call_parser, call_schema
from service.gen.llmserve.v1 import chat_pb2, chat_pb2_grpc
from service.models.template import HERMES, LLAMA_JSON
from tests.helpers import chat, field_violations, struct

FR = chat_pb2.FinishReason
SEEDS = range(20)

# Bounded, so that a random model's calls end within max_tokens.
TOOLS: dict[str, dict[str, Any]] = {
    "get_weather": {"type": "object",
                    "properties": {"city": {"type": "string", "maxLength": 16},
                                   "unit": {"enum": ["celsius", "fahrenheit"]}},
                    "required": ["city", "unit"]},
    "book_table": {"type": "object",
                   "properties": {"people": {"type": "integer", "minimum": 1, "maximum": 12},
                                  "outdoor": {"type": "boolean"},
                                  "dishes": {"type": "array", "maxItems": 2,
                                             "items": {"type": "string", "maxLength": 8}}},
                   "required": ["people", "outdoor"]},
    "ping": {"type": "object", "properties": {}},
}


def tools_pb() -> list[chat_pb2.Tool]:
    return [chat_pb2.Tool(type="function", function=chat_pb2.FunctionDefinition(
        name=name, description=f"{name} tool", parameters=struct(schema))) for name, schema in TOOLS.items()]


def required() -> chat_pb2.ToolChoice:
    return chat_pb2.ToolChoice(mode="required")


def named(name: str) -> chat_pb2.ToolChoice:
    return chat_pb2.ToolChoice(function=chat_pb2.NamedFunction(name=name))


def assert_valid_call(name: str, arguments: str, allowed: set[str]) -> None:
    assert name in allowed, name
    jsonschema.validate(json.loads(arguments), TOOLS[name])


# --- the parser --------------------------------------------------------------------------------------------

CALLS = [
    '{"name": "get_weather", "parameters": {"city": "Oslo", "unit": "celsius"}}',
    ' \n{ "name" : "book_table" ,\n "parameters" : {"people": 2, "outdoor": false, "dishes": ["a}", "b\\"{"]}} ',
    '<|python_tag|>{"name": "ping", "parameters": {}}',
    '{"name": "get_weather", "arguments": {"city": "{[", "unit": "fahrenheit"}}',
    '{"parameters": {}, "name": "ping"}',
]
HERMES_NOT_CALLS = [
    '{"name": "ping", "arguments": {}}',  # a Hermes-format model's call is inside the tags
    '<tool_call>\n{"name": "unknown_tool", "arguments": {}}\n</tool_call>',
    'I would call <tool_call>{"name": "ping", "arguments": {}}</tool_call>',
    "<tool_", "",
]
HERMES_CALLS = [
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}\n</tool_call>',
    ' <tool_call>{"name": "book_table", "arguments": {"people": 2, "outdoor": false, "dishes": ["}"]}}</tool_call>',
    '<tool_call>\n{"name": "ping", "arguments": {}}\n</tool_call>\n<tool_call>\n{"name": "ping"',
]
NOT_CALLS = [
    "Hello there",
    '{"name": "unknown_tool", "parameters": {}}',
    '{"name": "get_weathe", "parameters": {}}',
    "  {not json",
    "",
]


def pieces_by_splits(text: str, names: list[str], tool_format: str = LLAMA_JSON) -> list[list[Any]]:
    """The parser's output for `text` fed whole, and split at every position."""
    out = []
    for cut in range(len(text) + 1):
        parser = call_parser(names, tool_format)
        out.append(parser.feed(text[:cut]) + parser.feed(text[cut:]) + parser.finish())
    return out


@pytest.mark.parametrize("text", CALLS)
def test_parser_finds_a_call_however_the_text_is_split(text: str) -> None:
    expected = json.loads(text.removeprefix("<|python_tag|>"))
    for pieces in pieces_by_splits(text, list(TOOLS)):
        starts = [p for p in pieces if isinstance(p, CallStart)]
        assert len(starts) == 1 and starts[0].name == expected["name"] and starts[0].id.startswith("call_")
        assert not [p for p in pieces if isinstance(p, Content)]
        arguments = "".join(p.text for p in pieces if isinstance(p, Arguments))
        assert json.loads(arguments) == expected.get("parameters", expected.get("arguments"))


@pytest.mark.parametrize("text", NOT_CALLS)
def test_parser_passes_other_text_through_as_content(text: str) -> None:
    for pieces in pieces_by_splits(text, list(TOOLS)):
        assert all(isinstance(p, Content) for p in pieces)
        assert "".join(p.text for p in pieces) == text


@pytest.mark.parametrize("text", HERMES_CALLS)
def test_hermes_parser_finds_the_first_call_in_its_tags_however_the_text_is_split(text: str) -> None:
    first = text.strip().removeprefix("<tool_call>").split("</tool_call>")[0]
    expected = json.loads(first)
    for pieces in pieces_by_splits(text, list(TOOLS), HERMES):
        starts = [p for p in pieces if isinstance(p, CallStart)]
        assert len(starts) == 1 and starts[0].name == expected["name"]
        assert not [p for p in pieces if isinstance(p, Content)]  # the closing tag and what follows are dropped
        assert json.loads("".join(p.text for p in pieces if isinstance(p, Arguments))) == expected["arguments"]


@pytest.mark.parametrize("text", HERMES_NOT_CALLS)
def test_hermes_parser_passes_other_text_through_as_content(text: str) -> None:
    for pieces in pieces_by_splits(text, list(TOOLS), HERMES):
        assert all(isinstance(p, Content) for p in pieces)
        assert "".join(p.text for p in pieces) == text


def test_parser_without_tools_never_holds_text() -> None:
    parser = call_parser([], LLAMA_JSON)
    assert parser.feed('{"name": "ping", "parameters": {}}') == [Content('{"name": "ping", "parameters": {}}')]
    assert not parser.called


def test_call_schema_keeps_each_tools_definitions_apart() -> None:
    """pydantic writes nested models as $defs; two tools may use the same definition name for different things."""
    a = {"type": "object", "properties": {"x": {"$ref": "#/$defs/Item"}}, "required": ["x"],
         "$defs": {"Item": {"type": "integer"}}}
    b = {"type": "object", "properties": {"x": {"$ref": "#/$defs/Item"}}, "required": ["x"],
         "$defs": {"Item": {"type": "string", "maxLength": 3}}}
    schema = call_schema({"a": a, "b": b}, LLAMA_JSON)
    assert schema_problem(schema) is None
    jsonschema.validate({"name": "a", "parameters": {"x": 1}}, schema)
    jsonschema.validate({"name": "b", "parameters": {"x": "abc"}}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "a", "parameters": {"x": "abc"}}, schema)


# --- gRPC -------------------------------------------------------------------------------------------------

async def streamed_call(stub: chat_pb2_grpc.ChatServiceStub,
                        req: chat_pb2.ChatCompletionRequest) -> tuple[list[chat_pb2.ToolCallDelta], str, int]:
    deltas, content, finish = [], [], FR.FINISH_REASON_UNSPECIFIED
    async for chunk in stub.StreamChatCompletion(req):
        for c in chunk.choices:
            deltas += c.delta.tool_calls
            content.append(c.delta.content)
            finish = c.finish_reason or finish
    return deltas, "".join(content), finish


def assert_openai_deltas(deltas: list[chat_pb2.ToolCallDelta], allowed: set[str]) -> None:
    """First the id, type and name with empty arguments; then only argument fragments, which make the JSON."""
    first, rest = deltas[0], deltas[1:]
    assert first.index == 0 and first.id.startswith("call_") and first.type == "function"
    assert first.function.name and first.function.arguments == ""
    assert rest and all(d.index == 0 and not d.id and not d.function.name for d in rest)
    assert_valid_call(first.function.name, "".join(d.function.arguments for d in rest), allowed)


@pytest.mark.parametrize("choice", ["required", "book_table"])
async def test_forced_calls_are_valid_calls_of_allowed_tools(stub: chat_pb2_grpc.ChatServiceStub,
                                                            choice: str) -> None:
    allowed = set(TOOLS) if choice == "required" else {choice}
    reqs = [chat("What now?", tools=tools_pb(), tool_choice=required() if choice == "required" else named(choice),
                 seed=seed, max_tokens=120) for seed in SEEDS]
    unary, streams = await asyncio.gather(asyncio.gather(*(stub.CreateChatCompletion(r) for r in reqs)),
                                          asyncio.gather(*(streamed_call(stub, r) for r in reqs)))
    for reply in unary:
        c = reply.choices[0]
        assert c.finish_reason == FR.FINISH_REASON_TOOL_CALLS
        assert not c.message.HasField("content") and len(c.message.tool_calls) == 1
        call = c.message.tool_calls[0]
        assert call.id.startswith("call_") and call.type == "function"
        assert_valid_call(call.function.name, call.function.arguments, allowed)
    for deltas, content, finish in streams:
        assert finish == FR.FINISH_REASON_TOOL_CALLS and content == ""
        assert_openai_deltas(deltas, allowed)
    if choice == "required":
        assert len({r.choices[0].message.tool_calls[0].function.name for r in unary}) > 1


async def test_forced_calls_are_whole_calls_whatever_max_tokens(stub: chat_pb2_grpc.ChatServiceStub) -> None:
    """Unbounded arguments (a random model rambles in the city's name), max_tokens from the minimum to 300: every
    call's arguments parse and validate, unary and streamed; "length" when the budget closed the call."""
    tools = tools_pb()
    tools[0].function.parameters.CopyFrom(struct({"type": "object", "properties": {
        "city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"]}))
    probe = chat("What now?", tools=tools, tool_choice=required(), max_tokens=0)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.CreateChatCompletion(probe)
    assert field_violations(e.value) == ["max_tokens"], e.value.details()
    least = int(re.search(r"allows, (\d+) tokens", e.value.details()).group(1))  # type: ignore[union-attr]
    budgets = [least + (300 - least) * i // (len(SEEDS) - 1) for i in SEEDS]
    reqs = [chat("What now?", tools=tools, tool_choice=required(), seed=seed, max_tokens=budget)
            for seed, budget in zip(SEEDS, budgets, strict=True)]
    unary, streams = await asyncio.gather(asyncio.gather(*(stub.CreateChatCompletion(r) for r in reqs)),
                                          asyncio.gather(*(streamed_call(stub, r) for r in reqs)))
    schemas = {**TOOLS, "get_weather": json.loads(json_format.MessageToJson(tools[0].function.parameters))}
    for reply, (deltas, content, finish) in zip(unary, streams, strict=True):
        c = reply.choices[0]
        assert c.finish_reason in (FR.FINISH_REASON_TOOL_CALLS, FR.FINISH_REASON_LENGTH) and finish == c.finish_reason
        call = c.message.tool_calls[0]
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
        assert content == "" and "".join(d.function.arguments for d in deltas[1:]) == call.function.arguments
    assert FR.FINISH_REASON_LENGTH in [r.choices[0].finish_reason for r in unary]


async def test_none_never_calls_even_when_the_text_looks_like_a_call(stub: chat_pb2_grpc.ChatServiceStub) -> None:
    """With tool_choice none, a JSON schema may force exactly a call's shape: it stays content."""
    shape = call_schema({"get_weather": TOOLS["get_weather"]}, LLAMA_JSON)
    fmt = chat_pb2.ResponseFormat(type="json_schema", json_schema=chat_pb2.JsonSchema(name="c", schema=struct(shape)))
    reqs = [chat(tools=tools_pb(), tool_choice=chat_pb2.ToolChoice(mode="none"), response_format=fmt, seed=seed,
                 max_tokens=120) for seed in range(5)]
    unary, streams = await asyncio.gather(asyncio.gather(*(stub.CreateChatCompletion(r) for r in reqs)),
                                          asyncio.gather(*(streamed_call(stub, r) for r in reqs)))
    for reply in unary:
        c = reply.choices[0]
        assert c.finish_reason == FR.FINISH_REASON_STOP and not c.message.tool_calls
        assert json.loads(c.message.content)["name"] == "get_weather"
    for deltas, content, finish in streams:
        assert finish == FR.FINISH_REASON_STOP and not deltas and json.loads(content)["name"] == "get_weather"


@pytest.mark.parametrize("parameters", [{"type": "object", "properties": {"x": {"type": "nope"}}},
                                        {"type": "string"}], ids=["not-a-schema", "not-an-object"])
@pytest.mark.parametrize("mode", ["auto", "required"])
async def test_a_bad_parameters_schema_names_the_tool(stub: chat_pb2_grpc.ChatServiceStub, parameters: dict[str, Any],
                                                      mode: str) -> None:
    tools = tools_pb()
    tools[1].function.parameters.CopyFrom(struct(parameters))
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.CreateChatCompletion(chat(tools=tools, tool_choice=chat_pb2.ToolChoice(mode=mode), max_tokens=8))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(e.value) == ["tools[1].function.parameters"]


async def test_round_trip_over_grpc(stub: chat_pb2_grpc.ChatServiceStub) -> None:
    first = await stub.CreateChatCompletion(chat("Weather in Oslo?", tools=tools_pb(), tool_choice=named("get_weather"),
                                                 seed=3, max_tokens=120))
    answer = first.choices[0].message
    call = answer.tool_calls[0]
    messages = [chat_pb2.ChatMessage(role="user", content="Weather in Oslo?"), answer,
                chat_pb2.ChatMessage(role="tool", tool_call_id=call.id, content='{"temperature": 12}')]
    req = chat_pb2.ChatCompletionRequest(model="demo", messages=messages, tools=tools_pb(), seed=3, max_tokens=16)
    rendered = await stub.Tokenize(chat_pb2.TokenizeRequest(model="demo", messages=messages))
    assert rendered.count > (await stub.Tokenize(chat_pb2.TokenizeRequest(model="demo", messages=messages[:1]))).count
    second = await stub.CreateChatCompletion(req)
    c = second.choices[0]
    assert c.message.role == "assistant" and c.finish_reason in (FR.FINISH_REASON_STOP, FR.FINISH_REASON_LENGTH)
    assert second.usage.prompt_tokens > first.usage.prompt_tokens


# --- REST and the openai SDK -------------------------------------------------------------------------------

def openai_tools() -> list[dict[str, Any]]:
    return [{"type": "function", "function": {"name": name, "parameters": schema}} for name, schema in TOOLS.items()]


@pytest.fixture
def client(server: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{server.config.server.http_port}/v1", api_key="unused",
                              max_retries=0)


async def test_sdk_round_trip_with_a_named_function(client: openai.AsyncOpenAI) -> None:
    messages: list[Any] = [{"role": "user", "content": "Book a table"}]
    first = await client.chat.completions.create(
        model="demo", messages=messages, tools=openai_tools(), max_tokens=120, seed=5,
        tool_choice={"type": "function", "function": {"name": "book_table"}})
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert_valid_call(call.function.name, call.function.arguments, {"book_table"})
    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "booked"}]
    second = await client.chat.completions.create(model="demo", messages=messages, tools=openai_tools(),
                                                  max_tokens=16, seed=5)
    assert second.choices[0].message.role == "assistant"
    assert second.choices[0].finish_reason in ("stop", "length")


async def test_sdk_streams_tool_call_deltas(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "Hi"}],
                                                  tools=openai_tools(), tool_choice="required", max_tokens=120,
                                                  seed=7, stream=True)
    calls: list[Any] = []
    finish = None
    async for chunk in stream:
        for c in chunk.choices:
            calls += c.delta.tool_calls or []
            finish = c.finish_reason or finish
    assert finish == "tool_calls"
    assert calls[0].id and calls[0].type == "function" and calls[0].function.name
    assert all(c.index == 0 and c.id is None for c in calls[1:])
    assert_valid_call(calls[0].function.name, "".join(c.function.arguments or "" for c in calls), set(TOOLS))


class Weather(pydantic.BaseModel):
    city: str = pydantic.Field(max_length=12)
    unit: Literal["celsius", "fahrenheit"]


class Forecast(pydantic.BaseModel):
    days: list[Weather] = pydantic.Field(max_length=2)
    certain: bool


async def test_sdk_parse_with_a_pydantic_response_format(client: openai.AsyncOpenAI) -> None:
    """The SDK sends the model's strict JSON schema (nested models as $defs) and parses the answer back."""
    replies = await asyncio.gather(*(client.chat.completions.parse(
        model="demo", messages=[{"role": "user", "content": "Forecast?"}], response_format=Forecast,
        max_tokens=160, seed=seed) for seed in range(5)))
    for reply in replies:
        assert isinstance(reply.choices[0].message.parsed, Forecast)


async def test_sdk_parse_with_a_pydantic_tool(client: openai.AsyncOpenAI) -> None:
    reply = await client.chat.completions.parse(
        model="demo", messages=[{"role": "user", "content": "Weather?"}], max_tokens=120, seed=2,
        tools=[openai.pydantic_function_tool(Weather, name="get_weather")], tool_choice="required")
    call = reply.choices[0].message.tool_calls[0]
    assert isinstance(call.function.parsed_arguments, Weather)


async def test_sdk_stream_helper_parses_the_streamed_call(client: openai.AsyncOpenAI) -> None:
    """The SDK's streaming helper rebuilds the call from our deltas and parses its arguments."""
    async with client.chat.completions.stream(
            model="demo", messages=[{"role": "user", "content": "Weather?"}], max_tokens=120, seed=4,
            tools=[openai.pydantic_function_tool(Weather, name="get_weather")], tool_choice="required") as stream:
        final = await stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert isinstance(choice.message.tool_calls[0].function.parsed_arguments, Weather)


async def test_each_of_n_choices_makes_its_own_call(stub: chat_pb2_grpc.ChatServiceStub) -> None:
    req = chat(tools=tools_pb(), tool_choice=required(), n=3, seed=11, max_tokens=120)
    reply, (deltas, _, finish) = await asyncio.gather(stub.CreateChatCompletion(req), streamed_call(stub, req))
    calls = [c.message.tool_calls[0] for c in reply.choices]
    assert len({c.id for c in calls}) == 3
    for c in reply.choices:
        assert c.finish_reason == FR.FINISH_REASON_TOOL_CALLS
        assert_valid_call(c.message.tool_calls[0].function.name, c.message.tool_calls[0].function.arguments, set(TOOLS))
    assert len([d for d in deltas if d.id]) == 3 and finish == FR.FINISH_REASON_TOOL_CALLS


async def test_tools_reach_the_prompt_unless_tool_choice_is_none(stub: chat_pb2_grpc.ChatServiceStub) -> None:
    async def prompt_tokens(**fields: Any) -> int:
        return (await stub.CreateChatCompletion(chat("Hi", max_tokens=1, **fields))).usage.prompt_tokens

    none_choice = chat_pb2.ToolChoice(mode="none")
    bare, auto, none = await asyncio.gather(prompt_tokens(), prompt_tokens(tools=tools_pb()),
                                            prompt_tokens(tools=tools_pb(), tool_choice=none_choice))
    assert none == bare < auto
