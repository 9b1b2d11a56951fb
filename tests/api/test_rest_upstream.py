"""The REST shim alone (`llmserve rest --upstream`), in front of a real llmserve's gRPC API."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from service.config import ServerConfig
from service.gen.llmserve.v1 import chat_pb2, chat_pb2_grpc
from service.rest.app import RestServer
from service.rest.upstream import UpstreamBackend
from service.worker_pool import WorkerPool
from tests.helpers import (
    ROOT,
    assert_error,
    body,
    chat,
    free_port,
    running_server,
    server_config,
    sse_events,
    wait_until,
)

KEY = "upstream-key"
AUTH = (("authorization", f"Bearer {KEY}"),)


@asynccontextmanager
async def shim_for(address: str) -> AsyncIterator[httpx.AsyncClient]:
    """A standalone shim in this process, and a client of it that sends the upstream's key."""
    config = ServerConfig(http_port=free_port(), upstream=address)
    backend = UpstreamBackend(config)
    server = RestServer(config, backend, WorkerPool(1))
    await server.start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{config.http_port}", timeout=60,
                                     headers={"authorization": f"Bearer {KEY}"}) as client:
            yield client
    finally:
        await server.stop()
        await backend.close()


@pytest.fixture(scope="module")
async def upstream(engines_dir: Path) -> AsyncIterator[Any]:
    async with running_server(server_config(engines_dir, api_key=[KEY], http_port=0)) as srv:
        yield srv


@pytest.fixture(scope="module")
async def stub(upstream: Any) -> AsyncIterator[chat_pb2_grpc.ChatServiceStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{upstream.grpc_port}") as ch:
        yield chat_pb2_grpc.ChatServiceStub(ch)


@pytest.fixture(scope="module")
async def shim(upstream: Any) -> AsyncIterator[httpx.AsyncClient]:
    async with shim_for(f"127.0.0.1:{upstream.grpc_port}") as client:
        yield client


async def test_unary_forwards_key_and_request_id(shim: httpx.AsyncClient, stub: chat_pb2_grpc.ChatServiceStub,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="llmserve.request"):
        r = await shim.post("/v1/chat/completions", json=body(max_tokens=6, ignore_eos=True, seed=21),
                            headers={"x-request-id": "via-shim-1"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "via-shim-1"
    upstream_logs = [rec for rec in caplog.records if getattr(rec, "method", None) == "CreateChatCompletion"]
    assert [rec.request_id for rec in upstream_logs] == ["via-shim-1"]
    direct = await stub.CreateChatCompletion(chat(max_tokens=6, ignore_eos=True, seed=21), metadata=AUTH)
    reply = r.json()
    assert reply["choices"][0]["message"]["content"] == direct.choices[0].message.content
    assert reply["usage"]["total_tokens"] == direct.usage.total_tokens
    models = (await shim.get("/v1/models")).json()
    assert [m["id"] for m in models["data"]] == ["demo"]


async def test_stream_through_the_shim(shim: httpx.AsyncClient, stub: chat_pb2_grpc.ChatServiceStub) -> None:
    r = await shim.post("/v1/chat/completions", json=body(max_tokens=8, ignore_eos=True, seed=4, stream=True,
                                                          stream_options={"include_usage": True}))
    events = sse_events(r.content)
    assert events[-1] == "[DONE]" and events[-2]["usage"]["completion_tokens"] == 8
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in events[:-2])
    direct = await stub.CreateChatCompletion(chat(max_tokens=8, ignore_eos=True, seed=4), metadata=AUTH)
    assert text == direct.choices[0].message.content


async def test_upstream_errors_keep_status_and_field_violations(shim: httpx.AsyncClient) -> None:
    r = await shim.post("/v1/chat/completions", json=body(temperature=5, top_logprobs=3))
    error = assert_error(r, 400, "invalid_request_error", "invalid_argument", "temperature")
    assert "top_logprobs: needs logprobs" in error["message"]
    r = await shim.post("/v1/chat/completions", json=body(stream=True, top_p=0))
    assert_error(r, 400, "invalid_request_error", "invalid_argument", "top_p")
    assert_error(await shim.post("/v1/chat/completions", json=body(model="gpt-9")), 404, "not_found_error",
                 "not_found", None)
    for headers in ({"authorization": ""}, {"authorization": "Bearer wrong"}):
        r = await shim.post("/v1/chat/completions", json=body(max_tokens=1), headers=headers)
        assert_error(r, 401, "authentication_error", "unauthenticated", None)
    r = await shim.post("/v1/chat/completions", json=body(max_tokens=1800, ignore_eos=True),
                        headers={"x-request-timeout": "0.5"})
    assert_error(r, 504, "timeout_error", "deadline_exceeded", None)


async def test_disconnect_cancels_the_upstream_generation(upstream: Any, shim: httpx.AsyncClient) -> None:
    engine = upstream.registry.get("demo").engine
    async with shim.stream("POST", "/v1/chat/completions",
                           json=body(max_tokens=1500, ignore_eos=True, stream=True)) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                break
        assert engine.stats().running >= 1
    assert await wait_until(lambda: engine.stats().running == 0 and engine.stats().kv_blocks_used == 0, 5)


def documented_table() -> dict[str, tuple[int, str]]:
    """docs/rest.md's rows: gRPC status name -> (HTTP status, error type)."""
    rows: dict[str, tuple[int, str]] = {}
    for line in (ROOT / "docs/rest.md").read_text().splitlines():
        row = re.fullmatch(r"\| ((?:`[A-Z_]+`(?:, )?)+) \| (\d{3}) \| `(\w+)` \|.*", line)
        if row:
            for name in re.findall(r"`([A-Z_]+)`", row.group(1)):
                rows[name] = (int(row.group(2)), row.group(3))
    return rows


class StatusUpstream(chat_pb2_grpc.ChatServiceServicer):
    """A fake upstream that fails every call with the status named in the request's `user` field:
    no real server can be made to answer with every gRPC status."""

    async def CreateChatCompletion(self, request: chat_pb2.ChatCompletionRequest,
                                   context: grpc.aio.ServicerContext) -> chat_pb2.ChatCompletion:
        await context.abort(grpc.StatusCode[request.user], f"upstream says {request.user}")

    async def StreamChatCompletion(self, request: chat_pb2.ChatCompletionRequest,
                                   context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode[request.user], f"upstream says {request.user}")


async def test_every_grpc_status_maps_as_the_docs_say() -> None:
    table = documented_table()
    assert set(table) == {c.name for c in grpc.StatusCode} - {"OK"}
    server = grpc.aio.server()
    chat_pb2_grpc.add_ChatServiceServicer_to_server(StatusUpstream(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with shim_for(f"127.0.0.1:{port}") as client:
            for name, (status, type_) in table.items():
                for stream in (False, True):
                    r = await client.post("/v1/chat/completions", json=body(user=name, stream=stream))
                    error = assert_error(r, status, type_, name.lower(), None)
                    assert error["message"] == f"upstream says {name}"
    finally:
        await server.stop(0)
    async with shim_for(f"127.0.0.1:{port}") as client:
        assert_error(await client.post("/v1/chat/completions", json=body()), 503, "service_unavailable_error",
                     "unavailable", None)
        ready = await client.get("/health/ready")
        assert ready.status_code == 503 and ready.json() == {"status": "upstream unavailable"}


async def test_llmserve_rest_command_drains_on_sigterm(upstream: Any) -> None:
    port = free_port()
    env = {**os.environ, "LLMSERVE_UPSTREAM": f"127.0.0.1:{upstream.grpc_port}"}
    proc = subprocess.Popen([sys.executable, "-m", "service", "rest", "--http-port", str(port)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30,
                                     headers={"authorization": f"Bearer {KEY}"}) as client:
            deadline = time.monotonic() + 30
            while True:
                try:
                    if (await client.get("/health/ready")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert proc.poll() is None and time.monotonic() < deadline, "the shim did not become ready"
                await asyncio.sleep(0.1)
            request = body(max_tokens=200, ignore_eos=True, stream=True, stream_options={"include_usage": True})
            async with client.stream("POST", "/v1/chat/completions", json=request) as r:
                lines = r.aiter_lines()
                assert (await anext(lines)).startswith("data: ")
                proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.3)
                ready = await client.get("/health/ready")
                refused = await client.post("/v1/chat/completions", json=body(max_tokens=1))
                rest = [line async for line in lines if line]
            assert ready.status_code == 503 and ready.json() == {"status": "draining"}
            assert_error(refused, 503, "service_unavailable_error", "unavailable", None)
            assert rest[-1] == "data: [DONE]" and json.loads(rest[-2][6:])["usage"]["completion_tokens"] == 200
        assert await asyncio.to_thread(proc.wait, 15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
