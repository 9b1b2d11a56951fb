"""Real vLLM gRPC workers for the session, and llmserve servers in front of them.

Two workers start together, once, on the demo checkpoint (the locked venv `make vllm-worker` installs):
the feature tests use the first, the routing and failover tests both. They are killed at the end.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest

from bench.vllm_worker import INSTALL_LOG, VENV, VllmWorker, installed
from service.gen.llmserve.v1 import chat_pb2_grpc
from tests.helpers import running_server, worker_config


@pytest.fixture(scope="session")
def vllm_workers(engines_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[VllmWorker]]:
    if not installed():
        pytest.skip(f"the vLLM worker's venv ({VENV}) is not installed: `make vllm-worker` installs it from "
                    f"requirements-vllm-worker.lock; its last attempt is logged in {INSTALL_LOG}")
    logs = tmp_path_factory.mktemp("vllm-workers")
    workers = [VllmWorker((engines_dir / "demo" / "checkpoint").resolve(), logs / f"worker-{i}.log")
               for i in range(2)]
    try:
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.wait_ready()
        yield workers
    finally:
        for worker in workers:
            worker.stop()


@pytest.fixture(scope="session")
def vllm_worker(vllm_workers: list[VllmWorker]) -> VllmWorker:
    return vllm_workers[0]


@pytest.fixture(scope="session")
async def gateway(engines_dir: Path, vllm_worker: VllmWorker) -> AsyncIterator[object]:
    """llmserve serving `demo` through the first vLLM worker (the folder gives its tokenizer and template)."""
    async with running_server(worker_config(engines_dir, f"demo={vllm_worker.address}")) as server:
        yield server


@pytest.fixture(scope="session")
async def gateway_stub(gateway: object) -> AsyncIterator[chat_pb2_grpc.ChatServiceStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel:  # type: ignore[attr-defined]
        yield chat_pb2_grpc.ChatServiceStub(channel)
