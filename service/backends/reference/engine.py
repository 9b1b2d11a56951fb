"""The reference engine behind the async Engine interface.

The model loads and steps in one dedicated thread (torch releases the GIL in
its kernels, so the event loop keeps serving RPCs meanwhile). That thread is
the only one that ever runs torch: on a small machine a second thread's
OpenMP team spinning beside it makes every step about twice as slow
(measured here: 1.1 ms against 4 ms for a batch-1 step). Requests and aborts
reach that thread through a queue between steps; each step's events come back
to the event loop in a single call_soon_threadsafe, and are fanned out to the
per-request queues that `generate` streams from.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import torch
from transformers import AutoTokenizer

from service.backends.base import (
    Engine,
    EngineError,
    EngineHealth,
    EngineStats,
    Event,
    Finished,
    GenerationRequest,
    ProfileInfo,
    QueueFull,
)
from service.backends.reference.llm_engine import Emitted, LLMEngine, StepFailed
from service.config import EngineConfig
from service.manifest import ModelManifest

log = logging.getLogger(__name__)

_STOP = object()
MAX_CONSECUTIVE_FAILURES = 3


class ReferenceEngine(Engine):
    def __init__(self, manifest: ModelManifest, config: EngineConfig) -> None:
        self._manifest = manifest
        self._config = config
        self.tokenizer: Any = AutoTokenizer.from_pretrained(manifest.checkpoint)
        self._core: LLMEngine | None = None
        self._commands: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._streams: dict[str, asyncio.Queue[list[Event] | BaseException]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        # The waiting queue's length is (submitted - applied) + the scheduler's waiting groups; each counter
        # has a single writer (the event loop, the engine thread), so reading them needs no lock.
        self._submitted = 0
        self._applied = 0
        self._health = EngineHealth(False, "not started")
        self._profile: ProfileInfo | None = None

    @property
    def profile(self) -> ProfileInfo:
        assert self._profile is not None, "start() first"
        return self._profile

    @property
    def core(self) -> LLMEngine:
        assert self._core is not None, "start() first"
        return self._core

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        loaded: asyncio.Future[None] = self._loop.create_future()
        self._thread = threading.Thread(target=self._run, args=(loaded,), name=f"engine-{self._manifest.name}",
                                        daemon=True)
        self._thread.start()
        await loaded
        device = self.core.device
        arch = "cpu"
        if device.type == "cuda":
            major, minor = torch.cuda.get_device_capability(device)
            arch = f"sm{major}{minor}"
        precision = str(self.core.dtype).removeprefix("torch.")
        self._profile = ProfileInfo(f"reference-{arch}-{precision}", arch, precision)
        self._health = EngineHealth(True)

    # -- the engine thread -------------------------------------------------------------------------------

    def _load(self, loaded: asyncio.Future[None]) -> bool:
        assert self._loop is not None
        try:
            if self._config.threads:
                torch.set_num_threads(self._config.threads)
            self._core = LLMEngine(self._manifest.checkpoint, self.tokenizer, self._config)
        except Exception as e:
            self._loop.call_soon_threadsafe(loaded.set_exception, e)
            return False
        self._loop.call_soon_threadsafe(loaded.set_result, None)
        return True

    def _run(self, loaded: asyncio.Future[None]) -> None:
        if not self._load(loaded):
            return
        try:
            self._loop_steps()
        except Exception as e:  # a bug outside a step: nothing can be trusted any more, so say so everywhere
            log.exception("engine loop died")
            self._health = EngineHealth(False, f"engine loop died: {type(e).__name__}: {e}")
            self._fail_all(EngineError(self._health.detail, fatal=True))

    def _loop_steps(self) -> None:
        core = self.core
        failures = 0
        while True:
            out: Emitted = []
            try:
                # Block while nothing runs: indefinitely when idle, briefly (for deadlines) when requests wait.
                running = bool(core.scheduler.running)
                command = self._commands.get(block=not running, timeout=0.05 if core.has_work() else None)
            except queue.Empty:
                command = None
            while command is not None:
                if command is _STOP:
                    self._fail_all(EngineError("the engine shut down"))
                    return
                out += self._apply(command)
                try:
                    command = self._commands.get_nowait()
                except queue.Empty:
                    command = None
            out += core.expire(time.monotonic())
            try:
                out += core.step()
                failures = 0
            except StepFailed as e:
                failures += 1
                log.exception("engine step failed", extra={"requests": sorted(e.request_ids)})
                core.fail(e.request_ids)
                self._post([(rid, e) for rid in e.request_ids])
                if e.fatal or failures >= MAX_CONSECUTIVE_FAILURES:
                    why = "fatal engine error" if e.fatal else f"{failures} consecutive step failures"
                    self._health = EngineHealth(False, f"{why}: {e}")
                    self._fail_all(EngineError(str(e), fatal=True))
                    return
            if out:
                self._post(out)

    def _apply(self, command: tuple[str, Any]) -> Emitted:
        kind, arg = command
        if kind == "add":
            self._applied += 1
            return self.core.add(arg)
        return self.core.abort(arg)

    def _post(self, events: list[tuple[str, Event | BaseException]]) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # a closed event loop: nobody is listening any more
            self._loop.call_soon_threadsafe(self._dispatch, events)

    def _fail_all(self, error: EngineError) -> None:
        """Fails every stream open when the event loop gets to it. Health is already not ok by then, so a request
        submitted later is refused by `generate`, and none can slip in between and wait forever."""
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # a closed event loop: nobody is listening any more
            self._loop.call_soon_threadsafe(self._fail_streams, error)

    def _fail_streams(self, error: EngineError) -> None:
        for stream in self._streams.values():
            stream.put_nowait(error)

    # -- the event loop side -----------------------------------------------------------------------------

    def _dispatch(self, events: list[tuple[str, Event | BaseException]]) -> None:
        batches: dict[str, list[Event]] = {}
        for request_id, event in events:
            stream = self._streams.get(request_id)
            if stream is None:
                continue
            if isinstance(event, BaseException):
                stream.put_nowait(event)
            else:
                batches.setdefault(request_id, []).append(event)
        for request_id, batch in batches.items():
            self._streams[request_id].put_nowait(batch)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Event]:
        if not self._health.ok:
            raise EngineError(f"engine unavailable: {self._health.detail}", fatal=True)
        if request.guided is not None:  # compiling a grammar takes milliseconds to seconds: off the event loop
            await asyncio.to_thread(self.core.guides.check, request.guided)
        self.core.check(request)
        waiting = self._queued()
        if waiting >= self._config.max_queue:
            raise QueueFull(f"{waiting} requests are already waiting (--max-queue {self._config.max_queue})")
        self._submitted += 1
        if request.request_id in self._streams:
            request.request_id = f"{request.request_id}-{id(request):x}"
        stream: asyncio.Queue[list[Event] | BaseException] = asyncio.Queue()
        self._streams[request.request_id] = stream
        self._commands.put(("add", request))
        finished = 0
        try:
            while finished < request.n:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                for event in item:
                    if isinstance(event, Finished):
                        finished += 1
                    yield event
        finally:
            del self._streams[request.request_id]
            if finished < request.n and self._thread and self._thread.is_alive():
                self._commands.put(("abort", request.request_id))

    async def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    def _waiting(self) -> int:
        return self._submitted - self._applied + len(self.core.scheduler.waiting)

    def _queued(self) -> int:
        """Requests that will have to wait: those not running, less the running slots still free for them."""
        free = max(0, self.core.scheduler.max_running - len(self.core.scheduler.running))
        return max(0, self._waiting() - free)

    def stats(self) -> EngineStats:
        core = self._core
        if core is None:
            return EngineStats(0, 0, 0, 0)
        blocks = core.scheduler.blocks
        return EngineStats(len(core.scheduler.running), self._waiting(), blocks.used, blocks.num_blocks,
                           blocks.hit_rate)

    def health(self) -> EngineHealth:
        return self._health

    async def shutdown(self) -> None:
        self._health = EngineHealth(False, "shutting down")  # before the stop, so no request is added after it
        if self._thread and self._thread.is_alive():
            self._commands.put(_STOP)
            await asyncio.to_thread(self._thread.join, 30)
        self._health = EngineHealth(False, "shut down")
