"""Injected engine-step faults, for the soak and the fault tests (never installed by the service itself).

A fault is called with the request ids of each step's plan before its forward
pass, inside the step; what it raises fails that step exactly as a failing
forward pass would (an EngineError(fatal=True) stops the engine).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from service.backends.reference.core import EngineCore
from service.backends.reference.scheduler import Plan

Fault = Callable[[set[str]], None]


def inject(core: EngineCore, fault: Fault) -> None:
    forward = core.runner.forward

    def faulty(plan: Plan) -> Any:
        fault(EngineCore.request_ids(plan))
        return forward(plan)

    core.runner.forward = faulty  # type: ignore[method-assign]
