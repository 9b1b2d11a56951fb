"""The gRPC service through a real grpc.aio client on loopback."""

from __future__ import annotations

import asyncio
import signal
import sys
import time

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from service.config import EngineConfig
from service.gen.llmserve.v1 import chat_pb2, chat_pb2_grpc
from tests.helpers import chat, field_violations, free_port, running_server, server_config, wait_until

FR = chat_pb2.FinishReason


async def collect(stream: grpc.aio.UnaryStreamCall) -> list[chat_pb2.ChatCompletionChunk]:
    return [chunk async for chunk in stream]


def streamed_texts(chunks: list[chat_pb2.ChatCompletionChunk], n: int) -> list[str]:
    texts = [""] * n
    for chunk in chunks:
        for c in chunk.choices:
            texts[c.index] += c.delta.content
    return texts


async def test_unary_returns_n_choices_with_usage(stub: chat_pb2_grpc.ChatServiceStub) -> None:
    reply = await stub.CreateChatCompletion(chat(n=4, max_tokens=8, ignore_eos=True, seed=7))
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-") and reply.model == "demo"
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    assert all(c.finish_reason == FR.FINISH_REASON_LENGTH and c.message.role == "assistant" for c in reply.choices)
    assert reply.usage.completion_tokens == 32
    tokens = await stub.Tokenize(chat_pb2.TokenizeRequest(model="demo", messages=chat().messages))
    assert reply.usage.prompt_tokens == tokens.count > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 32
    assert len({c.message.content for c in reply.choices}) > 1, "seeded choices must differ from each other"


async def test_stream_text_equals_unary_text_for_the_same_seed(stub: chat_pb2_grpc.ChatServiceStub) -> None:
    req = chat("Tell me a story", n=2, max_tokens=24, seed=1234, ignore_eos=True,
               stream_options=chat_pb2.StreamOptions(include_usage=True))
    unary = await stub.CreateChatCompletion(req)
    chunks = await collect(stub.StreamChatCompletion(req))
    first = chunks[0]
    assert {c.index for c in first.choices} == {0, 1}
    assert all(c.delta.role == "assistant" for c in first.choices)
    assert len({c.id for c in chunks}) == 1 and all(c.object == "chat.completion.chunk" for c in chunks)
    assert streamed_texts(chunks, 2) == [c.message.content for c in unary.choices]
    finishes = [(c.index, c.finish_reason) for ch in chunks for c in ch.choices if c.finish_reason]
    assert sorted(finishes) == [(0, FR.FINISH_REASON_LENGTH), (1, FR.FINISH_REASON_LENGTH)]
    assert not chunks[-1].choices and chunks[-1].usage.completion_tokens == 48
    assert chunks[-1].usage.prompt_tokens == unary.usage.prompt_tokens


async def test_usage_chunk_only_when_asked(stub: chat_pb2_grpc.ChatServiceStub) -> None:
    chunks = await collect(stub.StreamChatCompletion(chat(max_tokens=4)))
    assert not any(c.HasField("usage") for c in chunks)


async def test_32_concurrent_streams_complete_with_correct_usage(stub: chat_pb2_grpc.ChatServiceStub) -> None:
    async def one(i: int) -> chat_pb2.ChatCompletionChunk:
        req = chat(f"Request number {i}", max_tokens=16 + i % 5, ignore_eos=True, seed=i,
                   stream_options=chat_pb2.StreamOptions(include_usage=True))
        return (await collect(stub.StreamChatCompletion(req)))[-1]

    lasts = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(32))), timeout=120)
    assert [last.usage.completion_tokens for last in lasts] == [16 + i % 5 for i in range(32)]


async def test_cancel_mid_stream_frees_the_engine(server: object, stub: chat_pb2_grpc.ChatServiceStub) -> None:
    engine = server.registry.get("demo").engine  # type: ignore[attr-defined]
    call = stub.StreamChatCompletion(chat(max_tokens=1500, ignore_eos=True))
    async for chunk in call:
        if any(c.delta.content for c in chunk.choices):
            break
    assert engine.stats().running >= 1
    call.cancel()
    assert await wait_until(lambda: engine.stats().running == 0 and engine.stats().kv_blocks_used == 0, 5)


async def test_deadline_ends_generation_and_frees_kv(server: object, stub: chat_pb2_grpc.ChatServiceStub) -> None:
    engine = server.registry.get("demo").engine  # type: ignore[attr-defined]
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.CreateChatCompletion(chat(max_tokens=1800, ignore_eos=True), timeout=0.5)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 2
    assert await wait_until(lambda: engine.stats().running == 0 and engine.stats().kv_blocks_used == 0, 5)


async def test_invalid_argument_names_every_field(stub: chat_pb2_grpc.ChatServiceStub) -> None:
    req = chat(temperature=5, top_logprobs=3)
    req.messages.add(role="wizard", content="x")
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.CreateChatCompletion(req)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert sorted(field_violations(e.value)) == ["messages[1].role", "temperature", "top_logprobs"]
    assert "temperature" in e.value.details()


async def test_unknown_model_is_not_found_and_names_the_models(stub: chat_pb2_grpc.ChatServiceStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.CreateChatCompletion(chat(model="gpt-9"))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and "demo" in e.value.details()


async def test_context_length_is_enforced_with_both_numbers(stub: chat_pb2_grpc.ChatServiceStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.CreateChatCompletion(chat(max_tokens=100_000))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(e.value) == ["max_tokens"]
    assert "100000" in e.value.details() and "2048" in e.value.details()


async def test_clamp_max_tokens(engines_dir) -> None:
    async with running_server(server_config(engines_dir, clamp_max_tokens=True)) as srv, \
            grpc.aio.insecure_channel(f"127.0.0.1:{srv.grpc_port}") as ch:
        reply = await chat_pb2_grpc.ChatServiceStub(ch).CreateChatCompletion(
            chat(max_tokens=100_000, stop=["e"]), timeout=60)
        assert reply.choices[0].finish_reason in (FR.FINISH_REASON_STOP, FR.FINISH_REASON_LENGTH)


async def test_list_models_and_tokenize(stub: chat_pb2_grpc.ChatServiceStub) -> None:
    models = await stub.ListModels(chat_pb2.ListModelsRequest())
    assert [m.id for m in models.data] == ["demo"]
    demo = models.data[0]
    assert (demo.backend, demo.context_length, demo.owned_by, demo.tool_format) == (
        "reference", 2048, "llmserve", "llama-3.1-json")
    assert demo.profile.gpu_architecture == "cpu" and demo.profile.id
    assert set(demo.structured_output.forms) == {"json_object", "json_schema", "tools", "regex", "choice", "grammar"}
    assert demo.structured_output.closes_within_max_tokens
    text = await stub.Tokenize(chat_pb2.TokenizeRequest(model="demo", text="hello world"))
    assert text.count == len(text.tokens) > 0 and text.max_model_len == 2048
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.Tokenize(chat_pb2.TokenizeRequest(model="demo"))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_request_id_is_echoed_or_generated(stub: chat_pb2_grpc.ChatServiceStub) -> None:
    call = stub.CreateChatCompletion(chat(max_tokens=1), metadata=(("x-request-id", "abc-123"),))
    await call
    assert dict(await call.initial_metadata())["x-request-id"] == "abc-123"
    call = stub.CreateChatCompletion(chat(max_tokens=1))
    await call
    assert len(dict(await call.initial_metadata())["x-request-id"]) >= 16


async def test_health_and_metrics(server: object, channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "llmserve.v1.ChatService"):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    await chat_pb2_grpc.ChatServiceStub(channel).CreateChatCompletion(chat(max_tokens=2))
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"http://127.0.0.1:{server.config.server.http_port}/metrics")).text  # type: ignore[attr-defined]
    samples = {(s.name, s.labels.get("model_name")): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    for name in ("vllm:time_to_first_token_seconds_count", "vllm:e2e_request_latency_seconds_count",
                 "vllm:inter_token_latency_seconds_count", "vllm:request_queue_time_seconds_count",
                 "vllm:generation_tokens_total", "vllm:prompt_tokens_total"):
        assert samples[(name, "demo")] > 0, name
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
        assert (name, "demo") in samples, name
    assert any(n == "vllm:request_success_total" and v > 0 for (n, _), v in samples.items())


async def test_health_is_not_serving_while_loading(engines_dir) -> None:
    from service.server import LlmServer

    srv = LlmServer(server_config(engines_dir))
    starting = asyncio.create_task(srv.start())
    async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.grpc_port}") as ch:
        health = health_pb2_grpc.HealthStub(ch)
        watch = health.Watch(health_pb2.HealthCheckRequest(service="llmserve.v1.ChatService"))
        statuses = []
        async for reply in watch:
            statuses.append(reply.status)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                break
        watch.cancel()
    await starting
    await srv.shutdown()
    assert statuses[0] == health_pb2.HealthCheckResponse.NOT_SERVING
    assert statuses[-1] == health_pb2.HealthCheckResponse.SERVING


async def test_overload_gets_resource_exhausted_while_admitted_finish(engines_dir) -> None:
    engine = EngineConfig(max_running=2, max_queue=2, max_cache_tokens=4096)
    async with running_server(server_config(engines_dir, engine=engine)) as srv, \
            grpc.aio.insecure_channel(f"127.0.0.1:{srv.grpc_port}") as ch:
        stub = chat_pb2_grpc.ChatServiceStub(ch)

        async def one(i: int) -> object:
            started = time.monotonic()
            try:
                reply = await stub.CreateChatCompletion(chat(max_tokens=32, ignore_eos=True, seed=i), timeout=60)
                return reply.usage.completion_tokens
            except grpc.aio.AioRpcError as e:
                return e.code(), time.monotonic() - started

        results = await asyncio.gather(*(one(i) for i in range(16)))
    done = [r for r in results if r == 32]
    refused = [r for r in results if isinstance(r, tuple)]
    assert len(done) + len(refused) == 16 and len(done) >= 4 and len(refused) >= 1
    assert all(code == grpc.StatusCode.RESOURCE_EXHAUSTED and seconds < 1.0 for code, seconds in refused)


async def test_api_keys(engines_dir) -> None:
    async with running_server(server_config(engines_dir, api_key=["k1", "k2"])) as srv, \
            grpc.aio.insecure_channel(f"127.0.0.1:{srv.grpc_port}") as ch:
        stub = chat_pb2_grpc.ChatServiceStub(ch)
        for metadata in [(), (("authorization", "Bearer nope"),), (("authorization", "k1"),)]:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.ListModels(chat_pb2.ListModelsRequest(), metadata=metadata)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        reply = await stub.ListModels(chat_pb2.ListModelsRequest(), metadata=(("authorization", "Bearer k2"),))
        assert reply.data[0].id == "demo"
        health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING


async def list_services(ch: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...] = ()) -> list[str]:
    requests = iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    replies = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(requests, metadata=metadata)
    return [s.name async for reply in replies for s in reply.list_services_response.service]


async def test_with_keys_reflection_needs_a_key_unless_opened(engines_dir) -> None:
    """Reflection hands out the whole API map: behind the keys like the API, unless --open-reflection."""
    async with running_server(server_config(engines_dir, api_key=["k1"], http_port=0)) as srv, \
            grpc.aio.insecure_channel(f"127.0.0.1:{srv.grpc_port}") as ch:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await list_services(ch)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "llmserve.v1.ChatService" in await list_services(ch, (("authorization", "Bearer k1"),))
        health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    async with running_server(server_config(engines_dir, api_key=["k1"], open_reflection=True, http_port=0)) as srv, \
            grpc.aio.insecure_channel(f"127.0.0.1:{srv.grpc_port}") as ch:
        assert "llmserve.v1.ChatService" in await list_services(ch)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await chat_pb2_grpc.ChatServiceStub(ch).ListModels(chat_pb2.ListModelsRequest())
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_the_key_is_checked_before_the_body_is_decoded(engines_dir) -> None:
    """A caller without a key learns nothing from how its body would be judged: bytes that are no request get
    UNAUTHENTICATED, not INVALID_ARGUMENT; with the key, the same bytes get INVALID_ARGUMENT."""
    async with running_server(server_config(engines_dir, api_key=["k1"], http_port=0)) as srv, \
            grpc.aio.insecure_channel(f"127.0.0.1:{srv.grpc_port}") as ch:
        for method in ("CreateChatCompletion", "Tokenize"):
            raw = ch.unary_unary(f"/llmserve.v1.ChatService/{method}")  # no serializers: bytes as they are
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await raw(b"\xff\xff\xff\xff", metadata=(("authorization", "Bearer wrong"),))
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, method
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await raw(b"\xff\xff\xff\xff", metadata=(("authorization", "Bearer k1"),))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, method
        raw_stream = ch.unary_stream("/llmserve.v1.ChatService/StreamChatCompletion")
        with pytest.raises(grpc.aio.AioRpcError) as e:
            async for _ in raw_stream(b"\xff\xff\xff\xff"):
                pass
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_oversized_request_is_refused_clearly(engines_dir) -> None:
    async with running_server(server_config(engines_dir, max_message_bytes=10_000)) as srv, \
            grpc.aio.insecure_channel(f"127.0.0.1:{srv.grpc_port}") as ch:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await chat_pb2_grpc.ChatServiceStub(ch).CreateChatCompletion(chat("x" * 20_000))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in e.value.details()


async def test_sigterm_drains_streams_and_exits_zero(server_process) -> None:
    proc = server_process("--grace-period", "30")
    await proc.wait_serving()
    async with grpc.aio.insecure_channel(proc.address) as ch:
        stub = chat_pb2_grpc.ChatServiceStub(ch)
        calls = [stub.StreamChatCompletion(chat(f"s{i}", max_tokens=64, ignore_eos=True, seed=i,
                                                stream_options=chat_pb2.StreamOptions(include_usage=True)))
                 for i in range(24)]
        firsts = [await call.read() for call in calls]  # every stream is running before the signal
        assert all(f.choices for f in firsts)
        proc.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.CreateChatCompletion(chat(max_tokens=1), timeout=5)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        lasts = []
        for call in calls:
            chunks = []
            while (chunk := await call.read()) is not grpc.aio.EOF:
                chunks.append(chunk)
            lasts.append(chunks[-1])
    assert [last.usage.completion_tokens for last in lasts] == [64] * 24
    assert await asyncio.to_thread(proc.proc.wait, 30) == 0


async def test_healthcheck_command(server: object) -> None:
    address = f"127.0.0.1:{server.grpc_port}"  # type: ignore[attr-defined]
    ok = await asyncio.create_subprocess_exec(sys.executable, "-m", "service", "healthcheck", "--address", address,
                                              stdout=asyncio.subprocess.PIPE)
    assert (await ok.communicate())[0].decode().strip() == "SERVING" and ok.returncode == 0
    gone = await asyncio.create_subprocess_exec(sys.executable, "-m", "service", "healthcheck", "--address",
                                                f"127.0.0.1:{free_port()}", "--timeout", "0.5",
                                                stdout=asyncio.subprocess.PIPE)
    assert (await gone.communicate())[0].decode().strip() == "UNAVAILABLE" and gone.returncode == 1
