"""`llmserve rest --upstream HOST:PORT`: the REST shim alone, in front of a remote llmserve's gRPC API.

One shim can then front any replica. The caller's Authorization header and
request id travel as gRPC metadata, the caller's timeout as the call's
deadline; the upstream's status and BadRequest field violations come back as
the same ServiceError the in-process path raises, so errors map to HTTP by the
same table. Closing the HTTP stream cancels the gRPC call, which aborts the
generation upstream.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import AsyncIterator

import grpc
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from service.chat_backend import Caller
from service.config import Config
from service.errors import FieldViolation, ServiceError
from service.gen.llmserve.v1 import chat_pb2, chat_pb2_grpc
from service.logs import setup_logging

log = logging.getLogger(__name__)

CHAT_SERVICE = chat_pb2.DESCRIPTOR.services_by_name["ChatService"].full_name


def upstream_error(error: grpc.aio.AioRpcError) -> ServiceError:
    violations: list[FieldViolation] = []
    status = rpc_status.from_call(error)
    for detail in status.details if status else ():
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            violations += [FieldViolation(v.field, v.description) for v in bad.field_violations]
    return ServiceError(error.code(), error.details() or error.code().name.lower(), tuple(violations))


class UpstreamBackend:
    def __init__(self, address: str, max_message_bytes: int) -> None:
        self._channel = grpc.aio.insecure_channel(address, options=[
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
        ])
        self._stub = chat_pb2_grpc.ChatServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self.draining = False
        self.in_flight = 0

    @staticmethod
    def _metadata(caller: Caller) -> tuple[tuple[str, str], ...]:
        if caller.authorization:
            return ("x-request-id", caller.request_id), ("authorization", caller.authorization)
        return (("x-request-id", caller.request_id),)

    def admit(self, caller: Caller) -> None:
        """Keys, loading and draining are the upstream's to judge; only this shim's own drain is checked here."""
        if self.draining:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, "the shim is shutting down; retry on another replica")

    async def create(self, req: chat_pb2.ChatCompletionRequest, caller: Caller) -> chat_pb2.ChatCompletion:
        self.in_flight += 1
        try:
            return await self._stub.CreateChatCompletion(req, metadata=self._metadata(caller), timeout=caller.timeout)
        except grpc.aio.AioRpcError as e:
            raise upstream_error(e) from None
        finally:
            self.in_flight -= 1

    async def stream(self, req: chat_pb2.ChatCompletionRequest,
                     caller: Caller) -> AsyncIterator[chat_pb2.ChatCompletionChunk]:
        self.in_flight += 1
        call = self._stub.StreamChatCompletion(req, metadata=self._metadata(caller), timeout=caller.timeout)
        try:
            async for chunk in call:
                yield chunk
        except grpc.aio.AioRpcError as e:
            raise upstream_error(e) from None
        finally:
            call.cancel()
            self.in_flight -= 1

    async def list_models(self, caller: Caller) -> chat_pb2.ListModelsResponse:
        try:
            return await self._stub.ListModels(chat_pb2.ListModelsRequest(), metadata=self._metadata(caller),
                                               timeout=caller.timeout)
        except grpc.aio.AioRpcError as e:
            raise upstream_error(e) from None

    async def readiness(self) -> tuple[bool, str]:
        if self.draining:
            return False, "draining"
        try:
            reply = await self._health.Check(health_pb2.HealthCheckRequest(service=CHAT_SERVICE), timeout=2)
        except grpc.aio.AioRpcError as e:
            return False, f"upstream {e.code().name.lower()}"
        serving = reply.status == health_pb2.HealthCheckResponse.SERVING
        return serving, "serving" if serving else "upstream not serving"

    async def close(self) -> None:
        await self._channel.close()


async def serve_rest(config: Config) -> int:
    """Runs until SIGTERM or SIGINT, then refuses new requests and gives running ones the grace period."""
    from service.rest import RestServer

    setup_logging(config.server.log_level)
    if not config.server.upstream:
        raise SystemExit("llmserve rest needs --upstream HOST:PORT (or LLMSERVE_UPSTREAM)")
    backend = UpstreamBackend(config.server.upstream, config.server.max_message_bytes)
    server = RestServer(config.server, backend)
    await server.start()
    log.info("listening", extra={"http": config.server.http_port, "upstream": config.server.upstream})
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    backend.draining = True
    deadline = time.monotonic() + config.server.grace_period
    while backend.in_flight and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    log.info("drained", extra={"unfinished": backend.in_flight})
    await server.stop()
    await backend.close()
    return 0
