"""The reference engine in a process of its own (the default): the same answers as in a thread, and a dead
engine process is a fatal engine error, not a hang."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from service.backends.base import (
    Finished,
    GenerationRequest,
    InvalidRequest,
    QueueFull,
    SamplingParams,
    TokenDelta,
)
from service.backends.reference import ReferenceEngine
from service.config import EngineConfig
from service.gen.llmserve.v1 import chat_pb2, chat_pb2_grpc
from service.repository.manifest import load_manifest
from tests.helpers import running_server, server_config


def gauges(response: httpx.Response) -> dict[str, float]:
    return {sample.name: sample.value for family in text_string_to_metric_families(response.text)
            for sample in family.samples if sample.labels.get("model_name") == "demo"}

PROMPT = [0, 2, 1100, 3, 271, 40, 1002, 333, 400, 17, 4, 2, 78, 3, 271]


async def started(engines_dir: Path, **config: object) -> ReferenceEngine:
    engine = ReferenceEngine(load_manifest(engines_dir / "demo"), EngineConfig(**config))  # type: ignore[arg-type]
    await engine.start()
    return engine


async def collect(engine: ReferenceEngine, request: GenerationRequest) -> list[Any]:
    return [e async for e in engine.generate(request)]


@pytest.fixture(scope="module")
async def pair(engines_dir: Path) -> AsyncIterator[tuple[ReferenceEngine, ReferenceEngine]]:
    process = await started(engines_dir, max_running=8, max_queue=2)
    thread = await started(engines_dir, max_running=8, max_queue=2, engine_process=False)
    yield process, thread
    await process.shutdown()
    await thread.shutdown()


async def test_the_engine_runs_in_another_process(pair: tuple[ReferenceEngine, ReferenceEngine]) -> None:
    process, _ = pair
    child = process._process  # the one place a test looks at how the engine is hosted
    assert child is not None and child.is_alive() and child.pid != os.getpid()
    with pytest.raises(AssertionError):
        process.core  # noqa: B018 - its internals are not in this process


async def test_events_are_the_same_as_in_a_thread(pair: tuple[ReferenceEngine, ReferenceEngine]) -> None:
    """Every field crosses the pipe: token ids, text, logprobs with top alternatives, finish reasons, n > 1."""
    requests = [
        GenerationRequest("g", PROMPT, SamplingParams(max_tokens=20, temperature=0.0, logprobs=True, top_logprobs=3)),
        GenerationRequest("s", PROMPT, SamplingParams(max_tokens=30, seed=5, stop=("e",)), n=3),
        GenerationRequest("z", PROMPT, SamplingParams(max_tokens=0)),
    ]
    for request in requests:
        got, want = await asyncio.gather(*(collect(engine, request) for engine in pair))
        assert [type(e) for e in got] == [type(e) for e in want]
        for g, w in zip(got, want, strict=True):
            if isinstance(g, TokenDelta):
                assert (g.index, g.token_ids, g.text) == (w.index, w.token_ids, w.text)
                for gl, wl in zip(g.logprobs or [], w.logprobs or [], strict=True):
                    assert (gl.token_id, gl.bytes, [t.token_id for t in gl.top]) == \
                        (wl.token_id, wl.bytes, [t.token_id for t in wl.top])
                    assert gl.logprob == pytest.approx(wl.logprob, abs=1e-4)
            else:
                assert isinstance(g, Finished)
                assert (g.index, g.finish_reason, g.completion_tokens) == (w.index, w.finish_reason,
                                                                             w.completion_tokens)


async def test_refusals_cross_the_pipe(pair: tuple[ReferenceEngine, ReferenceEngine]) -> None:
    process, _ = pair
    with pytest.raises(InvalidRequest) as e:
        await collect(process, GenerationRequest("big", PROMPT, SamplingParams(max_tokens=5000)))
    assert e.value.field == "max_tokens"
    long = SamplingParams(max_tokens=1500, ignore_eos=True)
    streams = [process.generate(GenerationRequest(f"q{i}", PROMPT, long)) for i in range(10)]
    queued = []
    try:
        await asyncio.gather(*(s.__anext__() for s in streams[:8]))  # all running slots taken
        queued = [asyncio.ensure_future(s.__anext__()) for s in streams[8:]]  # these two wait for a slot
        deadline = asyncio.get_running_loop().time() + 5
        while process.stats().waiting < 2 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        assert process.stats().running == 8 and process.stats().waiting == 2
        with pytest.raises(QueueFull):
            await process.generate(GenerationRequest("over", PROMPT, long)).__anext__()
    finally:
        for task in queued:
            task.cancel()
        await asyncio.gather(*queued, return_exceptions=True)
        for s in streams:
            await s.aclose()
    deadline = asyncio.get_running_loop().time() + 5
    while process.stats().kv_blocks_used and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.02)
    assert process.stats().running == 0 and process.stats().kv_blocks_used == 0


async def test_a_dead_engine_process_fails_streams_and_flips_health(engines_dir: Path) -> None:
    config = server_config(engines_dir, engine=EngineConfig(max_running=8, max_queue=8, max_cache_tokens=8192))
    async with running_server(config) as srv, grpc.aio.insecure_channel(f"127.0.0.1:{srv.grpc_port}") as ch, \
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{srv.config.server.http_port}", timeout=10) as http:
        stub = chat_pb2_grpc.ChatServiceStub(ch)
        request = chat_pb2.ChatCompletionRequest(model="demo", max_tokens=1500, ignore_eos=True,
                                                 messages=[chat_pb2.ChatMessage(role="user", content="hi")])
        calls = [stub.StreamChatCompletion(request) for _ in range(3)]
        for call in calls:
            await call.read()
        assert gauges(await http.get("/metrics"))["vllm:num_requests_running"] == 3
        os.kill(srv.registry.get("demo").engine._process.pid, signal.SIGKILL)
        for call in calls:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                while await call.read() is not grpc.aio.EOF:
                    pass
            assert e.value.code() == grpc.StatusCode.INTERNAL
        health = health_pb2_grpc.HealthStub(ch)

        async def statuses() -> list[int]:
            return [(await health.Check(health_pb2.HealthCheckRequest(service=s), timeout=5)).status
                    for s in ("", "llmserve.v1.ChatService")]
        deadline = asyncio.get_running_loop().time() + 5  # the server's engine watcher notices within a second
        while await statuses() != [health_pb2.HealthCheckResponse.NOT_SERVING] * 2 and \
                asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        assert await statuses() == [health_pb2.HealthCheckResponse.NOT_SERVING] * 2
        assert "engine process died" in srv.registry.get("demo").engine.health().detail
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.CreateChatCompletion(request, timeout=5)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert (await http.get("/health/ready")).status_code == 503
        # The autoscaler reads these: a dead engine runs nothing and has nothing waiting.
        metrics = gauges(await http.get("/metrics"))
        assert metrics["vllm:num_requests_running"] == metrics["vllm:num_requests_waiting"] == 0, metrics
