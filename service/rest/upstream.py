"""`llmserve rest --upstream HOST:PORT`: the REST shim alone, in front of a remote llmserve's gRPC API.

One shim can then front any replica. The caller's Authorization header and
request id travel as gRPC metadata, the caller's timeout as the call's
deadline; the upstream's status and BadRequest field violations come back as
the same ServiceError the in-process path raises, so errors map to HTTP by the
same table. Closing the HTTP stream cancels the gRPC call, which aborts the
generation upstream. With --upstream-ca the shim reaches its upstream over TLS
(presenting --upstream-cert under mutual TLS); its own port takes the same
--tls-* flags as the server's.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator

import grpc
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from service.admission import Admission, Call, Phase
from service.config import Config, ServerConfig, startup_problems
from service.errors import FieldViolation, ServiceError
from service.gen.llmserve.v1 import chat_pb2, chat_pb2_grpc
from service.grpc_api import CHAT_SERVICE
from service.logs import setup_logging
from service.worker_pool import WorkerPool

log = logging.getLogger("llmserve.rest.upstream")

def upstream_error(error: grpc.aio.AioRpcError) -> ServiceError:
    violations: list[FieldViolation] = []
    status = rpc_status.from_call(error)
    for detail in status.details if status else ():
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            violations += [FieldViolation(v.field, v.description) for v in bad.field_violations]
    return ServiceError(error.code(), error.details() or error.code().name.lower(), tuple(violations))


def _channel(config: ServerConfig) -> grpc.aio.Channel:
    options = [("grpc.max_send_message_length", config.max_message_bytes),
               ("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    if not config.upstream_ca:
        return grpc.aio.insecure_channel(config.upstream, options=options)
    credentials = grpc.ssl_channel_credentials(
        config.upstream_ca.read_bytes(),
        config.upstream_key.read_bytes() if config.upstream_key else None,
        config.upstream_cert.read_bytes() if config.upstream_cert else None)
    return grpc.aio.secure_channel(config.upstream, credentials, options=options)


class UpstreamBackend:
    def __init__(self, config: ServerConfig) -> None:
        self._channel = _channel(config)
        self._stub = chat_pb2_grpc.ChatServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self.admission = Admission()  # keys and the model's state are the upstream's to judge: only this shim's drain
        self.admission.phase = Phase.SERVING

    @staticmethod
    def _metadata(call: Call) -> tuple[tuple[str, str], ...]:
        if call.authorization:
            return ("x-request-id", call.request_id), ("authorization", call.authorization)
        return (("x-request-id", call.request_id),)

    def admit(self, call: Call) -> None:
        """The upstream judges the key; one that cannot travel as gRPC metadata (printable ASCII) is no key."""
        if not all(" " <= ch <= "~" for ch in call.authorization):
            raise ServiceError(grpc.StatusCode.UNAUTHENTICATED, "invalid API key: the Authorization header must be "
                                                                "printable ASCII")
        self.admission.admit()

    async def create(self, req: chat_pb2.ChatCompletionRequest, call: Call) -> chat_pb2.ChatCompletion:
        with self.admission.tracked():
            try:
                return await self._stub.CreateChatCompletion(req, metadata=self._metadata(call), timeout=call.timeout)
            except grpc.aio.AioRpcError as e:
                raise upstream_error(e) from None

    async def stream(self, req: chat_pb2.ChatCompletionRequest,
                     call: Call) -> AsyncIterator[chat_pb2.ChatCompletionChunk]:
        with self.admission.tracked():
            rpc = self._stub.StreamChatCompletion(req, metadata=self._metadata(call), timeout=call.timeout)
            try:
                async for chunk in rpc:
                    yield chunk
            except grpc.aio.AioRpcError as e:
                raise upstream_error(e) from None
            finally:
                rpc.cancel()

    async def list_models(self, call: Call) -> chat_pb2.ListModelsResponse:
        try:
            return await self._stub.ListModels(chat_pb2.ListModelsRequest(), metadata=self._metadata(call),
                                               timeout=call.timeout)
        except grpc.aio.AioRpcError as e:
            raise upstream_error(e) from None

    async def readiness(self) -> tuple[bool, str]:
        if self.admission.phase is not Phase.SERVING:
            return False, self.admission.phase.value
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
    from service.rest.app import RestServer

    setup_logging(config.server.log_level)
    if not config.server.upstream:
        raise SystemExit("llmserve rest needs --upstream HOST:PORT (or LLMSERVE_UPSTREAM)")
    if problems := startup_problems(config.server):
        raise SystemExit("cannot serve: " + "; ".join(problems))
    backend = UpstreamBackend(config.server)
    pool = WorkerPool(config.server.validation_threads)
    server = RestServer(config.server, backend, pool)
    await server.start()
    log.info("listening", extra={"http": config.server.http_port, "upstream": config.server.upstream})
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    unfinished = await backend.admission.drain(config.server.grace_period)
    log.info("drained", extra={"unfinished": unfinished})
    await backend.admission.settled(2.0)
    await server.stop()
    await backend.close()
    pool.shutdown()
    return 0
