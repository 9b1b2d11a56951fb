"""HTTP itself on the REST port: smuggling, header bytes and lengths, unknown routes; one exact `param` per field."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from service.admission import MAX_REQUEST_ID_CHARS
from service.config import ServerConfig
from service.rest.app import RestServer
from service.rest.upstream import UpstreamBackend
from service.worker_pool import WorkerPool
from tests.helpers import assert_error, body, free_port


@pytest.fixture
async def http(server: Any) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.config.server.http_port}", timeout=60) as c:
        yield c


def exchange(port: int, raw: bytes) -> bytes:
    """Sends raw bytes on one connection and reads until the server closes it (or 10 s pass)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(raw)
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except TimeoutError:
            pass
        return answer


async def test_content_length_with_transfer_encoding_is_refused_and_closed(server: Any) -> None:
    """RFC 9112 §6.3: a message with both framings may be smuggling a second request; answer 400 and close, so
    the bytes after it are never read as a request."""
    payload = json.dumps(body(max_tokens=1)).encode()
    smuggled = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"
    chunked = f"{len(payload):x}\r\n".encode() + payload + b"\r\n0\r\n\r\n"
    raw = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
           b"Content-Length: " + str(len(chunked)).encode() + b"\r\nTransfer-Encoding: chunked\r\n\r\n"
           + chunked + smuggled)
    answer = await asyncio.to_thread(exchange, server.config.server.http_port, raw)
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:300]
    assert answer.count(b"HTTP/1.1 ") == 1, answer


async def test_unknown_routes_and_methods_answer_in_openai_shape(http: httpx.AsyncClient) -> None:
    r = await http.get("/v1/completions/nothing-here")
    assert "/v1/completions/nothing-here" in assert_error(r, 404, "not_found_error", "not_found", None)["message"]
    r = await http.get("/v1/chat/completions")
    assert_error(r, 405, "invalid_request_error", "method_not_allowed", None)
    assert r.headers["allow"] == "POST"
    assert_error(await http.delete("/v1/models"), 405, "invalid_request_error", "method_not_allowed", None)


async def test_request_ids_are_bounded(http: httpx.AsyncClient) -> None:
    kept = "r" * MAX_REQUEST_ID_CHARS
    assert (await http.get("/v1/models", headers={"x-request-id": kept})).headers["x-request-id"] == kept
    r = await http.post("/v1/chat/completions", json=body(max_tokens=1), headers={"x-request-id": "r" * 10_000})
    assert r.status_code == 200 and len(r.headers["x-request-id"]) == 32, "a 10 KB id is replaced by a new one"


async def test_a_lone_surrogate_names_its_exact_field(http: httpx.AsyncClient) -> None:
    raw = b'{"model": "demo", "messages": [{"role": "user", "content": "a\\ud800b"}], "stop": ["ok", "\\udc00"]}'
    r = await http.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    error = assert_error(r, 400, "invalid_request_error", "invalid_argument", "messages[0].content")
    assert "stop[1]: " in error["message"] and "surrogate" in error["message"]


@pytest.fixture(scope="module")
async def standalone(server: Any) -> AsyncIterator[int]:
    """`llmserve rest --upstream` in this process, in front of the session's server."""
    config = ServerConfig(http_port=free_port(), upstream=f"127.0.0.1:{server.grpc_port}")
    backend = UpstreamBackend(config)
    shim = RestServer(config, backend, WorkerPool(1))
    await shim.start()
    yield config.http_port
    await shim.stop()
    await backend.close()


@pytest.mark.parametrize("shim", ["co-located", "standalone"])
async def test_non_ascii_header_bytes_are_400_and_401_not_500(server: Any, standalone: int, shim: str) -> None:
    port = server.config.server.http_port if shim == "co-located" else standalone
    payload = json.dumps(body(max_tokens=1)).encode()

    def post(header: bytes) -> bytes:
        return exchange(port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                              b"Content-Type: application/json\r\n" + header + b"\r\nContent-Length: "
                              + str(len(payload)).encode() + b"\r\n\r\n" + payload)

    answer = await asyncio.to_thread(post, b"X-Request-Id: caf\xe9")
    assert answer.startswith(b"HTTP/1.1 400 ") and b'"param":"x-request-id"' in answer, answer[:400]
    if shim == "standalone":  # the co-located shim has no keys configured here: any Authorization passes
        answer = await asyncio.to_thread(post, b"Authorization: Bearer caf\xe9")
        assert answer.startswith(b"HTTP/1.1 401 ") and b"authentication_error" in answer, answer[:400]
