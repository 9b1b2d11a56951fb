"""The REST shim under operator settings: API keys, CORS, --ignore-unknown-fields, admission limits, body size."""

from __future__ import annotations

import asyncio
import json
import logging
import select
import signal
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.config import EngineConfig
from tests.helpers import assert_error, body, running_server, server_config

KEY = "rest-key-1"
ORIGIN = "http://app.localhost:3000"


@pytest.fixture(scope="module")
async def guarded(engines_dir: Path) -> AsyncIterator[Any]:
    config = server_config(engines_dir, api_key=["other-key", KEY], cors_origin=[ORIGIN], ignore_unknown_fields=True,
                           max_message_bytes=20_000,
                           engine=EngineConfig(max_running=2, max_queue=2, max_cache_tokens=4096))
    async with running_server(config) as srv:
        yield srv


@pytest.fixture
async def http(guarded: Any) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{guarded.config.server.http_port}", timeout=60,
                                 headers={"authorization": f"Bearer {KEY}"}) as c:
        yield c


async def test_api_keys_are_the_grpc_keys(http: httpx.AsyncClient) -> None:
    for headers in ({"authorization": ""}, {"authorization": "Bearer nope"}, {"authorization": KEY},
                    {"authorization": f"Basic {KEY}"}):
        for r in (await http.post("/v1/chat/completions", json=body(foo=1), headers=headers),
                  await http.get("/v1/models", headers=headers),
                  await http.post("/api/v1", json={"model": "demo", "data": {}}, headers=headers)):
            assert r.status_code == 401, (headers, r.text)
        assert_error(await http.get("/v1/models", headers=headers), 401, "authentication_error", "unauthenticated",
                     None)
    assert (await http.get("/v1/models", headers={"authorization": "Bearer other-key"})).status_code == 200
    assert (await http.get("/health/ready", headers={"authorization": ""})).status_code == 200
    assert (await http.get("/metrics", headers={"authorization": ""})).status_code == 200


async def test_cors_allows_only_the_configured_origin(http: httpx.AsyncClient) -> None:
    preflight = {"access-control-request-method": "POST", "access-control-request-headers": "authorization"}
    r = await http.options("/v1/chat/completions", headers={"origin": ORIGIN, **preflight})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    r = await http.options("/v1/chat/completions", headers={"origin": "http://evil.localhost", **preflight})
    assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
    r = await http.post("/v1/chat/completions", json=body(max_tokens=1), headers={"origin": ORIGIN})
    assert r.headers["access-control-allow-origin"] == ORIGIN
    assert "x-request-id" in r.headers["access-control-expose-headers"]


async def test_unknown_fields_are_ignored_with_a_warning_when_configured(
        http: httpx.AsyncClient, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="llmserve.rest.request"):
        r = await http.post("/v1/chat/completions", json=body(max_tokens=2, frobnicate={"50256": -100},
                                                              messages=[{"role": "user", "content": "hi", "x": 1}]))
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 2
    [record] = [r for r in caplog.records if r.getMessage() == "ignored unknown request fields"]
    assert record.fields == ["messages[0].x", "frobnicate"]
    r = await http.post("/v1/chat/completions", json=body(temperature="warm"))
    assert_error(r, 400, "invalid_request_error", "invalid_argument", "temperature")


async def test_overload_is_429_while_admitted_requests_finish(http: httpx.AsyncClient) -> None:
    async def one(i: int) -> httpx.Response:
        return await http.post("/v1/chat/completions", json=body(max_tokens=32, ignore_eos=True, seed=i,
                                                                   stream=i % 2 == 0))

    replies = await asyncio.gather(*(one(i) for i in range(12)))
    refused = [r for r in replies if r.status_code == 429]
    done = [r for r in replies if r.status_code == 200]
    assert len(refused) + len(done) == 12 and len(done) >= 4 and refused
    for r in refused:
        assert "overloaded" in assert_error(r, 429, "rate_limit_error", "resource_exhausted", None)["message"]


async def test_oversized_body_is_refused(http: httpx.AsyncClient) -> None:
    r = await http.post("/v1/chat/completions", json=body(messages=[{"role": "user", "content": "x" * 30_000}]))
    assert "20000" in assert_error(r, 413, "invalid_request_error", "resource_exhausted", "body")["message"]


def send_chunked_until_answered(port: int, limit: int = 50_000_000) -> tuple[int, bytes]:
    """Sends a chat request with a chunked body that never ends (until `limit` bytes), reading whenever the server
    answers; returns how much was sent by then and the answer's bytes."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + KEY.encode() + b"\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"10000\r\n" + b"x" * 65536 + b"\r\n"
        sent, answer = 0, b""
        while sent < limit:
            readable, writable, _ = select.select([sock], [sock], [], 10)
            if readable:
                answer = sock.recv(65536)
                break
            if not writable:
                break
            sock.sendall(chunk)
            sent += len(chunk)
        return sent, answer


async def test_a_chunked_body_is_counted_as_it_arrives(guarded: Any) -> None:
    """No Content-Length: the shim stops reading at the limit and answers 413 while the client is still sending
    (before, it read all 50 MB, then answered 400)."""
    sent, answer = await asyncio.to_thread(send_chunked_until_answered, guarded.config.server.http_port)
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    assert sent < 5_000_000, f"the shim read {sent} bytes of a body past its 20,000-byte limit before answering"


async def test_sigterm_drains_rest_streams(server_process: Any) -> None:
    proc = server_process("--grace-period", "30")
    await proc.wait_serving()
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{proc.http_port}", timeout=60) as client:
        request = body(max_tokens=200, ignore_eos=True, stream=True, stream_options={"include_usage": True})
        async with client.stream("POST", "/v1/chat/completions", json=request) as r:
            lines = r.aiter_lines()
            assert (await anext(lines)).startswith("data: ")
            proc.proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            ready = await client.get("/health/ready")
            refused = await client.post("/v1/chat/completions", json=body(max_tokens=1))
            rest = [line async for line in lines if line]
        assert ready.status_code == 503 and ready.json() == {"status": "draining"}
        assert_error(refused, 503, "service_unavailable_error", "unavailable", None)
        assert rest[-1] == "data: [DONE]" and json.loads(rest[-2][6:])["usage"]["completion_tokens"] == 200
    assert await asyncio.to_thread(proc.proc.wait, 30) == 0
