"""`llmserve healthcheck`: exit 0 when a server answers SERVING to gRPC health, for container HEALTHCHECKs."""

from __future__ import annotations

import argparse
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default="127.0.0.1:50051")
    parser.add_argument("--service", default="", help="'' for the whole server, or llmserve.v1.ChatService")
    parser.add_argument("--timeout", type=float, default=2.0)


def main(args: argparse.Namespace) -> int:
    status = check(args.address, args.service, args.timeout)
    print(status)
    return 0 if status == "SERVING" else 1
