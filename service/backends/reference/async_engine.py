"""The reference engine behind the async Engine interface.

The model, its KV cache and the step loop (engine_loop.py) live either in a
process of their own (the default, `--engine-process`: see process.py
for why) or in one dedicated thread of the server's process (what tests use
to reach into the engine). Either way a single thread runs torch: on a small
machine a second thread's OpenMP team spinning beside it makes every step
about twice as slow (measured here: 1.1 ms against 4 ms for a batch-1 step).
Requests and aborts reach the loop between steps; each step's events come
back to the event loop in one batch and are fanned out to the per-request
queues that `generate` streams from.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import queue
import threading
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
    StructuredOutputSupport,
)
from service.backends.reference.core import EngineCore
from service.backends.reference.loop import STOP, Command, EngineLoop, Posted
from service.backends.reference.process import Snapshot, engine_threads, profile_of, run_process, snapshot
from service.config import EngineConfig
from service.repository.manifest import ModelManifest

log = logging.getLogger("llmserve.engine.reference")


class ReferenceEngine(Engine):
    def __init__(self, manifest: ModelManifest, config: EngineConfig) -> None:
        self._manifest = manifest
        self._config = config
        self.tokenizer: Any = AutoTokenizer.from_pretrained(manifest.checkpoint)
        self._core: EngineCore | None = None       # thread mode
        self._loop_state: EngineLoop | None = None
        self._commands: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._process: multiprocessing.process.BaseProcess | None = None  # process mode
        self._conn: Any = None
        self._snapshot: Snapshot | None = None
        self._streams: dict[str, asyncio.Queue[list[Event] | BaseException]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        # The waiting queue's length is (submitted - applied) + the scheduler's waiting groups; each counter
        # has a single writer (the event loop, the engine loop), so reading them needs no lock.
        self._submitted = 0
        self._health = EngineHealth(False, "not started")
        self._profile: ProfileInfo | None = None

    @property
    def profile(self) -> ProfileInfo:
        assert self._profile is not None, "start() first"
        return self._profile

    @property
    def structured_output(self) -> StructuredOutputSupport:
        return StructuredOutputSupport(closes_within_max_tokens=True)

    @property
    def core(self) -> EngineCore:
        """The engine's internals, reachable in thread mode only (tests inspect and instrument them)."""
        assert self._core is not None, "start() first, with --no-engine-process"
        return self._core

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        loaded: asyncio.Future[ProfileInfo] = self._loop.create_future()
        if self._config.engine_process:
            context = multiprocessing.get_context("spawn")  # never fork a process that has threads and torch
            self._conn, child = context.Pipe()
            self._process = context.Process(target=run_process, args=(child, self._manifest, self._config),
                                            name=f"engine-{self._manifest.name}", daemon=True)
            self._process.start()
            child.close()
            target: Any = self._read
        else:
            target = self._run
        self._thread = threading.Thread(target=target, args=(loaded,), name=f"engine-{self._manifest.name}",
                                        daemon=True)
        self._thread.start()
        self._profile = await loaded
        self._health = EngineHealth(True)

    # -- thread mode: the loop runs here -----------------------------------------------------------------------

    def _run(self, loaded: asyncio.Future[ProfileInfo]) -> None:
        assert self._loop is not None
        try:
            torch.set_num_threads(engine_threads(self._config))
            self._core = EngineCore(self._manifest.checkpoint, self.tokenizer, self._config)
        except Exception as e:
            self._loop.call_soon_threadsafe(loaded.set_exception, e)
            return
        self._loop.call_soon_threadsafe(loaded.set_result, profile_of(self._core))
        self._loop_state = EngineLoop(self._core, self._receive, self._post, self._fail)
        try:
            self._loop_state.run()
        except Exception as e:  # a bug outside a step: nothing can be trusted any more, so say so everywhere
            log.exception("engine loop died")
            self._fail(EngineError(f"engine loop died: {type(e).__name__}: {e}", fatal=True))

    def _receive(self, timeout: float | None) -> Command | None:
        try:
            return self._commands.get(timeout=timeout) if timeout != 0 else self._commands.get_nowait()
        except queue.Empty:
            return None

    # -- process mode: this thread reads what the engine process sends -----------------------------------------

    def _read(self, loaded: asyncio.Future[ProfileInfo]) -> None:
        assert self._loop is not None and self._conn is not None
        try:
            kind, value = self._conn.recv()
        except (EOFError, OSError):
            kind, value = "load_failed", f"the engine process exited (code {self._exit_code()})"
        if kind == "load_failed":
            self._loop.call_soon_threadsafe(loaded.set_exception, RuntimeError(f"engine failed to load: {value}"))
            return
        self._loop.call_soon_threadsafe(loaded.set_result, value)
        while True:
            try:
                kind, value, self._snapshot = self._conn.recv()
            except (EOFError, OSError):
                if self._health.ok:  # not a shutdown: the engine process died
                    self._fail(EngineError(f"the engine process died (exit code {self._exit_code()})", fatal=True))
                return
            if kind == "events":
                self._post(value)
            else:
                self._fail(value)
                return

    def _exit_code(self) -> int | None:
        assert self._process is not None
        self._process.join(5)
        return self._process.exitcode

    def _send(self, command: Command) -> None:
        if self._conn is None:
            self._commands.put(command)
            return
        with contextlib.suppress(OSError):  # the engine process is gone; its reader fails the streams
            self._conn.send(command)

    # -- both modes -----------------------------------------------------------------------------------------

    def _post(self, events: Posted) -> None:
        assert self._loop is not None
        if not events:
            return
        with contextlib.suppress(RuntimeError):  # a closed event loop: nobody is listening any more
            self._loop.call_soon_threadsafe(self._dispatch, events)

    def _fail(self, error: EngineError) -> None:
        """Fails every stream open when the event loop gets to it. A fatal error marks the engine unhealthy
        first, so a request submitted later is refused by `generate`, and none can slip in and wait forever."""
        assert self._loop is not None
        if error.fatal:
            self._health = EngineHealth(False, str(error))
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._fail_streams, error)

    def _fail_streams(self, error: EngineError) -> None:
        for stream in self._streams.values():
            stream.put_nowait(error)

    def _dispatch(self, events: Posted) -> None:
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
        waiting = self._queued()
        if waiting >= self._config.max_queue:
            raise QueueFull(f"{waiting} requests are already waiting (--max-queue {self._config.max_queue})")
        self._submitted += 1
        if request.request_id in self._streams:
            request.request_id = f"{request.request_id}-{id(request):x}"
        stream: asyncio.Queue[list[Event] | BaseException] = asyncio.Queue()
        self._streams[request.request_id] = stream
        self._send(("add", request))
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
            if finished < request.n and self._health.ok:
                self._send(("abort", request.request_id))

    async def abort(self, request_id: str) -> None:
        self._send(("abort", request_id))

    def _counters(self) -> Snapshot:
        if self._core is not None:
            return snapshot(self._core, self._loop_state.applied if self._loop_state else 0)
        return self._snapshot or Snapshot(0, 0, 0, 0, 0, 0.0, self._config.max_running)

    def _queued(self) -> int:
        """Requests that will have to wait: those not running, less the running slots still free for them."""
        c = self._counters()
        return max(0, self._submitted - c.applied + c.waiting - max(0, c.max_running - c.running))

    def stats(self) -> EngineStats:
        c = self._counters()
        return EngineStats(c.running, self._submitted - c.applied + c.waiting, c.kv_blocks_used, c.kv_blocks_total,
                           c.prefix_cache_hit_rate)

    def health(self) -> EngineHealth:
        return self._health

    async def shutdown(self) -> None:
        self._health = EngineHealth(False, "shutting down")  # before the stop, so no request is added after it
        if self._thread and self._thread.is_alive():
            self._send(STOP)
            await asyncio.to_thread(self._thread.join, 30)
        if self._process is not None:
            await asyncio.to_thread(self._process.join, 10)
            if self._process.is_alive():
                self._process.kill()
            self._conn.close()
        self._health = EngineHealth(False, "shut down")
