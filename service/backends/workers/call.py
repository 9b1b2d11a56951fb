"""One Generate call on one worker: its responses as Outputs, and the request's deadline and cancel.

A task per call reads the stream into a queue, where the deadline (a timer)
and a cancel put their own marks, so waiting for the next answer costs one
queue read rather than a task and a wait per token; answers that queued up
meanwhile are taken together. Ending a call early (a deadline, a cancel, a
consumer gone, a stop string found here first) sends the worker an Abort and
cancels the RPC: the Abort frees the request's KV on its next step whatever
the servicer does with a cancelled stream, and the cancel stops SGLang, whose
Abort names only the parent of n sub-requests. llmserve's count of requests on
the worker drops when the call ends, however it ends.
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
_END = object()       # the worker ended the stream


class WorkerCall:
    def __init__(self, worker: Worker, request: GenerationRequest, n: int, stop_token_ids: tuple[int, ...],
                 banned_token_ids: tuple[int, ...], vocab_size: int, spawn: Callable[[Any], None],
                 abort_timeout: float) -> None:
        self.worker = worker
        self.received = False     # a response came: the request started, so it is not retried elsewhere
        self._id = f"{request.request_id}-{secrets.token_hex(4)}"   # unique per attempt: Abort must name one call
        self._spawn = spawn
        self._abort_timeout = abort_timeout
        self._reader = worker.client.reader(request.sampling.logprobs)
        self._ended = False       # the worker ended the stream (its end, or an error status): nothing to abort
        self._open = True
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._held: Any = None    # a mark or error taken from the queue behind answers, for the next call
        worker.in_flight += 1
        self._call = worker.client.generate(WorkerRequest(request, self._id, n, stop_token_ids, banned_token_ids,
                                                                 vocab_size))
        self._reading = asyncio.ensure_future(self._read())
        self._timer = None if request.deadline is None else asyncio.get_running_loop().call_later(
            max(0.0, request.deadline - time.monotonic()), self._queue.put_nowait, DEADLINE)

    async def _read(self) -> None:
        try:
            async for response in self._call:
                self._queue.put_nowait(response)
            self._queue.put_nowait(_END)
        except grpc.aio.AioRpcError as e:
            self._queue.put_nowait(e)

    def cancel(self) -> None:
        """The request was aborted: next() says CANCELLED."""
        self._queue.put_nowait(CANCELLED)

    async def next(self) -> list[Output] | object | None:
        """The Outputs of the answers that came (at least one), None at the stream's end, or DEADLINE / CANCELLED;
        raises the worker's AioRpcError."""
        item, self._held = (self._held, None) if self._held is not None else (await self._queue.get(), None)
        outputs: list[Output] = []
        while True:
            if not (item is _END or item is DEADLINE or item is CANCELLED or isinstance(item, grpc.aio.AioRpcError)):
                self.received = True
                outputs += self._reader.outputs(item)
                if self._queue.empty():
                    return outputs
                item = self._queue.get_nowait()
                continue
            if outputs:   # the answers before it first, the mark (or the error) on the next call
                self._held = item
                return outputs
            if isinstance(item, grpc.aio.AioRpcError):
                self._ended = True
                raise item
            self._ended |= item is _END
            return None if item is _END else item

    def close(self) -> None:
        """Ends the call: unless the worker ended it, an Abort (in the background) and a cancel of the RPC."""
        if not self._open:
            return
        self._open = False
        self.worker.in_flight -= 1
        if self._timer is not None:
            self._timer.cancel()
        if not self._ended:
            self._spawn(self._abort())
            self._call.cancel()
        self._reading.cancel()

    async def _abort(self) -> None:
        try:
            await self.worker.client.abort(self._id, self._abort_timeout)
        except (grpc.aio.AioRpcError, TimeoutError) as e:
            log.debug("abort failed", extra={"worker": self.worker.name, "error": describe_error(e)})
