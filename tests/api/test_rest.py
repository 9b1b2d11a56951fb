"""The REST shim co-located with the gRPC server, through a real HTTP client on loopback."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.admission import Phase
from service.gen.llmserve.v1 import chat_pb2_grpc
from tests.helpers import USER, assert_error, body, chat, sse_events, wait_until


@pytest.fixture
async def http(server: Any) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.config.server.http_port}", timeout=60) as c:
        yield c


def compact(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


async def test_unary_is_openai_shaped_and_matches_grpc(http: httpx.AsyncClient,
                                                       stub: chat_pb2_grpc.ChatServiceStub) -> None:
    r = await http.post("/v1/chat/completions", json=body(n=2, max_tokens=6, ignore_eos=True, seed=11),
                        headers={"x-request-id": "rest-unary-1"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "rest-unary-1"
    reply = r.json()
    assert list(reply) == ["id", "object", "created", "model", "choices", "usage"]
    assert reply["object"] == "chat.completion" and reply["id"].startswith("chatcmpl-") and reply["model"] == "demo"
    assert isinstance(reply["created"], int) and abs(reply["created"] - time.time()) < 60
    for i, choice in enumerate(reply["choices"]):
        assert choice == {"index": i, "message": {"role": "assistant", "content": choice["message"]["content"],
                                                  "refusal": None},
                          "logprobs": None, "finish_reason": "length"}
    grpc_reply = await stub.CreateChatCompletion(chat(n=2, max_tokens=6, ignore_eos=True, seed=11))
    assert [c["message"]["content"] for c in reply["choices"]] == [c.message.content for c in grpc_reply.choices]
    usage = reply["usage"]
    assert usage == {"prompt_tokens": grpc_reply.usage.prompt_tokens, "completion_tokens": 12,
                     "total_tokens": grpc_reply.usage.prompt_tokens + 12}


async def test_logprobs_are_openai_shaped(http: httpx.AsyncClient) -> None:
    r = await http.post("/v1/chat/completions", json=body(max_tokens=3, ignore_eos=True, logprobs=True,
                                                           top_logprobs=2, seed=3))
    logprobs = r.json()["choices"][0]["logprobs"]
    assert logprobs["refusal"] is None and len(logprobs["content"]) == 3
    for entry in logprobs["content"]:
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"} and entry["logprob"] <= 0
        assert bytes(entry["bytes"]).decode(errors="replace") == entry["token"]
        assert len(entry["top_logprobs"]) == 2


async def test_sse_framing_byte_for_byte(http: httpx.AsyncClient, stub: chat_pb2_grpc.ChatServiceStub) -> None:
    request = body(max_tokens=3, ignore_eos=True, seed=5, stream=True, stream_options={"include_usage": True})
    r = await http.post("/v1/chat/completions", json=request, headers={"x-request-id": "rest-sse-1"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "rest-sse-1"
    assert r.headers["content-type"] == "text/event-stream; charset=utf-8"
    events = sse_events(r.content)
    assert events[-1] == "[DONE]"
    first = events[0]
    head = {"id": first["id"], "object": "chat.completion.chunk", "created": first["created"], "model": "demo"}
    prompt_tokens = (await stub.CreateChatCompletion(chat(max_tokens=1))).usage.prompt_tokens
    expected_first = {**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                           "logprobs": None, "finish_reason": None}], "usage": None}
    expected_usage = {**head, "choices": [], "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 3,
                                                       "total_tokens": prompt_tokens + 3}}
    middle = events[1:-2]
    assert middle, "content chunks between the role chunk and the usage chunk"
    for chunk in middle:
        assert list(chunk) == ["id", "object", "created", "model", "choices", "usage"] and chunk["usage"] is None
        assert {k: chunk[k] for k in head} == head
        [choice] = chunk["choices"]
        assert list(choice) == ["index", "delta", "logprobs", "finish_reason"]
        assert list(choice["delta"]) == ["content"] or (choice["delta"] == {} and choice["finish_reason"]), choice
    assert [c["choices"][0]["finish_reason"] for c in middle] == [None] * (len(middle) - 1) + ["length"]
    expected = (b"data: " + compact(expected_first) + b"\n\n"
                + b"".join(b"data: " + compact(c) + b"\n\n" for c in middle)
                + b"data: " + compact(expected_usage) + b"\n\ndata: [DONE]\n\n")
    assert r.content == expected
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in middle)
    grpc_reply = await stub.CreateChatCompletion(chat(max_tokens=3, ignore_eos=True, seed=5))
    assert text == grpc_reply.choices[0].message.content


async def test_stream_without_include_usage_has_no_usage_key(http: httpx.AsyncClient) -> None:
    r = await http.post("/v1/chat/completions", json=body(max_tokens=2, stream=True))
    events = sse_events(r.content)
    assert events[-1] == "[DONE]" and all("usage" not in e for e in events[:-1])


async def test_openai_unions_are_normalised(http: httpx.AsyncClient) -> None:
    greedy = body(max_tokens=24, ignore_eos=True, temperature=0)
    text = (await http.post("/v1/chat/completions", json=greedy)).json()["choices"][0]["message"]["content"]
    cut = text[len(text) // 2:len(text) // 2 + 2]
    for stop in (cut, [cut]):
        reply = (await http.post("/v1/chat/completions", json={**greedy, "stop": stop})).json()
        assert reply["choices"][0]["message"]["content"] == text[:text.index(cut)]
        assert reply["choices"][0]["finish_reason"] == "stop"
    reply = (await http.post("/v1/chat/completions", json=body(max_completion_tokens=3, ignore_eos=True))).json()
    assert reply["usage"]["completion_tokens"] == 3 and reply["choices"][0]["finish_reason"] == "length"
    r = await http.post("/v1/chat/completions", json=body(max_completion_tokens=3, max_tokens=4))
    assert_error(r, 400, "invalid_request_error", "invalid_argument", "max_completion_tokens")
    parts = {"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]}
    joined = {"role": "user", "content": "Hello\nthere"}
    usages = [(await http.post("/v1/chat/completions", json=body(messages=[m], max_tokens=1))).json()["usage"]
              for m in (parts, joined)]
    assert usages[0]["prompt_tokens"] == usages[1]["prompt_tokens"]
    r = await http.post("/v1/chat/completions", json=body(tool_choice="required"))
    assert "'required' needs at least one tool" in assert_error(r, 400, "invalid_request_error", "invalid_argument",
                                                                "tool_choice")["message"]
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    r = await http.post("/v1/chat/completions", json=body(tools=[tool], tool_choice={
        "type": "function", "function": {"name": "get_time"}}))
    assert "get_weather" in assert_error(r, 400, "invalid_request_error", "invalid_argument",
                                         "tool_choice.function.name")["message"]
    nulls = body(temperature=None, stop=None, seed=None, stream=None, max_tokens=2,
                 messages=[{"role": "user", "content": "hi", "name": None}])
    assert (await http.post("/v1/chat/completions", json=nulls)).status_code == 200


async def test_bad_requests_are_400_naming_the_fields(http: httpx.AsyncClient) -> None:
    r = await http.post("/v1/chat/completions", json=body(foo=1, messages=[{"rol": "user", "content": "x"}]))
    error = assert_error(r, 400, "invalid_request_error", "invalid_argument", "messages[0].rol")
    assert "foo: unknown field" in error["message"]
    r = await http.post("/v1/chat/completions", json=body(maxTokens=3))
    assert_error(r, 400, "invalid_request_error", "invalid_argument", "maxTokens")
    r = await http.post("/v1/chat/completions", json=body(temperature=5, top_logprobs=3,
                                                          messages=[*USER, {"role": "wizard", "content": "x"}]))
    error = assert_error(r, 400, "invalid_request_error", "invalid_argument", "messages[1].role")
    assert all(f"{f}: " in error["message"] for f in ("temperature", "top_logprobs"))
    r = await http.post("/v1/chat/completions", json=body(temperature="hot", stop=[1]))
    error = assert_error(r, 400, "invalid_request_error", "invalid_argument", "temperature")
    assert "stop[0]: must be a string" in error["message"]
    r = await http.post("/v1/chat/completions", json=body(max_tokens=1.5))
    assert_error(r, 400, "invalid_request_error", "invalid_argument", "max_tokens")
    r = await http.post("/v1/chat/completions", json=body(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://127.0.0.1/x.png"}}]}]))
    assert_error(r, 400, "invalid_request_error", "invalid_argument", "messages[0].content[0].type")
    r = await http.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert_error(r, 400, "invalid_request_error", "invalid_argument", "body")
    r = await http.post("/v1/chat/completions", json=body(stream="yes"))
    assert_error(r, 400, "invalid_request_error", "invalid_argument", "stream")
    r = await http.post("/v1/chat/completions", json=body(stream=True, max_tokens=100_000))
    assert "2048" in assert_error(r, 400, "invalid_request_error", "invalid_argument", "max_tokens")["message"]


async def test_unknown_model_is_404(http: httpx.AsyncClient) -> None:
    r = await http.post("/v1/chat/completions", json=body(model="gpt-9"))
    assert "demo" in assert_error(r, 404, "not_found_error", "not_found", None)["message"]
    assert_error(await http.get("/v1/models/gpt-9"), 404, "not_found_error", "not_found", None)


async def test_not_ready_and_draining_are_503(server: Any, http: httpx.AsyncClient) -> None:
    assert (await http.get("/health/ready")).json() == {"status": "serving"}
    for phase in (Phase.LOADING, Phase.DRAINING):
        server.admission.phase = phase
        try:
            ready = await http.get("/health/ready")
            r = await http.post("/v1/chat/completions", json=body(max_tokens=1))
            live = await http.get("/health/live")
        finally:
            server.admission.phase = Phase.SERVING
        assert ready.status_code == 503 and ready.json() == {"status": phase.value}
        assert_error(r, 503, "service_unavailable_error", "unavailable", None)
        assert live.status_code == 200


async def test_deadline_is_504_before_the_stream_and_an_event_after(server: Any, http: httpx.AsyncClient) -> None:
    engine = server.registry.get("demo").engine
    started = time.monotonic()
    r = await http.post("/v1/chat/completions", json=body(max_tokens=1800, ignore_eos=True),
                        headers={"x-request-timeout": "0.5"})
    assert_error(r, 504, "timeout_error", "deadline_exceeded", None)
    assert time.monotonic() - started < 3
    r = await http.post("/v1/chat/completions", json=body(max_tokens=1800, ignore_eos=True, stream=True),
                        headers={"x-request-timeout": "2"})
    assert r.status_code == 200
    events = sse_events(r.content)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert events[-1] == "[DONE]"
    error = events[-2]["error"]
    assert (error["type"], error["code"]) == ("timeout_error", "deadline_exceeded")
    assert await wait_until(lambda: engine.stats().running == 0 and engine.stats().kv_blocks_used == 0, 5)
    r = await http.post("/v1/chat/completions", json=body(), headers={"x-request-timeout": "soon"})
    assert_error(r, 400, "invalid_request_error", "invalid_argument", "x-request-timeout")


async def test_client_disconnect_mid_stream_aborts_the_generation(server: Any, http: httpx.AsyncClient) -> None:
    engine = server.registry.get("demo").engine
    request = body(max_tokens=1500, ignore_eos=True, stream=True)
    async with http.stream("POST", "/v1/chat/completions", json=request) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                break
        assert engine.stats().running >= 1
    assert await wait_until(lambda: engine.stats().running == 0 and engine.stats().kv_blocks_used == 0, 5)
    assert server.admission.in_flight == 0


async def test_client_gone_during_unary_aborts_the_generation(server: Any, http: httpx.AsyncClient) -> None:
    engine = server.registry.get("demo").engine
    call = asyncio.create_task(http.post("/v1/chat/completions", json=body(max_tokens=1500, ignore_eos=True)))
    assert await wait_until(lambda: engine.stats().running >= 1, 10)
    call.cancel()
    assert await wait_until(lambda: engine.stats().running == 0 and engine.stats().kv_blocks_used == 0, 5)
    assert server.admission.in_flight == 0


async def test_models_list_and_get(http: httpx.AsyncClient) -> None:
    listed = (await http.get("/v1/models")).json()
    assert listed["object"] == "list" and [m["id"] for m in listed["data"]] == ["demo"]
    one = (await http.get("/v1/models/demo")).json()
    assert one == listed["data"][0]
    assert {k: one[k] for k in ("object", "owned_by", "context_length", "backend", "tool_format")} == {
        "object": "model", "owned_by": "llmserve", "context_length": 2048, "backend": "reference",
        "tool_format": "llama-3.1-json"}
    assert one["profile"]["gpu_architecture"] == "cpu" and isinstance(one["created"], int)
    assert one["structured_output"]["closes_within_max_tokens"] is True and "regex" in one["structured_output"]["forms"]


async def test_dataoorts_wrapper(http: httpx.AsyncClient, stub: chat_pb2_grpc.ChatServiceStub) -> None:
    r = await http.post("/api/v1", json={"model": "demo", "data": {"messages": USER, "max_tokens": 5, "seed": 9,
                                                                    "top_k": 40, "ignore_eos": True}})
    reply = r.json()
    grpc_reply = await stub.CreateChatCompletion(chat(max_tokens=5, seed=9, top_k=40, ignore_eos=True))
    assert reply == {"errors": [], "messages": [], "success": True, "result": {
        "response": grpc_reply.choices[0].message.content,
        "usage": {"prompt_tokens": grpc_reply.usage.prompt_tokens, "completion_tokens": 5,
                  "total_tokens": grpc_reply.usage.total_tokens}}}
    r = await http.post("/api/v1", json={"model": "demo", "data": {"messages": USER, "temperature": 9}})
    assert r.status_code == 400
    reply = r.json()
    assert reply["success"] is False and reply["result"] is None and reply["messages"] == []
    assert [(e["code"], e["param"]) for e in reply["errors"]] == [(400, "temperature")]
    r = await http.post("/api/v1", json={"model": "demo", "data": {"messages": USER, "stream": True}})
    assert r.status_code == 400 and r.json()["errors"][0]["param"] == "data.stream"


async def test_metrics_count_rest_requests(http: httpx.AsyncClient) -> None:
    def generated() -> float:
        return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                   if s.name == "vllm:generation_tokens_total" and s.labels.get("model_name") == "demo")

    text = (await http.get("/metrics")).text
    before = generated()
    await http.post("/v1/chat/completions", json=body(max_tokens=4, ignore_eos=True))
    text = (await http.get("/metrics")).text
    assert generated() == before + 4
