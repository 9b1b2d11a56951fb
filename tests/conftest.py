"""Shared fixtures: the demo model, and real llmserve servers on loopback ports."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest

from service.gen.llmserve.v1 import chat_pb2_grpc
from tests.helpers import LLAMA31, ROOT, ServerProcess, running_server, server_config


@pytest.fixture(scope="session")
def engines_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository holding only the demo model (`make test` builds engines/demo first)."""
    target = tmp_path_factory.mktemp("engines")
    built = ROOT / "engines" / "demo"
    if (built / "manifest.json").is_file():
        (target / "demo").symlink_to(built)
    else:
        from service.repository.build.demo import build_demo

        build_demo(target / "demo")
    return target


@pytest.fixture(scope="session")
def llama31_engines_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository holding only demo-llama-3.1, the demo with Meta's own Llama 3 tokenizer (`make test`
    builds build/engines/demo-llama-3.1 first)."""
    target = tmp_path_factory.mktemp("engines-llama-3.1")
    built = ROOT / "build" / "engines" / LLAMA31
    if (built / "manifest.json").is_file():
        (target / LLAMA31).symlink_to(built)
    else:
        from service.repository.build.demo import build_demo

        build_demo(target / LLAMA31, "llama-3.1")
    return target


@pytest.fixture(scope="session")
async def llama31_channel(llama31_engines_dir: Path) -> AsyncIterator[grpc.aio.Channel]:
    """A channel to a server of demo-llama-3.1 alone."""
    async with running_server(server_config(llama31_engines_dir)) as srv, \
            grpc.aio.insecure_channel(f"127.0.0.1:{srv.grpc_port}") as ch:  # type: ignore[attr-defined]
        yield ch


@pytest.fixture
def llama31_stub(llama31_channel: grpc.aio.Channel) -> chat_pb2_grpc.ChatServiceStub:
    return chat_pb2_grpc.ChatServiceStub(llama31_channel)


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
