"""Two real vLLM workers behind one model: they share the load, a killed one fails over, and the model is
NOT_SERVING once the last one is gone and SERVING again when it returns. The first worker is restarted on its
port before the test ends, so the rest of the session has it back; the second stays down."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.vllm_worker import VllmWorker
from service.gen.llmserve.v1 import chat_pb2_grpc
from tests.helpers import chat, running_server, wait_until, worker_config

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


@asynccontextmanager
async def gateway_for(engines_dir: Path, workers: list[VllmWorker]) -> AsyncIterator[tuple[object, object, object]]:
    config = worker_config(engines_dir, *(f"demo={w.address}" for w in workers), worker_probe_interval=0.2)
    async with running_server(config) as server, \
            grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:  # type: ignore[attr-defined]
        yield server, chat_pb2_grpc.ChatServiceStub(channel), health_pb2_grpc.HealthStub(channel)


async def outcome(call: grpc.aio.UnaryStreamCall) -> str:
    try:
        while await call.read() is not grpc.aio.EOF:
            pass
    except grpc.aio.AioRpcError as e:
        return e.code().name
    return "OK"


async def started(call: grpc.aio.UnaryStreamCall) -> None:
    """Returns once the stream has carried some text (role chunk first, then content)."""
    while not (await call.read()).choices[0].delta.content:
        pass


async def serving(health: object, service: str = "demo") -> int:
    return (await health.Check(health_pb2.HealthCheckRequest(service=service))).status  # type: ignore[attr-defined]


async def restart(*workers: VllmWorker) -> None:
    for worker in workers:
        worker.kill()
        worker.start()
    await asyncio.gather(*(asyncio.to_thread(w.wait_ready) for w in workers))


async def test_workers_share_load_fail_over_and_come_back(engines_dir: Path, vllm_workers: list[VllmWorker]) -> None:
    a, b = vllm_workers
    try:
        async with gateway_for(engines_dir, [a, b]) as (server, stub, health):
            engine = server.registry.get("demo").engine  # type: ignore[attr-defined]
            # Serving starts once one worker answers; on a loaded machine the other's first probe may time out
            # and bring it in a moment later. Sharing is about workers in rotation: wait for both.
            assert await wait_until(lambda: all(w.healthy for w in engine.workers()), timeout=60), engine.workers()
            calls = [stub.StreamChatCompletion(chat(f"Stream {i}", max_tokens=400, ignore_eos=True, seed=i))
                     for i in range(8)]
            await asyncio.wait_for(asyncio.gather(*(started(c) for c in calls)), timeout=120)
            on = {w.address: w.in_flight for w in engine.workers()}
            assert on[a.address] >= 2 and on[b.address] >= 2, on   # shared
            assert await a.requests() >= 2 and await b.requests() >= 2
            b.kill()
            outcomes = await asyncio.wait_for(asyncio.gather(*(outcome(c) for c in calls)), timeout=120)
            assert outcomes.count("UNAVAILABLE") == on[b.address], outcomes   # its streams end UNAVAILABLE
            assert outcomes.count("OK") == on[a.address], outcomes            # the others finish
            replies = await asyncio.gather(*(stub.CreateChatCompletion(chat(f"After {i}", max_tokens=6))
                                             for i in range(6)))
            assert all(r.choices[0].message.content for r in replies)        # failed over to the survivor
            assert await serving(health) == SERVING
            assert not next(w for w in engine.workers() if w.address == b.address).healthy

            call = stub.StreamChatCompletion(chat("Last one", max_tokens=200, ignore_eos=True))
            await started(call)
            a.kill()   # the last worker
            assert await outcome(call) == "UNAVAILABLE"
            assert await wait_until(lambda: not engine.health().ok, timeout=5)
            await asyncio.sleep(0.5)   # the server's health watcher publishes it
            assert await serving(health) == NOT_SERVING
            assert await serving(health, "llmserve.v1.ChatService") == NOT_SERVING
            assert await serving(health, "") == SERVING   # the gateway itself is alive: no restart wanted
            base = f"http://127.0.0.1:{server.config.server.http_port}"  # type: ignore[attr-defined]
            async with httpx.AsyncClient(base_url=base) as http:
                assert (await http.get("/health/ready")).status_code == 503
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.CreateChatCompletion(chat(max_tokens=4))
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE

            await restart(a)
            assert await wait_until(lambda: engine.workers()[0].healthy, timeout=10)
            await asyncio.sleep(0.5)
            assert await serving(health) == SERVING
            assert (await stub.CreateChatCompletion(chat(max_tokens=4))).choices[0].message.content
    finally:
        b.kill()
        if a.proc is None or a.proc.poll() is not None:
            await restart(a)
