"""Tools and JSON on a real model whose chat template ignores tools (SmolLM2's ChatML): the Hermes format.

ListModels says "hermes"; tools reach the prompt (they used to vanish: the same 39 tokens with and
without); forced calls (required, named) are valid `<tool_call>` calls of allowed tools over gRPC and
the openai SDK, streamed and unary alike; a whole round trip renders the call and its result; JSON
schema answers validate. With tool_choice auto the model decides, and SmolLM2-135M rarely calls: the
rate is measured and printed (`pytest tests/smollm2/test_tools_and_json.py -k auto -s`), and every
answer, call or not, must be parsed the same way streamed and unary.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from transformers import PreTrainedTokenizerBase

from service.gen.llmserve.v1 import chat_pb2, chat_pb2_grpc
from tests.helpers import SMOLLM2, struct

FR = chat_pb2.FinishReason
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24},
                                           "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"]}
TIME = {"type": "object", "properties": {"timezone": {"type": "string", "maxLength": 32}}, "required": ["timezone"]}
TOOLS = {"get_weather": WEATHER, "get_time": TIME}
QUESTION = "What's the weather in Paris?"
CALL = re.compile(r'\s*<tool_call>\s*\{\s*"name"\s*:\s*"(get_weather|get_time)"\s*,\s*"(arguments|parameters)"\s*:')


def tools_pb() -> list[chat_pb2.Tool]:
    return [chat_pb2.Tool(type="function", function=chat_pb2.FunctionDefinition(
        name=name, description=f"{name.replace('_', ' ')} of a place", parameters=struct(schema)))
        for name, schema in TOOLS.items()]


def ask(content: str = QUESTION, **fields: Any) -> chat_pb2.ChatCompletionRequest:
    req = chat_pb2.ChatCompletionRequest(model=SMOLLM2, messages=[chat_pb2.ChatMessage(role="user", content=content)],
                                         max_tokens=96)
    for name, value in fields.items():
        if isinstance(value, list):
            getattr(req, name).extend(value)
        elif hasattr(value, "DESCRIPTOR"):
            getattr(req, name).CopyFrom(value)
        else:
            setattr(req, name, value)
    return req


async def streamed(stub: chat_pb2_grpc.ChatServiceStub,
                   req: chat_pb2.ChatCompletionRequest) -> tuple[str, str, str, int]:
    """A stream reduced to (content, call name, call arguments, finish reason), as the unary answer reads."""
    content, name, arguments, finish = [], "", [], FR.FINISH_REASON_UNSPECIFIED
    async for chunk in stub.StreamChatCompletion(req):
        for c in chunk.choices:
            content.append(c.delta.content)
            for delta in c.delta.tool_calls:
                assert delta.index == 0
                name = name or delta.function.name
                arguments.append(delta.function.arguments)
            finish = c.finish_reason or finish
    return "".join(content), name, "".join(arguments), finish


def unary(reply: chat_pb2.ChatCompletion) -> tuple[str, str, str, int]:
    c = reply.choices[0]
    call = c.message.tool_calls[0].function if c.message.tool_calls else chat_pb2.FunctionCall()
    return c.message.content, call.name, call.arguments, c.finish_reason


async def test_listmodels_says_hermes_on_both_front_doors(smollm2: chat_pb2_grpc.ChatServiceStub,
                                                          smollm2_http: httpx.AsyncClient) -> None:
    listed = await smollm2.ListModels(chat_pb2.ListModelsRequest())
    assert [(m.id, m.tool_format, m.owned_by) for m in listed.data] == [(SMOLLM2, "hermes", "HuggingFaceTB")]
    rest = (await smollm2_http.get("/v1/models")).json()["data"]
    assert [(m["id"], m["tool_format"]) for m in rest] == [(SMOLLM2, "hermes")]


async def test_tools_reach_the_prompt_unless_tool_choice_is_none(smollm2: chat_pb2_grpc.ChatServiceStub) -> None:
    async def prompt_tokens(**fields: Any) -> int:
        return (await smollm2.CreateChatCompletion(ask(max_tokens=1, **fields))).usage.prompt_tokens

    bare, offered, none = await asyncio.gather(
        prompt_tokens(), prompt_tokens(tools=tools_pb()),
        prompt_tokens(tools=tools_pb(), tool_choice=chat_pb2.ToolChoice(mode="none")))
    assert none == bare < offered - 100  # both signatures and the instructions


@pytest.mark.parametrize("choice", ["required", "get_time"])
async def test_forced_calls_are_valid_calls_streamed_and_unary(smollm2: chat_pb2_grpc.ChatServiceStub,
                                                               choice: str) -> None:
    tool_choice = chat_pb2.ToolChoice(mode="required") if choice == "required" else \
        chat_pb2.ToolChoice(function=chat_pb2.NamedFunction(name=choice))
    allowed = set(TOOLS) if choice == "required" else {choice}
    reqs = [ask(tools=tools_pb(), tool_choice=tool_choice, temperature=0.8, seed=seed) for seed in range(4)]
    reqs.append(ask(tools=tools_pb(), tool_choice=tool_choice, temperature=0))
    replies, streams = await asyncio.gather(asyncio.gather(*(smollm2.CreateChatCompletion(r) for r in reqs)),
                                            asyncio.gather(*(streamed(smollm2, r) for r in reqs)))
    for reply, stream in zip(replies, streams, strict=True):
        content, name, arguments, finish = unary(reply)
        assert (content, finish) == ("", FR.FINISH_REASON_TOOL_CALLS) and name in allowed
        jsonschema.validate(json.loads(arguments), TOOLS[name])
        assert stream == (content, name, arguments, finish)
    if choice == "required":  # the greedy answer asks for the weather, as asked
        assert unary(replies[-1])[1] == "get_weather"


async def test_sdk_round_trip(smollm2_server: Any, smollm2: chat_pb2_grpc.ChatServiceStub,
                              hf_tokenizer: PreTrainedTokenizerBase) -> None:
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{smollm2_server.config.server.http_port}/v1",
                                api_key="unused", max_retries=0)
    tools = [{"type": "function", "function": {"name": n, "parameters": s}} for n, s in TOOLS.items()]
    result = '{"temperature": 18, "unit": "celsius"}'
    messages: list[Any] = [{"role": "user", "content": QUESTION}]
    first = await client.chat.completions.create(
        model=SMOLLM2, messages=messages, tools=tools, max_tokens=96, temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    call = first.choices[0].message.tool_calls[0]
    assert first.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments)["city"] == "Paris"
    messages += [first.choices[0].message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": result}]
    second = await client.chat.completions.create(model=SMOLLM2, messages=messages, tools=tools, max_tokens=48,
                                                  temperature=0)
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # the prompt the model saw: its call and the result, in the Hermes form
    rendered = await smollm2.Tokenize(chat_pb2.TokenizeRequest(model=SMOLLM2, messages=[
        chat_pb2.ChatMessage(role="user", content=QUESTION),
        chat_pb2.ChatMessage(role="assistant", tool_calls=[chat_pb2.ToolCall(
            id=call.id, type="function", function=chat_pb2.FunctionCall(name="get_weather",
                                                                        arguments=call.function.arguments))]),
        chat_pb2.ChatMessage(role="tool", tool_call_id=call.id, content=result)]))
    text = hf_tokenizer.decode(rendered.tokens)
    assert '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": ' in text
    assert f"<|im_start|>user\n<tool_response>\n{result}\n</tool_response><|im_end|>" in text
    assert second.usage.prompt_tokens > rendered.count  # and the tools besides


async def test_json_schema_answers_validate(smollm2: chat_pb2_grpc.ChatServiceStub) -> None:
    schema = {"type": "object", "properties": {"country": {"type": "string", "maxLength": 32},
                                               "capital": {"type": "string", "maxLength": 32},
                                               "population_millions": {"type": "number", "minimum": 0}},
              "required": ["country", "capital", "population_millions"]}
    fmt = chat_pb2.ResponseFormat(type="json_schema", json_schema=chat_pb2.JsonSchema(name="c", schema=struct(schema)))
    reqs = [ask("What is the capital of France? Answer in JSON.", response_format=fmt, temperature=0)]
    reqs += [ask("Describe France in JSON.", response_format=fmt, temperature=0.8, seed=s) for s in range(4)]
    replies = await asyncio.gather(*(smollm2.CreateChatCompletion(r) for r in reqs))
    for reply in replies:
        assert reply.choices[0].finish_reason == FR.FINISH_REASON_STOP
        jsonschema.validate(json.loads(reply.choices[0].message.content), schema)
    assert json.loads(replies[0].choices[0].message.content)["capital"] == "Paris"


async def test_auto_calls_are_parsed_alike_streamed_and_unary_and_their_rate_is_reported(
        smollm2: chat_pb2_grpc.ChatServiceStub) -> None:
    """The model decides. Whatever it writes, an answer that opens with a <tool_call> of a known tool is a call
    and anything else is content, the same way in the stream and in the unary answer."""
    prompt = "Use the get_weather tool to get the weather in Paris."
    reqs = [ask(prompt, tools=tools_pb(), temperature=0, max_tokens=64)]
    reqs += [ask(prompt, tools=tools_pb(), temperature=0.7, seed=seed, max_tokens=64) for seed in range(8)]
    replies, streams = await asyncio.gather(asyncio.gather(*(smollm2.CreateChatCompletion(r) for r in reqs)),
                                            asyncio.gather(*(streamed(smollm2, r) for r in reqs)))
    calls = 0
    for reply, stream in zip(replies, streams, strict=True):
        content, name, arguments, finish = unary(reply)
        assert stream == (content, name, arguments, finish)
        if name:
            calls += 1
            assert content == "" and name in TOOLS
            assert finish in (FR.FINISH_REASON_TOOL_CALLS, FR.FINISH_REASON_LENGTH)
        else:
            assert CALL.match(content) is None, content
    print(f"\ntool_choice auto on {SMOLLM2}: {calls} of {len(reqs)} answers called a tool")
