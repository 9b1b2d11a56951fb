"""Large legal requests, impossible ones and rollouts: nobody else's stream stalls, nothing waits forever, and a
drain ends every call with an answer its client can read."""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
import time
from typing import Any

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.config import EngineConfig
from service.gen.llmserve.v1 import chat_pb2, chat_pb2_grpc
from tests.helpers import assert_error, body, chat, running_server, server_config

MEGA = 1_000_000  # characters: the default --max-content-chars, so legal
# Seconds: the largest gap tolerated in an unrelated stream (before the fix: 4 to 6 s), or a few times the largest
# gap the same stream shows without the large requests when the machine is loaded by more than this test.
STALL_BOUND = 0.5
BASELINE = 2.0  # seconds of the stream watched alone first


async def test_more_choices_than_max_running_are_refused_at_once(engines_dir) -> None:
    """n: 3 on an engine that decodes 2 sequences could never be admitted: refused naming n and the limit, and the
    requests behind it run."""
    engine = EngineConfig(max_running=2, max_queue=8, max_cache_tokens=4096)
    async with running_server(server_config(engines_dir, engine=engine, http_port=0)) as srv, \
            grpc.aio.insecure_channel(f"127.0.0.1:{srv.grpc_port}") as ch:
        stub = chat_pb2_grpc.ChatServiceStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.CreateChatCompletion(chat(n=3, max_tokens=4), timeout=20)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
        assert "n: 3 choices" in e.value.details() and "at most 2" in e.value.details()
        reply = await stub.CreateChatCompletion(chat(n=2, max_tokens=4, ignore_eos=True), timeout=20)
        assert [c.finish_reason for c in reply.choices] == [chat_pb2.FINISH_REASON_LENGTH] * 2


async def test_large_requests_do_not_stall_other_streams(engines_dir) -> None:
    """Three 1M-character Tokenize calls, three chats with 1M-character content and a REST body of 800,000 stop
    strings, all at once: an unrelated stream keeps flowing and health checks keep answering."""
    async with running_server(server_config(engines_dir)) as srv, \
            grpc.aio.insecure_channel(f"127.0.0.1:{srv.grpc_port}",
                                      options=[("grpc.max_send_message_length", 8 << 20)]) as ch, \
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{srv.config.server.http_port}", timeout=120) as http:
        stub = chat_pb2_grpc.ChatServiceStub(ch)
        health = health_pb2_grpc.HealthStub(ch)
        text = "lorem ipsum dolor sit amet " * (MEGA // 27)
        stream = stub.StreamChatCompletion(chat(max_tokens=1900, ignore_eos=True))
        await stream.read()
        arrivals: list[float] = []
        probes: list[float] = []
        done = asyncio.Event()

        async def read_stream() -> None:
            while not done.is_set() and (await stream.read()) is not grpc.aio.EOF:
                arrivals.append(time.monotonic())

        async def probe_health() -> None:
            while not done.is_set():
                started = time.monotonic()
                await health.Check(health_pb2.HealthCheckRequest(), timeout=30)
                probes.append(time.monotonic() - started)
                await asyncio.sleep(0.05)

        async def large() -> list[Any]:
            tokenize = [stub.Tokenize(chat_pb2.TokenizeRequest(model="demo", text=text)) for _ in range(3)]
            chats = [stub.CreateChatCompletion(chat(text, max_tokens=1)) for _ in range(3)]
            rest = http.post("/v1/chat/completions", content=json.dumps(body(stop=["x"] * 800_000)),
                             headers={"content-type": "application/json"})
            return await asyncio.gather(*tokenize, *chats, rest, return_exceptions=True)

        readers = [asyncio.create_task(read_stream()), asyncio.create_task(probe_health())]
        await asyncio.sleep(BASELINE)
        alone = [b - a for a, b in itertools.pairwise(arrivals)]
        bound = max(STALL_BOUND, 3 * max(alone), 3 * max(probes))
        started = time.monotonic()
        results = await large()
        finished = time.monotonic()
        done.set()
        stream.cancel()
        await asyncio.gather(*readers, return_exceptions=True)

        assert all(r.count > 100_000 for r in results[:3]), results[:3]
        assert all(isinstance(r, grpc.aio.AioRpcError) and r.code() == grpc.StatusCode.INVALID_ARGUMENT
                   for r in results[3:6]), results[3:6]   # far past the demo model's context
        assert_error(results[6], 400, "invalid_request_error", "invalid_argument", "stop")
        during = [b - a for a, b in itertools.pairwise(arrivals) if b > started and a < finished]
        assert during, "the stream produced nothing while the large requests were served"
        assert max(during) < bound, f"an unrelated stream stalled {max(during):.2f} s (alone: at most " \
                                    f"{max(alone):.2f} s; large requests took {finished - started:.1f} s)"
        assert max(probes) < bound, f"a health check took {max(probes):.2f} s"


async def test_rest_calls_cut_at_the_grace_period_end_with_an_error_each(server_process: Any) -> None:
    """When the grace period runs out a stream ends with an error event and [DONE], a unary call gets 503 in
    OpenAI's shape, and the log has no traceback."""
    proc = server_process("--grace-period", "1")
    await proc.wait_serving()
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{proc.http_port}", timeout=60) as client:
        long = body(max_tokens=1900, ignore_eos=True)
        unary = asyncio.create_task(client.post("/v1/chat/completions", json=long))
        async with client.stream("POST", "/v1/chat/completions", json={**long, "stream": True}) as r:
            lines = r.aiter_lines()
            assert (await anext(lines)).startswith("data: ")
            proc.proc.send_signal(signal.SIGTERM)
            rest = [line async for line in lines if line]
        assert rest[-1] == "data: [DONE]", rest[-3:]
        error = json.loads(rest[-2].removeprefix("data: "))["error"]
        assert (error["type"], error["code"]) == ("service_unavailable_error", "unavailable"), error
        assert all(json.loads(line.removeprefix("data: "))["choices"] for line in rest[:-2])
        assert_error(await unary, 503, "service_unavailable_error", "unavailable", None)
    assert await asyncio.to_thread(proc.proc.wait, 30) == 0
    log = proc.proc.stdout.read()
    assert "Traceback" not in log and '"level": "error"' not in log, log[-3000:]


async def test_sigterm_refuses_queued_requests_at_once(server_process: Any) -> None:
    """A request still queued in the engine at SIGTERM is refused then (UNAVAILABLE, 503), on both doors, rather
    than held for the grace period only to be cut; the running one finishes."""
    proc = server_process("--grace-period", "60", "--max-running", "1")
    await proc.wait_serving()
    async with grpc.aio.insecure_channel(proc.address) as ch, \
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{proc.http_port}", timeout=90) as client:
        stub = chat_pb2_grpc.ChatServiceStub(ch)
        running = stub.StreamChatCompletion(chat(max_tokens=600, ignore_eos=True))
        await running.read()
        queued_grpc = stub.StreamChatCompletion(chat(max_tokens=8))
        queued_rest = asyncio.create_task(client.post("/v1/chat/completions", json=body(max_tokens=8)))
        await asyncio.sleep(0.5)
        proc.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as e:
            async for _ in queued_grpc:
                pass
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "had not started" in e.value.details()
        assert_error(await queued_rest, 503, "service_unavailable_error", "unavailable", None)
        assert time.monotonic() - signalled < 10, "queued requests were held instead of refused at once"
        last = None
        while (chunk := await running.read()) is not grpc.aio.EOF:
            last = chunk
        assert last is not None and last.choices[0].finish_reason == chat_pb2.FINISH_REASON_LENGTH
    assert await asyncio.to_thread(proc.proc.wait, 60) == 0
