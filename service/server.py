"""The server's lifecycle: bind, load and warm up, serve, drain.

Settings that would serve something else than asked (mTLS without a
certificate, an empty API key) are refused before anything binds. Ports are
bound before the models load, so health checks answer NOT_SERVING during a
long load instead of connection refused; SIGTERM flips health to NOT_SERVING,
refuses new work and the requests still queued in the engines with
UNAVAILABLE, lets running streams finish within the grace period, ends what
is left with an error each (an error event and [DONE] on REST streams, 503 on
REST calls), then exits 0. An engine that fails for good flips health to
NOT_SERVING too, and its gauges read zero, so the orchestrator restarts the
replica and the autoscaler does not count work that will never finish.

gRPC health has three levels. "" is the process (liveness): SERVING unless
loading, draining or failed for good. Each model's name is that model:
SERVING while its engine can generate, which for a model served by gRPC
workers is while one of them is in rotation; that comes and goes with the
workers, and restarting llmserve would not help it. llmserve.v1.ChatService
(readiness, and /health/ready) is SERVING while the process is and at least
one model is: a replica whose models all lost their workers takes no traffic.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from service.admission import Admission, Phase
from service.backends.base import Engine
from service.chat.completions import ChatCompletions
from service.config import Config, startup_problems
from service.gen.llmserve.v1 import chat_pb2_grpc
from service.grpc_api import CHAT_SERVICE
from service.grpc_api.decode import DecodeErrorsAsInvalidArgument
from service.grpc_api.keys import ApiKeys
from service.grpc_api.reflection import enable_reflection
from service.grpc_api.servicer import ChatServicer
from service.logs import setup_logging
from service.metrics import ENGINE_GAUGES
from service.models.registry import ModelRegistry
from service.repository.manifest import ManifestError
from service.rest import app as rest
from service.worker_pool import WorkerPool

log = logging.getLogger("llmserve.server")

ENGINE_WATCH_INTERVAL = 0.25  # seconds between checks of the engines' health
# A worker thread checking a large schema (seconds of jsonschema) holds the GIL in slices; at CPython's default 5 ms
# the event loop waited up to that long at each of the many GIL takes a chunk costs, and streams stalled ~0.5 s.
GIL_SWITCH_INTERVAL = 0.0005
CUTOFF_SETTLE = 2.0  # seconds REST calls cut at the grace period's end get to write their error before HTTP stops
_STATUS = {True: health_pb2.HealthCheckResponse.SERVING, False: health_pb2.HealthCheckResponse.NOT_SERVING}


def _credentials(config: Config) -> grpc.ServerCredentials | None:
    s = config.server
    if not s.tls_cert or not s.tls_key:  # half a configuration is refused by startup_problems
        return None
    client_ca = s.tls_client_ca.read_bytes() if s.tls_client_ca else None
    return grpc.ssl_server_credentials([(s.tls_key.read_bytes(), s.tls_cert.read_bytes())],
                                       root_certificates=client_ca, require_client_auth=client_ca is not None)


class LlmServer:
    def __init__(self, config: Config, registry: ModelRegistry | None = None) -> None:
        if problems := startup_problems(config.server):
            raise SystemExit("cannot serve: " + "; ".join(problems))
        self.config = config
        self.admission = Admission(config.server.api_key)
        self.registry = registry or ModelRegistry(config)
        self.pool = WorkerPool(config.server.validation_threads)
        self.completions = ChatCompletions(self.registry, config.server, self.pool)
        self.health = HealthServicer()
        keys = ApiKeys(self.admission, config.server.open_reflection)
        self._grpc = grpc.aio.server(interceptors=[keys, DecodeErrorsAsInvalidArgument()], options=[
            ("grpc.max_receive_message_length", config.server.max_message_bytes),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
        ])
        chat_pb2_grpc.add_ChatServiceServicer_to_server(
            ChatServicer(self.completions, self.registry, self.admission, config.server, self.pool), self._grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._grpc)
        enable_reflection([CHAT_SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name], self._grpc)
        address = f"{config.server.host}:{config.server.grpc_port}"
        credentials = _credentials(config)
        self.grpc_port = (self._grpc.add_secure_port(address, credentials) if credentials
                          else self._grpc.add_insecure_port(address))
        self._http: rest.HttpServer | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._published: dict[str, bool] = {}

    def _engines(self) -> list[tuple[str, Engine]]:
        return [(m.name, m.engine) for m in self.registry]

    async def _set_phase(self, phase: Phase) -> None:
        self.admission.phase = phase
        await self._publish_health()

    async def _publish_health(self) -> None:
        """Sets the process's, the chat service's and each model's health status where it changed."""
        alive = self.admission.phase is Phase.SERVING
        models = self.registry.serving()
        statuses = {"": alive, CHAT_SERVICE: alive and any(models.values()),
                    **{name: alive and ok for name, ok in models.items()}}
        for service, ok in statuses.items():
            if self._published.get(service) is ok:
                continue
            if alive and service in models and service in self._published:
                (log.info if ok else log.warning)("model serving" if ok else "model not serving",
                                                  extra={"model": service})
            await self.health.set(service, _STATUS[ok])
            self._published[service] = ok

    async def start(self) -> None:
        sys.setswitchinterval(GIL_SWITCH_INTERVAL)
        await self._set_phase(Phase.LOADING)
        await self._grpc.start()
        if self.config.server.http_port:
            self._http = rest.HttpServer(self.config, self.completions, self.registry, self.admission, self.pool)
            await self._http.start()
        log.info("listening", extra={"grpc": self.grpc_port, "http": self.config.server.http_port})
        await self.registry.load()
        ENGINE_GAUGES.sources.append(self._engines)
        await self._set_phase(Phase.SERVING)
        self._watcher = asyncio.create_task(self._watch_engines())
        log.info("serving", extra={"models": self.registry.names})

    async def _watch_engines(self) -> None:
        """Runs until shutdown cancels it; engines report failure through health(), not by calling back. An engine
        that failed for good makes the process unhealthy; one that may recover (its workers) only its model."""
        while True:
            await asyncio.sleep(ENGINE_WATCH_INTERVAL)
            failed = {m.name: health.detail for m in self.registry
                      if not (health := m.engine.health()).ok and not health.recoverable}
            if failed and self.admission.phase is Phase.SERVING:
                log.error("engine failed; not serving any more", extra={"engines": failed})
                await self._set_phase(Phase.UNHEALTHY)
            else:
                await self._publish_health()

    async def shutdown(self) -> None:
        """Drains: running calls get the grace period to finish, then everything stops."""
        if self._watcher:
            self._watcher.cancel()
        await self._set_phase(Phase.DRAINING)
        self.completions.refuse_queued()
        deadline = time.monotonic() + self.config.server.grace_period
        unfinished = await self.admission.drain(self.config.server.grace_period)
        log.info("drained", extra={"unfinished": unfinished})
        await self._grpc.stop(max(0.0, deadline - time.monotonic()))
        await self.admission.settled(CUTOFF_SETTLE)
        if self._http:
            await self._http.stop()
        if self._engines in ENGINE_GAUGES.sources:
            ENGINE_GAUGES.sources.remove(self._engines)
        await self.registry.shutdown()
        self.pool.shutdown()


async def serve(config: Config, on_serving: Callable[[LlmServer], None] | None = None) -> int:
    """Runs until SIGTERM or SIGINT, then drains. `on_serving` sees the loaded server (the soak's fault injector)."""
    setup_logging(config.server.log_level)
    try:
        server = LlmServer(config)
    except ManifestError as e:
        log.error("cannot serve: %s", e, extra={"error": "ManifestError"})
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loading = asyncio.create_task(server.start())
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait({loading, stopped}, return_when=asyncio.FIRST_COMPLETED)
    if loading.done():
        if loading.exception() is not None:  # a model that cannot load: say why in one line, not a traceback
            error = loading.exception()
            log.error("cannot serve: %s", error, extra={"error": type(error).__name__})
            await server.shutdown()
            return 1
        if on_serving:
            on_serving(server)
        await stopped
    else:
        loading.cancel()
    log.info("shutting down", extra={"grace_period": config.server.grace_period})
    await server.shutdown()
    return 0
