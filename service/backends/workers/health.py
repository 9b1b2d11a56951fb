"""Probing a model's workers: in rotation while they answer healthy, out when they do not, back when they do.

Every `interval` each worker gets its kind's HealthCheck and, where the kind
has one, GetLoads, each within `timeout`. A failed or unhealthy answer takes
it out of rotation at once (so does a request whose connection fails, see
engine.py); the next healthy answer brings it back, after its GetModelInfo
shows it still serves the model as llmserve knows it (same vocabulary, enough
context): a worker restarted on another checkpoint stays out, saying why.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import grpc

from service.backends.workers.protocol import ModelInfo
from service.backends.workers.worker import Worker

log = logging.getLogger("llmserve.workers")

# What a returning worker's model info is checked by: None if it may serve, else why not.
Admit = Callable[[ModelInfo], "str | None"]


def describe_error(e: BaseException) -> str:
    if isinstance(e, grpc.aio.AioRpcError):
        return f"{e.code().name}: {e.details()}"
    if isinstance(e, TimeoutError):
        return "no answer in time"
    return f"{type(e).__name__}: {e}"


class Prober:
    def __init__(self, model: str, workers: list[Worker], interval: float, timeout: float) -> None:
        self._model = model
        self._workers = workers
        self._interval = interval
        self._timeout = timeout
        self.admit: Admit = lambda info: None

    async def probe(self, worker: Worker) -> None:
        """One round for one worker: its health, then its load; the worker's state is updated either way."""
        try:
            ok, message = await worker.client.health(self._timeout)
            problem = None if ok else f"unhealthy: {message}"
            if ok and not worker.healthy:
                problem = self.admit(await worker.client.model_info(self._timeout))
            load = await worker.client.loads(self._timeout) if problem is None else None
        except (grpc.aio.AioRpcError, TimeoutError) as e:
            problem, load = describe_error(e), None
        worker.reported(load)
        if problem is None:
            self.up(worker, message or "healthy")
        else:
            self.down(worker, problem)

    def up(self, worker: Worker, detail: str) -> None:
        if not worker.healthy:
            log.info("worker in rotation", extra={"model": self._model, "worker": worker.name})
        worker.healthy, worker.detail = True, detail

    def down(self, worker: Worker, detail: str) -> None:
        if worker.healthy or worker.detail != detail:
            log.warning("worker out of rotation", extra={"model": self._model, "worker": worker.name,
                                                          "reason": detail})
        worker.healthy, worker.detail = False, detail

    async def first_healthy(self, deadline: float) -> Worker:
        """Probes every worker until one is healthy, for at most `deadline` seconds; raises TimeoutError."""
        loop = asyncio.get_running_loop()
        end = loop.time() + deadline
        while True:
            await asyncio.gather(*(self.probe(w) for w in self._workers))
            healthy = [w for w in self._workers if w.healthy]
            if healthy:
                return healthy[0]
            if loop.time() >= end:
                reasons = "; ".join(f"{w.name}: {w.detail}" for w in self._workers)
                raise TimeoutError(f"model {self._model!r}: no worker answered healthy in {deadline:.0f} s ({reasons})")
            await asyncio.sleep(min(self._interval, max(0.0, end - loop.time())))

    async def run(self) -> None:
        """Probes every worker every interval, until cancelled."""
        while True:
            await asyncio.sleep(self._interval)
            await asyncio.gather(*(self.probe(w) for w in self._workers))
