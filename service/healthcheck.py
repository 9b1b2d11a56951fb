"""`llmserve healthcheck`: exit 0 when a server answers SERVING to gRPC health, for container HEALTHCHECKs; with
--worker, when a gRPC worker's own HealthCheck says healthy (TensorRT-LLM's worker serves no grpc.health.v1, so a
Kubernetes probe of it runs this)."""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import time
from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(address: str, service: str = "", timeout: float = 2.0) -> str:
    """The status name the server reports, or the gRPC error code when it does not answer."""
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                              timeout=timeout)
        except grpc.RpcError as e:
            return e.code().name  # type: ignore[attr-defined]
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def wait_serving(address: str, process: subprocess.Popen[Any], timeout: float,
                 detail: Callable[[], str] | None = None) -> None:
    """Polls health until the server started as `process` says SERVING. Loading a model takes seconds to minutes;
    a server that exits meanwhile is reported at once (with `detail()`, e.g. its log), not waited out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with code {process.returncode} before serving"
                               + (f": {detail()}" if detail else ""))
        if check(address, timeout=1) == "SERVING":
            return
        time.sleep(0.1)
    raise TimeoutError(f"the server at {address} was not SERVING after {timeout:.0f} s")


async def check_worker(address: str, timeout: float) -> str:
    """SERVING, or why not: the worker's own words, or the gRPC error code."""
    from service.backends.workers.address import parse_address
    from service.backends.workers.kinds import CLIENTS

    worker = parse_address(address)
    async with grpc.aio.insecure_channel(worker.target) as channel:
        try:
            ok, message = await CLIENTS[worker.kind](worker, channel).health(timeout)
        except grpc.aio.AioRpcError as e:
            return e.code().name
    return "SERVING" if ok else f"NOT_SERVING: {message}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default="127.0.0.1:50051")
    parser.add_argument("--service", default="", help="'' for the process, llmserve.v1.ChatService for readiness, or "
                        "a model's name for that model")
    parser.add_argument("--worker", help="check this gRPC worker instead, KIND://HOST:PORT, by its own HealthCheck")
    parser.add_argument("--timeout", type=float, default=2.0)


def main(args: argparse.Namespace) -> int:
    if args.worker:
        status = asyncio.run(check_worker(args.worker, args.timeout))
    else:
        status = check(args.address, args.service, args.timeout)
    print(status)
    return 0 if status == "SERVING" else 1
