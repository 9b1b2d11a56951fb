"""Faults, cancel storms, overload and slow consumers: every admitted request ends with an answer or an explicit
status, no KV stays held, and the server stays healthy (or says it is not)."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from typing import Any

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.faults import inject
from service.backends.base import EngineError
from service.config import EngineConfig
from service.gen.llmserve.v1 import chat_pb2, chat_pb2_grpc
from tests.helpers import chat, running_server, server_config, wait_until


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def engine_of(server: Any) -> Any:
    return server.registry.get("demo").engine


def idle(server: Any) -> Callable[[], bool]:
    def check() -> bool:
        stats = engine_of(server).stats()
        return stats.running == 0 and stats.waiting == 0 and stats.kv_blocks_used == 0
    return check


async def drain(call: grpc.aio.UnaryStreamCall) -> list[chat_pb2.ChatCompletionChunk] | grpc.StatusCode:
    chunks = []
    try:
        while (chunk := await call.read()) is not grpc.aio.EOF:
            chunks.append(chunk)
    except grpc.aio.AioRpcError as e:
        return e.code()
    return chunks


def one_shot(error: Exception) -> Callable[[set[str]], None]:
    """A fault for bench.faults.inject: the next step raises `error`, later steps run."""
    fired: list[set[str]] = []

    def hook(request_ids: set[str]) -> None:
        if not fired:
            fired.append(request_ids)
            raise error
    return hook


async def test_a_failing_step_fails_its_streams_with_internal_while_queued_ones_finish(engines_dir) -> None:
    engine = EngineConfig(max_running=2, max_queue=8, max_cache_tokens=8192, engine_process=False)  # hooks in
    async with running_server(server_config(engines_dir, engine=engine)) as srv, \
            grpc.aio.insecure_channel(f"127.0.0.1:{srv.grpc_port}") as ch:
        stub = chat_pb2_grpc.ChatServiceStub(ch)
        running = [stub.StreamChatCompletion(chat(f"r{i}", max_tokens=1500, ignore_eos=True, seed=i))
                   for i in range(2)]
        for call in running:
            await call.read()
        queued = [stub.StreamChatCompletion(chat(f"q{i}", max_tokens=32, ignore_eos=True, seed=i,
                                                 stream_options=chat_pb2.StreamOptions(include_usage=True)))
                  for i in range(2)]
        assert await wait_until(lambda: engine_of(srv).stats().waiting == 2)
        inject(engine_of(srv).core, one_shot(RuntimeError("injected test fault")))
        outcomes = await asyncio.gather(*(drain(c) for c in running + queued))
        assert outcomes[:2] == [grpc.StatusCode.INTERNAL] * 2
        for done in outcomes[2:]:
            assert isinstance(done, list) and done[-1].usage.completion_tokens == 32
        assert (await running[0].details()).startswith("engine failure: engine step failed: RuntimeError")
        assert await wait_until(idle(srv))
        health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        reply = await stub.CreateChatCompletion(chat(max_tokens=4, ignore_eos=True), timeout=30)
        assert reply.usage.completion_tokens == 4


async def test_a_fatal_engine_error_flips_health_to_not_serving(engines_dir) -> None:
    engine = EngineConfig(max_running=32, max_queue=64, max_cache_tokens=16384, engine_process=False)  # hooks in
    async with running_server(server_config(engines_dir, engine=engine)) as srv, \
            grpc.aio.insecure_channel(f"127.0.0.1:{srv.grpc_port}") as ch, \
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{srv.config.server.http_port}") as http:
        stub = chat_pb2_grpc.ChatServiceStub(ch)
        calls = [stub.StreamChatCompletion(chat(f"s{i}", max_tokens=1500, ignore_eos=True)) for i in range(3)]
        for call in calls:
            await call.read()
        inject(engine_of(srv).core, one_shot(EngineError("injected fatal test fault", fatal=True)))
        assert await asyncio.gather(*(drain(c) for c in calls)) == [grpc.StatusCode.INTERNAL] * 3
        health = health_pb2_grpc.HealthStub(ch)

        async def not_serving() -> bool:
            reply = await health.Check(health_pb2.HealthCheckRequest(service="llmserve.v1.ChatService"))
            return reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        deadline = time.monotonic() + 5
        while not await not_serving() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert await not_serving()
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.CreateChatCompletion(chat(max_tokens=1), timeout=5)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "engine has failed" in e.value.details()
        assert (await http.get("/health/ready")).status_code == 503
        refused = await http.post("/v1/chat/completions", json={"model": "demo", "messages": [
            {"role": "user", "content": "hi"}]})
        assert refused.status_code == 503 and "engine has failed" in refused.json()["error"]["message"]


async def test_cancel_storm_leaves_nothing_held(server: Any, stub: chat_pb2_grpc.ChatServiceStub) -> None:
    rng = random.Random(7)
    limit = asyncio.Semaphore(48)  # below the test server's 32 running + 64 queued: cancels, not refusals
    url = f"http://127.0.0.1:{server.config.server.http_port}/v1/chat/completions"
    ended: dict[str, int] = {}

    async def grpc_stream(i: int, chunks_before_cancel: int) -> None:
        async with limit:
            call = stub.StreamChatCompletion(chat(f"storm {i}", max_tokens=200, ignore_eos=True, seed=i))
            try:
                for _ in range(chunks_before_cancel):
                    await call.read()
            finally:
                call.cancel()
            ended["grpc"] = ended.get("grpc", 0) + 1

    async def rest_stream(client: httpx.AsyncClient, i: int, lines_before_close: int) -> None:
        async with limit, client.stream("POST", url, json={
                "model": "demo", "messages": [{"role": "user", "content": f"storm {i}"}], "stream": True,
                "max_tokens": 200, "ignore_eos": True, "seed": i}) as response:
            assert response.status_code == 200
            lines = response.aiter_lines()
            for _ in range(lines_before_close):
                await anext(lines)
        ended["rest"] = ended.get("rest", 0) + 1

    async def wave(count: int) -> None:
        async with httpx.AsyncClient(timeout=30) as client:
            jobs = [grpc_stream(i, rng.randint(0, 12)) if i % 3 else rest_stream(client, i, rng.randint(0, 12))
                    for i in range(count)]
            await asyncio.wait_for(asyncio.gather(*jobs), 120)

    await wave(30)  # warm-up: allocator pools and caches reach their working size
    assert await wait_until(idle(server))
    baseline = rss_bytes()
    await wave(300)
    assert ended["grpc"] + ended["rest"] == 330
    assert await wait_until(idle(server), timeout=5), engine_of(server).stats()
    grown = rss_bytes() - baseline
    assert grown < 64 * 2**20, f"RSS grew {grown / 2**20:.0f} MiB over the storm"
    reply = await stub.CreateChatCompletion(chat(max_tokens=8, ignore_eos=True), timeout=30)
    assert reply.usage.completion_tokens == 8


async def test_overload_burst_is_refused_promptly_and_no_admitted_request_outlives_its_deadline(engines_dir) -> None:
    engine = EngineConfig(max_running=4, max_queue=4, max_cache_tokens=8192)
    async with running_server(server_config(engines_dir, engine=engine)) as srv, \
            grpc.aio.insecure_channel(f"127.0.0.1:{srv.grpc_port}") as ch, \
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{srv.config.server.http_port}", timeout=30) as http:
        stub = chat_pb2_grpc.ChatServiceStub(ch)
        deadline_s = 3.0

        async def over_grpc(i: int) -> tuple[str, float]:
            started = time.monotonic()
            try:
                reply = await stub.CreateChatCompletion(chat(f"b{i}", max_tokens=64 + 8 * i, ignore_eos=True, seed=i),
                                                        timeout=deadline_s)
                outcome = "ok" if reply.usage.completion_tokens == 64 + 8 * i else "short"
            except grpc.aio.AioRpcError as e:
                outcome = e.code().name
            return outcome, time.monotonic() - started

        async def over_rest(i: int) -> tuple[str, float]:
            started = time.monotonic()
            r = await http.post("/v1/chat/completions", json={
                "model": "demo", "messages": [{"role": "user", "content": f"b{i}"}], "max_tokens": 64 + 8 * i,
                "ignore_eos": True, "seed": i}, headers={"x-request-timeout": str(deadline_s)})
            if r.status_code == 200:
                outcome = "ok" if r.json()["usage"]["completion_tokens"] == 64 + 8 * i else "short"
            else:
                outcome = f"http {r.status_code} {r.json()['error']['code']}"
            return outcome, time.monotonic() - started

        results = await asyncio.gather(*(over_grpc(i) for i in range(24)), *(over_rest(i) for i in range(24)))
        outcomes = [o for o, _ in results]
        assert set(outcomes) <= {"ok", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED", "http 429 resource_exhausted",
                                 "http 504 deadline_exceeded"}, outcomes
        assert outcomes.count("ok") >= 8 and outcomes.count("RESOURCE_EXHAUSTED") >= 8
        assert outcomes.count("http 429 resource_exhausted") >= 8
        for outcome, seconds in results:
            if outcome in ("RESOURCE_EXHAUSTED", "http 429 resource_exhausted"):
                assert seconds < 1.0, (outcome, seconds)
            assert seconds < deadline_s + 0.5, (outcome, seconds)
        assert await wait_until(idle(srv))


async def test_a_slow_reader_does_not_slow_the_others(server: Any, stub: chat_pb2_grpc.ChatServiceStub) -> None:
    slow_req = chat("slow", max_tokens=256, ignore_eos=True, seed=11)
    expected = (await stub.CreateChatCompletion(slow_req, timeout=60)).choices[0].message.content
    started = time.monotonic()
    slow = stub.StreamChatCompletion(slow_req)
    first = await slow.read()
    assert first.choices[0].delta.role == "assistant"
    fast = [stub.CreateChatCompletion(chat(f"f{i}", max_tokens=64, ignore_eos=True, seed=i), timeout=60)
            for i in range(8)]
    replies = await asyncio.gather(*fast)
    fast_done = time.monotonic() - started
    assert all(r.usage.completion_tokens == 64 for r in replies)
    # The engine finishes the slow stream's generation while its client has read one chunk: the backlog waits in
    # transport buffers (or coalesced in the server once flow control pushes back), not in a stalled engine slot.
    assert await wait_until(idle(server), timeout=30)
    engine_done = time.monotonic() - started
    text = ""
    while (chunk := await slow.read()) is not grpc.aio.EOF:
        text += "".join(c.delta.content for c in chunk.choices)
        await asyncio.sleep(0.01)
    assert text == expected
    assert fast_done < engine_done + 0.5 < time.monotonic() - started
