"""One Generate call on one worker: its responses as Outputs, raced against the request's deadline and cancel.

Ending a call early (a deadline, a cancel, a consumer gone, a stop string
found here first) sends the worker an Abort and cancels the RPC: the Abort
frees the request's KV on its next step whatever the servicer does with a
cancelled stream, and the cancel stops SGLang, whose Abort names only the
parent of n sub-requests. llmserve's count of requests on the worker drops
when the call ends, however it ends.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any

import grpc

from service.backends.base import GenerationRequest
from service.backends.workers.health import describe_error
from service.backends.workers.protocol import Output, WorkerRequest
from service.backends.workers.worker import Worker

log = logging.getLogger("llmserve.workers")

DEADLINE = object()   # what next() returns when the request's deadline passed
CANCELLED = object()  # ... and when the request was aborted


class WorkerCall:
    def __init__(self, worker: Worker, request: GenerationRequest, n: int, stop_token_ids: tuple[int, ...],
                 banned_token_ids: tuple[int, ...], cancelled: asyncio.Event, spawn: Callable[[Any], None],
                 abort_timeout: float) -> None:
        self.worker = worker
        self.received = False     # a response came: the request started, so it is not retried elsewhere
        self._id = f"{request.request_id}-{secrets.token_hex(4)}"   # unique per attempt: Abort must name one call
        self._deadline = request.deadline
        self._spawn = spawn
        self._abort_timeout = abort_timeout
        self._reader = worker.client.reader(request.sampling.logprobs)
        self._ended = False       # the worker ended the stream (its end, or an error status): nothing to abort
        self._open = True
        worker.in_flight += 1
        self._stop = asyncio.ensure_future(cancelled.wait())
        self._call = worker.client.generate(WorkerRequest(request, self._id, n, stop_token_ids, banned_token_ids))

    async def next(self) -> list[Output] | object | None:
        """The next response's Outputs, None at the stream's end, or DEADLINE / CANCELLED; raises AioRpcError."""
        read = asyncio.ensure_future(self._call.read())
        timeout = None if self._deadline is None else max(0.0, self._deadline - time.monotonic())
        try:
            done, _ = await asyncio.wait({read, self._stop}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:   # also when the caller itself is cancelled: nothing is left reading the call
            if not read.done():
                read.cancel()
        if read in done:
            try:
                response = read.result()
            except grpc.aio.AioRpcError:
                self._ended = True
                raise
            if response is grpc.aio.EOF:
                self._ended = True
                return None
            self.received = True
            return self._reader.outputs(response)
        return CANCELLED if self._stop in done else DEADLINE

    def close(self) -> None:
        """Ends the call: unless the worker ended it, an Abort (in the background) and a cancel of the RPC."""
        if not self._open:
            return
        self._open = False
        self.worker.in_flight -= 1
        self._stop.cancel()
        if not self._ended:
            self._spawn(self._abort())
            self._call.cancel()

    async def _abort(self) -> None:
        try:
            await self.worker.client.abort(self._id, self._abort_timeout)
        except (grpc.aio.AioRpcError, TimeoutError) as e:
            log.debug("abort failed", extra={"worker": self.worker.name, "error": describe_error(e)})
