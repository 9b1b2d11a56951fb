"""What the tests share besides fixtures: real servers on loopback, request builders, and readers of answers."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import httpx
from google.protobuf import struct_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from bench.processes import free_port
from service.config import Config, EngineConfig, ServerConfig, WorkersConfig
from service.gen.llmserve.v1 import chat_pb2
from service.healthcheck import wait_serving

ROOT = Path(__file__).resolve().parents[1]
USER = [{"role": "user", "content": "Hello there"}]
SMOLLM2 = "smollm2-135m-instruct"  # the real model `make smollm2` builds into engines/
LLAMA31 = "demo-llama-3.1"  # the demo with Meta's own Llama 3 tokenizer


def server_config(engines_dir: Path, **server: object) -> Config:
    engine = server.pop("engine", None)
    return Config(
        server=replace(ServerConfig(engines_dir=engines_dir, grpc_port=0, http_port=free_port(), grace_period=10),
                       **server),
        engine=engine or EngineConfig(max_running=32, max_queue=64, max_cache_tokens=16384),
    )


def worker_config(engines_dir: Path, *workers: str, **settings: object) -> Config:
    """A config serving the engines directory plus gRPC `workers` (NAME=KIND://HOST:PORT), with WorkersConfig
    `settings`."""
    return replace(server_config(engines_dir), workers=replace(WorkersConfig(), workers=list(workers), **settings))


@asynccontextmanager
async def running_server(config: Config) -> AsyncIterator[object]:
    from service.server import LlmServer

    server = LlmServer(config)
    try:
        await server.start()   # a start that fails still shuts down what it started (ports, probes)
        yield server
    finally:
        await server.shutdown()


def chat(content: str = "Hello there", **fields: object) -> chat_pb2.ChatCompletionRequest:
    req = chat_pb2.ChatCompletionRequest(model="demo", messages=[chat_pb2.ChatMessage(role="user", content=content)])
    for name, value in fields.items():
        if isinstance(value, list):
            getattr(req, name).extend(value)
        elif isinstance(value, dict):
            getattr(req, name).update(value)
        elif hasattr(value, "DESCRIPTOR"):
            getattr(req, name).CopyFrom(value)
        else:
            setattr(req, name, value)
    return req


async def wait_until(predicate, timeout: float = 10.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(interval)
    return predicate()


class ServerProcess:
    """`python -m service serve` as a child process, for what needs a real process (signals, exit codes)."""

    def __init__(self, engines_dir: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.grpc_port, self.http_port = free_port(), free_port()
        cmd = [sys.executable, "-m", "service", "serve", "--engines-dir", str(engines_dir),
               "--grpc-port", str(self.grpc_port), "--http-port", str(self.http_port), *args]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})},
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    async def wait_serving(self, timeout: float = 60.0) -> None:
        await asyncio.to_thread(wait_serving, self.address, self.proc, timeout, self.proc.stdout.read)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def field_violations(error: grpc.aio.AioRpcError) -> list[str]:
    status = rpc_status.from_call(error)
    assert status is not None, "no google.rpc.Status details"
    out = []
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        assert detail.Unpack(bad)
        out += [v.field for v in bad.field_violations]
    return out


def struct(value: dict[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(value)
    return s


def body(**fields: Any) -> dict[str, Any]:
    return {"model": "demo", "messages": USER, **fields}


def sse_events(raw: bytes) -> list[Any]:
    """Every `data:` payload, JSON-decoded except the final [DONE]."""
    assert raw.endswith(b"\n\n")
    out: list[Any] = []
    for frame in raw[:-2].split(b"\n\n"):
        assert frame.startswith(b"data: ") and b"\n" not in frame, frame
        payload = frame[len(b"data: "):]
        out.append(payload.decode() if payload == b"[DONE]" else json.loads(payload))
    return out


def assert_error(response: httpx.Response, status: int, type_: str, code: str, param: str | None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"], error["param"]) == (type_, code, param), error
    return error
