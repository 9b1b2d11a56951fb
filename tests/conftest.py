"""Shared fixtures: the demo model, and real llmserve servers on loopback ports."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from service.config import Config, EngineConfig, ServerConfig
from service.gen.llmserve.v1 import chat_pb2, chat_pb2_grpc
from service.healthcheck import wait_serving

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def engines_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository holding only the demo model (`make test` builds engines/demo first)."""
    target = tmp_path_factory.mktemp("engines")
    built = ROOT / "engines" / "demo"
    if (built / "manifest.json").is_file():
        (target / "demo").symlink_to(built)
    else:
        from service.build.demo import build_demo

        build_demo(target / "demo")
    return target


def server_config(engines_dir: Path, **server: object) -> Config:
    engine = server.pop("engine", None)
    return Config(
        server=replace(ServerConfig(engines_dir=engines_dir, grpc_port=0, http_port=free_port(), grace_period=10),
                       **server),
        engine=engine or EngineConfig(max_running=32, max_queue=64, max_cache_tokens=16384),
    )


@asynccontextmanager
async def running_server(config: Config) -> AsyncIterator[object]:
    from service.server import LlmServer

    server = LlmServer(config)
    await server.start()
    try:
        yield server
    finally:
        await server.shutdown()


@pytest.fixture(scope="session")
async def server(engines_dir: Path) -> AsyncIterator[object]:
    async with running_server(server_config(engines_dir)) as srv:
        yield srv


@pytest.fixture(scope="session")
async def channel(server: object) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as ch:  # type: ignore[attr-defined]
        yield ch


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> chat_pb2_grpc.ChatServiceStub:
    return chat_pb2_grpc.ChatServiceStub(channel)


def chat(content: str = "Hello there", **fields: object) -> chat_pb2.ChatCompletionRequest:
    req = chat_pb2.ChatCompletionRequest(model="demo", messages=[chat_pb2.ChatMessage(role="user", content=content)])
    for name, value in fields.items():
        if isinstance(value, list):
            getattr(req, name).extend(value)
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


@pytest.fixture
def server_process(engines_dir: Path) -> Iterator[type[ServerProcess]]:
    started: list[ServerProcess] = []

    def start(*args: str, env: dict[str, str] | None = None) -> ServerProcess:
        p = ServerProcess(engines_dir, *args, env=env)
        started.append(p)
        return p

    yield start  # type: ignore[misc]
    for p in started:
        p.stop()
