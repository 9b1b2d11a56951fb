"""Grammars compiled off the step loop: a request whose grammar is new waits here until it is ready.

Compiling a large schema takes seconds (2,500 properties with patterns: ~10 s
on a loaded 2-core machine); done inside the step loop, it stopped every
stream for that long. Here it runs on a few daemon threads of the engine's
process, at a lower CPU priority than the step loop (xgrammar releases the GIL
while compiling), and the loop admits the request once its grammar is in the
cache. Requests for a constraint already compiling wait on that compilation.

Bounds: at most `threads` compilations at once; one running past `timeout`
seconds refuses its requests (INVALID_ARGUMENT naming the field) and so does
every later request for the same constraint, without compiling it again. A
thread cannot be stopped, so it finishes in the background and its result is
dropped; the serving layer's size limit (--max-schema-bytes) is what bounds
how long that takes and how much memory it holds.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from service.backends.base import GenerationRequest, GuidedDecoding, InvalidRequest
from service.backends.grammar import Grammar, GrammarCache

TOO_SLOW_REMEMBERED = 1024
BACKGROUND_NICENESS = 10


@dataclass
class _Job:
    guided: GuidedDecoding
    requests: list[GenerationRequest] = field(default_factory=list)
    started: float | None = None
    result: Grammar | InvalidRequest | None = None
    done: bool = False


class Compiling:
    def __init__(self, grammars: GrammarCache, threads: int, timeout: float) -> None:
        self._grammars = grammars
        self._timeout = timeout
        self._jobs: dict[GuidedDecoding, _Job] = {}
        self._too_slow: OrderedDict[GuidedDecoding, None] = OrderedDict()
        self._queue: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._lock = threading.Lock()
        for i in range(max(1, threads)):
            threading.Thread(target=self._work, name=f"grammar-{i}", daemon=True).start()

    def __len__(self) -> int:
        """Requests waiting for a grammar."""
        return sum(len(job.requests) for job in self._jobs.values())

    def submit(self, request: GenerationRequest) -> None:
        guided = request.guided
        assert guided is not None
        if guided in self._too_slow:
            raise self._slow_error(guided)
        job = self._jobs.get(guided)
        if job is None:
            job = self._jobs[guided] = _Job(guided)
            self._queue.put(job)
        job.requests.append(request)

    def _work(self) -> None:
        with contextlib.suppress(OSError, AttributeError):  # lower than the step loop's priority, where allowed
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICENESS)
        while True:
            job = self._queue.get()
            with self._lock:
                job.started = time.monotonic()
            try:
                result: Grammar | InvalidRequest = self._grammars.build(job.guided)
            except InvalidRequest as e:
                result = e
            except Exception as e:  # xgrammar failing on input it accepted when checked: this request's problem
                result = InvalidRequest(job.guided.field, f"cannot compile the constraint: {type(e).__name__}: {e}")
            with self._lock:
                job.result, job.done = result, True

    def ready(self, now: float) -> list[tuple[GenerationRequest, Grammar | InvalidRequest]]:
        """Requests whose grammar is now compiled (and cached), or refused: compiled badly or timed out."""
        out: list[tuple[GenerationRequest, Grammar | InvalidRequest]] = []
        for guided, job in list(self._jobs.items()):
            with self._lock:
                done, started, result = job.done, job.started, job.result
            if done:
                assert result is not None
                if isinstance(result, Grammar):
                    self._grammars.put(guided, result)
            elif started is not None and now - started > self._timeout:
                self._too_slow[guided] = None
                while len(self._too_slow) > TOO_SLOW_REMEMBERED:
                    self._too_slow.popitem(last=False)
                result = self._slow_error(guided)
            else:
                continue
            del self._jobs[guided]
            out += [(request, result) for request in job.requests]
        return out

    def _slow_error(self, guided: GuidedDecoding) -> InvalidRequest:
        return InvalidRequest(guided.field, f"too complex: compiling it took longer than {self._timeout:g} s "
                                            "(--grammar-compile-timeout)")

    def remove(self, request_id: str) -> GenerationRequest | None:
        for job in self._jobs.values():
            for request in job.requests:
                if request.request_id == request_id:
                    job.requests.remove(request)
                    return request
        return None

    def expired(self, now: float) -> list[GenerationRequest]:
        out = [r for job in self._jobs.values() for r in job.requests if r.deadline is not None and now >= r.deadline]
        for request in out:
            self.remove(request.request_id)
        return out
