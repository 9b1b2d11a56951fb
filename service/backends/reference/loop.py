"""The engine loop: commands in, one step, events out, until told to stop.

The same loop runs in a process of its own or in a thread of the server's
process (engine.py); only how commands arrive and events leave differs, so
both modes admit, step, fail and stop identically.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from service.backends.base import EngineError, InvalidRequest
from service.backends.reference.core import EngineCore, Posted, StepFailed

log = logging.getLogger("llmserve.engine.reference")

STOP = ("stop", None)
MAX_CONSECUTIVE_FAILURES = 3
COMPILE_POLL = 0.01  # seconds between looks at compiling grammars while nothing runs

Command = tuple[str, Any]   # ("add", GenerationRequest) | ("abort", request id) | STOP


class EngineLoop:
    def __init__(self, core: EngineCore, receive: Callable[[float | None], Command | None],
                 post: Callable[[Posted], None], fail: Callable[[EngineError], None]) -> None:
        """`receive(timeout)` returns the next command, waiting up to `timeout` seconds (None: for ever),
        or None; `post` hands a step's events over; `fail` ends every open request with the error (a
        fatal one also marks the engine unusable)."""
        self.core = core
        self._receive = receive
        self._post = post
        self._fail = fail
        self.applied = 0  # requests taken in: the waiting queue is (submitted - applied) + the scheduler's

    def run(self) -> None:
        core = self.core
        failures = 0
        while True:
            out: Posted = []
            # Block while nothing runs: for ever when idle, briefly when requests wait (for grammars, deadlines).
            command = self._receive(0 if core.scheduler.running else COMPILE_POLL if len(core.compiling)
                                    else 0.05 if core.has_work() else None)
            received = command is not None
            while command is not None:
                if command == STOP:
                    self._fail(EngineError("the engine shut down"))
                    return
                out += self._apply(command)
                command = self._receive(0)
            now = time.monotonic()
            out += core.admit_compiled(now)
            out += core.expire(now)
            try:
                out += core.step()
                failures = 0
            except StepFailed as e:
                failures += 1
                log.exception("engine step failed", extra={"requests": sorted(e.request_ids)})
                core.fail(e.request_ids)
                self._post(out + [(rid, EngineError(str(e), fatal=e.fatal)) for rid in e.request_ids])
                if e.fatal or failures >= MAX_CONSECUTIVE_FAILURES:
                    why = "fatal engine error" if e.fatal else f"{failures} consecutive step failures"
                    self._fail(EngineError(f"{why}: {e}", fatal=True))
                    return
                continue
            if out or received:  # after commands too: stats read from posts must see them
                self._post(out)

    def _apply(self, command: Command) -> Posted:
        kind, arg = command
        if kind == "add":
            self.applied += 1
            try:
                self.core.check(arg)
                return self.core.add(arg)
            except InvalidRequest as e:  # raised on the request's stream, before any event
                return [(arg.request_id, e)]
        return self.core.abort(arg)
