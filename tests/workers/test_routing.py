"""Routing across a model's workers, rotation and health: the router on its own, then llmserve in front of two
FakeSglangWorkers (SGLang reports its load through GetLoads, as vLLM does)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from transformers import AutoTokenizer

from service.backends.workers.address import WorkerAddress
from service.backends.workers.protocol import Load
from service.backends.workers.router import Router
from service.backends.workers.worker import BLOCK_TOKENS, Worker, block_hashes
from service.gen.llmserve.v1 import chat_pb2, chat_pb2_grpc
from tests.helpers import chat, running_server, wait_until, worker_config
from tests.workers.fake_workers import FakeSglangWorker

EOS = 4
LONG = "Here is a long document that both requests share, so their prompts share many blocks of tokens. " * 4


# -- the router alone -----------------------------------------------------------------------------------------------


def workers(count: int) -> list[Worker]:
    out = []
    for i in range(count):
        worker = Worker(SimpleNamespace(address=WorkerAddress("vllm", "127.0.0.1", 9000 + i)))  # type: ignore

        worker.healthy = True
        out.append(worker)
    return out


def prompt(prefix: int, length: int = 8 * BLOCK_TOKENS) -> list[int]:
    return [prefix] * (length // 2) + list(range(length // 2))


def test_equal_workers_take_turns() -> None:
    pool = workers(3)
    router = Router(pool, slack=4)
    picked = [router.pick(block_hashes(prompt(i))) for i in range(6)]
    assert {w.name for w in picked} == {w.name for w in pool}


def test_a_shared_prefix_stays_on_its_worker_unless_it_is_much_busier() -> None:
    a, b = workers(2)
    router = Router([a, b], slack=4)
    first = router.pick(block_hashes(prompt(7)))
    other = b if first is a else a
    first.in_flight = 3    # busier, within the slack: the cached prefix wins
    assert router.pick(block_hashes(prompt(7))) is first
    first.in_flight = 5    # more than 4 beyond the least loaded: the queue costs more than the prefill saves
    assert router.pick(block_hashes(prompt(7))) is other
    first.in_flight = 0
    first.reported(Load(running=9, waiting=0, kv_usage=0.5))   # other gateways' requests count too
    assert first.pending == 9 and router.pick(block_hashes(prompt(7))) is other


def test_out_of_rotation_and_excluded_workers_are_skipped() -> None:
    a, b = workers(2)
    router = Router([a, b], slack=4)
    a.healthy = False
    assert all(router.pick([]) is b for _ in range(3))
    assert router.pick([], exclude=[b]) is None


# -- llmserve in front of two workers -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def pair(engines_dir: Path) -> AsyncIterator[list[FakeSglangWorker]]:
    tokenizer = AutoTokenizer.from_pretrained(engines_dir / "demo" / "checkpoint")
    script = [*tokenizer.encode("Routed answer.", add_special_tokens=False), EOS]
    fakes = [FakeSglangWorker([script], vocab_size=4096, context=1024) for _ in range(2)]
    for fake in fakes:
        await fake.start()
    yield fakes
    for fake in fakes:
        await fake.stop()


@pytest.fixture(scope="module")
async def gw(engines_dir: Path, pair: list[FakeSglangWorker]) -> AsyncIterator[object]:
    config = worker_config(engines_dir, *(f"demo={w.address}" for w in pair), worker_probe_interval=0.1)
    async with running_server(config) as server, \
            grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:  # type: ignore[attr-defined]
        server.stub = chat_pb2_grpc.ChatServiceStub(channel)  # type: ignore[attr-defined]
        server.health_stub = health_pb2_grpc.HealthStub(channel)  # type: ignore[attr-defined]
        yield server


def ask(content: str = "Hello", **fields: object) -> chat_pb2.ChatCompletionRequest:
    return chat(content, max_tokens=32, temperature=0, **fields)


async def status(gw: object, service: str) -> int:
    return (await gw.health_stub.Check(health_pb2.HealthCheckRequest(service=service))).status  # type: ignore


async def test_concurrent_requests_share_the_workers(gw: object, pair: list[FakeSglangWorker]) -> None:
    for fake in pair:
        fake.step = 0.02
    try:
        before = [len(f.requests) for f in pair]
        replies = await asyncio.gather(*(gw.stub.CreateChatCompletion(ask(f"Question {i}"))  # type: ignore
                                         for i in range(8)))
        assert all(r.choices[0].message.content == "Routed answer." for r in replies)
        shares = [len(f.requests) - b for f, b in zip(pair, before, strict=True)]
        assert sum(shares) == 8 and min(shares) >= 2, shares
    finally:
        for fake in pair:
            fake.step = 0.002


async def test_a_shared_prefix_goes_to_one_worker(gw: object, pair: list[FakeSglangWorker]) -> None:
    before = [len(f.requests) for f in pair]
    for i in range(6):
        await gw.stub.CreateChatCompletion(ask(LONG + f"Question {i}?"))  # type: ignore[attr-defined]
    shares = sorted(len(f.requests) - b for f, b in zip(pair, before, strict=True))
    assert shares == [0, 6]


async def test_a_refused_start_is_retried_on_the_other_worker(gw: object, pair: list[FakeSglangWorker]) -> None:
    bad = pair[0]
    bad.fail_generate = grpc.StatusCode.UNAVAILABLE
    engine = gw.registry.get("demo").engine  # type: ignore[attr-defined]
    try:
        tried = len(bad.requests)
        for i in range(4):
            reply = await gw.stub.CreateChatCompletion(ask(f"Retry {i}"))  # type: ignore[attr-defined]
            assert reply.choices[0].message.content == "Routed answer."
        assert len(bad.requests) > tried, "the failing worker was never tried"
    finally:
        bad.fail_generate = None
    assert await wait_until(lambda: all(w.healthy for w in engine.workers()), timeout=5)   # probed back in


async def test_a_worker_gone_mid_stream_ends_it_unavailable(gw: object, pair: list[FakeSglangWorker]) -> None:
    for fake in pair:
        fake.step = 0.05
    victim = None
    try:
        call = gw.stub.StreamChatCompletion(ask("Long answer"))  # type: ignore[attr-defined]
        chunks = [await call.read(), await call.read()]
        assert chunks[1].choices[0].delta.content
        victim = next(f for f in pair if f.running)
        await victim.stop()
        with pytest.raises(grpc.aio.AioRpcError) as e:
            while await call.read() is not grpc.aio.EOF:
                pass
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "finish reason: error" in e.value.details()
        reply = await gw.stub.CreateChatCompletion(ask("After the failure"))  # type: ignore[attr-defined]
        assert reply.choices[0].message.content == "Routed answer."   # the other worker
        assert await status(gw, "demo") == health_pb2.HealthCheckResponse.SERVING
    finally:
        for fake in pair:
            fake.step = 0.002
        if victim is not None:
            await victim.start(victim.port)
    engine = gw.registry.get("demo").engine  # type: ignore[attr-defined]
    assert await wait_until(lambda: all(w.healthy for w in engine.workers()), timeout=5)


async def test_no_worker_in_rotation_is_not_serving_until_one_returns(gw: object,
                                                                      pair: list[FakeSglangWorker]) -> None:
    base = f"http://127.0.0.1:{gw.config.server.http_port}"  # type: ignore[attr-defined]
    for fake in pair:
        fake.healthy = False
    try:
        assert await wait_until(lambda: not gw.registry.get("demo").engine.health().ok, timeout=5)  # type: ignore
        await asyncio.sleep(0.5)
        assert await status(gw, "demo") == health_pb2.HealthCheckResponse.NOT_SERVING
        assert await status(gw, "llmserve.v1.ChatService") == health_pb2.HealthCheckResponse.NOT_SERVING
        assert await status(gw, "") == health_pb2.HealthCheckResponse.SERVING
        async with httpx.AsyncClient(base_url=base) as http:
            assert (await http.get("/health/ready")).status_code == 503
            assert (await http.get("/health/live")).status_code == 200
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await gw.stub.CreateChatCompletion(ask())  # type: ignore[attr-defined]
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "Health check probe failed" in e.value.details()
    finally:
        pair[1].healthy = True
    assert await wait_until(lambda: gw.registry.get("demo").engine.health().ok, timeout=5)  # type: ignore
    await asyncio.sleep(0.5)
    assert await status(gw, "demo") == health_pb2.HealthCheckResponse.SERVING
    async with httpx.AsyncClient(base_url=base) as http:
        assert (await http.get("/health/ready")).status_code == 200
    assert (await gw.stub.CreateChatCompletion(ask())).choices[0].message.content == "Routed answer."  # type: ignore
    pair[0].healthy = True
