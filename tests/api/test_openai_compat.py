"""OpenAI's whole chat-completion request, as real clients send it: every field accepted, those the models can
honour honoured (logit_bias, max_completion_tokens, parallel_tool_calls, user, developer turns, legacy functions),
special tokens kept out of the content; LangChain's ChatOpenAI and the openai SDK against the shim."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
import httpx
import openai
import pytest
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field

from service.gen.llmserve.v1 import chat_pb2, chat_pb2_grpc
from tests.helpers import USER, assert_error, body, chat, field_violations

EOT = 4  # the demo tokenizer's <|eot_id|>, one of its end-of-turn tokens
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                                 "parameters": {"type": "object",
                                                                "properties": {"city": {"type": "string"}},
                                                                "required": ["city"]}}}


@pytest.fixture
async def http(server: Any) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.config.server.http_port}", timeout=120) as c:
        yield c


def base_url(server: Any) -> str:
    return f"http://127.0.0.1:{server.config.server.http_port}/v1"


async def test_every_field_of_openais_request_is_accepted(http: httpx.AsyncClient,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """The fields without meaning here are accepted (their contract comments say what becomes of them); user and
    metadata reach the request's log line; max_completion_tokens bounds the answer."""
    everything = body(
        max_completion_tokens=3, ignore_eos=True, parallel_tool_calls=False, logit_bias={"7": -100}, user="u-42",
        store=False, metadata={"team": "search"}, service_tier="auto", modalities=["text"],
        prediction={"type": "content", "content": "Hello"}, reasoning_effort="low", verbosity="low",
        web_search_options={}, audio=None, safety_identifier="hash-1", prompt_cache_key="k",
        prompt_cache_retention="in_memory", logprobs=False, n=1, seed=3, stream=False, top_p=1, temperature=1,
        frequency_penalty=0, presence_penalty=0, stop=None, response_format={"type": "text"}, tools=None)
    with caplog.at_level(logging.INFO, logger="llmserve.request"):
        r = await http.post("/v1/chat/completions", json=everything)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 3
    assert any(getattr(rec, "user", None) == "u-42" for rec in caplog.records), "user reaches the log line"
    assert_error(await http.post("/v1/chat/completions", json=body(modalities=["text", "audio"])), 400,
                 "invalid_request_error", "invalid_argument", "modalities[1]")
    r = await http.post("/v1/chat/completions", json=body(max_tokens=2, max_completion_tokens=3))
    assert_error(r, 400, "invalid_request_error", "invalid_argument", "max_completion_tokens")


async def test_logit_bias_forces_and_bans_tokens(stub: chat_pb2_grpc.ChatServiceStub) -> None:
    greedy = await stub.CreateChatCompletion(chat(max_tokens=1, temperature=0.0, logprobs=True, seed=1))
    first = greedy.choices[0].logprobs.content[0]
    token_id = (await stub.Tokenize(chat_pb2.TokenizeRequest(model="demo", text=first.token))).tokens[0]
    banned = await stub.CreateChatCompletion(chat(max_tokens=1, temperature=0.0, logprobs=True, seed=1,
                                                  logit_bias={token_id: -100}))
    assert banned.choices[0].logprobs.content[0].token != first.token
    forced = await stub.CreateChatCompletion(chat(max_tokens=6, temperature=1.0, ignore_eos=True, logprobs=True,
                                                  logit_bias={token_id + 1: 100}))
    assert {t.token for t in forced.choices[0].logprobs.content} == {
        (await stub.CreateChatCompletion(chat(max_tokens=1, temperature=0.0, logprobs=True,
                                              logit_bias={token_id + 1: 100}))).choices[0].logprobs.content[0].token}
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.CreateChatCompletion(chat(max_tokens=1, logit_bias={10_000_000: 5, 3: 101}))
    assert sorted(field_violations(e.value)) == ["logit_bias[10000000]", "logit_bias[3]"]


async def test_end_of_turn_text_never_reaches_the_content_under_ignore_eos(stub: chat_pb2_grpc.ChatServiceStub,
                                                                         http: httpx.AsyncClient) -> None:
    """The end-of-turn token, made certain by logit_bias and generated anyway under ignore_eos, adds no text;
    skip_special_tokens false lets special tokens' text through."""
    reply = await stub.CreateChatCompletion(chat(max_tokens=4, ignore_eos=True, logit_bias={EOT: 100}))
    assert reply.choices[0].message.content == "" and reply.usage.completion_tokens == 4
    raw = await stub.CreateChatCompletion(chat(max_tokens=4, ignore_eos=True, logit_bias={EOT: 100},
                                               skip_special_tokens=False))
    assert raw.choices[0].message.content == "<|eot_id|>" * 4
    r = await http.post("/v1/chat/completions", json=body(max_tokens=4, ignore_eos=True, logit_bias={str(EOT): 100},
                                                          stream=True))
    assert b"eot_id" not in r.content and r.content.endswith(b"data: [DONE]\n\n")


async def test_developer_is_a_system_turn(stub: chat_pb2_grpc.ChatServiceStub, http: httpx.AsyncClient) -> None:
    def tokenize(role: str) -> chat_pb2.TokenizeRequest:
        return chat_pb2.TokenizeRequest(model="demo", messages=[chat_pb2.ChatMessage(role=role, content="Be terse."),
                                                                chat_pb2.ChatMessage(role="user", content="Hi")])
    as_developer = await stub.Tokenize(tokenize("developer"))
    assert as_developer.tokens == (await stub.Tokenize(tokenize("system"))).tokens
    r = await http.post("/v1/chat/completions", json=body(messages=[{"role": "developer", "content": "Be terse."},
                                                                    *USER], max_tokens=2))
    assert r.status_code == 200, r.text
    assert_error(await http.post("/v1/chat/completions", json=body(messages=[{"role": "developer"}, *USER])), 400,
                 "invalid_request_error", "invalid_argument", "messages[0].content")


async def test_legacy_functions_are_served_as_tools(http: httpx.AsyncClient) -> None:
    r = await http.post("/v1/chat/completions", json=body(functions=[WEATHER_TOOL["function"]],
                                                          function_call={"name": "get_weather"}))
    assert r.status_code == 200, r.text
    [call] = r.json()["choices"][0]["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    r = await http.post("/v1/chat/completions", json=body(functions=[WEATHER_TOOL["function"]], tools=[WEATHER_TOOL]))
    assert_error(r, 400, "invalid_request_error", "invalid_argument", "functions")


async def test_openai_sdk_sends_the_newer_fields(server: Any) -> None:
    client = openai.AsyncOpenAI(base_url=base_url(server), api_key="unused")
    reply = await client.chat.completions.create(
        model="demo", messages=[{"role": "developer", "content": "Be terse."}, *USER], max_completion_tokens=48,
        parallel_tool_calls=False, tools=[WEATHER_TOOL], tool_choice="required", store=False, user="u-1",
        metadata={"k": "v"}, service_tier="auto", logit_bias={"7": -50}, reasoning_effort="low",
        safety_identifier="s-1", prompt_cache_key="c")
    assert len(reply.choices[0].message.tool_calls or []) <= 1 and reply.choices[0].finish_reason


class Weather(BaseModel):
    city: str = Field(max_length=12)  # the demo model's random text fits the token budget


@tool(args_schema=Weather)
def get_weather(city: str) -> str:
    """Weather in a city."""
    return "sunny"


async def test_langchain_structured_output_and_bind_tools(server: Any) -> None:
    """LangChain sends parallel_tool_calls: false with both; before, the shim refused it as an unknown field."""
    model = ChatOpenAI(model="demo", base_url=base_url(server), api_key="unused", max_completion_tokens=64,
                       temperature=0.7)
    weather = await model.with_structured_output(Weather, method="function_calling").ainvoke("Weather in Oslo?")
    assert isinstance(weather, Weather)
    bound = model.bind_tools([get_weather], tool_choice="get_weather", parallel_tool_calls=False)
    answer = await bound.ainvoke("Weather in Oslo?")
    assert [c["name"] for c in answer.tool_calls] == ["get_weather"] and isinstance(answer.tool_calls[0]["args"],
                                                                                    dict)
