"""Test-only: `llmserve serve` with an engine step fault injected at intervals, the soak's source of real faults.

    python -m bench.soak_server --fault-every 15 --fault-report faults.json <llmserve serve flags>

Not a service entry point: it injects a fault (bench/faults.py) into every reference engine once the server is
serving. A fault fails the step it hits, exactly as a failing forward pass would; the count of
injected faults is written to --fault-report when the server has drained.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

from bench.faults import inject
from service.config import add_config_arguments, config_from_args
from service.server import LlmServer, serve


class PeriodicFault:
    """Fails the first step after every `every` seconds."""

    def __init__(self, every: float) -> None:
        self.every = every
        self.next_at = time.monotonic() + every
        self.injected = 0
        self.requests_hit = 0

    def __call__(self, request_ids: set[str]) -> None:
        if time.monotonic() >= self.next_at:
            self.next_at = time.monotonic() + self.every
            self.injected += 1
            self.requests_hit += len(request_ids)
            raise RuntimeError(f"injected soak fault {self.injected}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fault-every", type=float, default=15.0, help="seconds between injected step faults")
    parser.add_argument("--fault-report", type=Path, required=True)
    add_config_arguments(parser)
    args = parser.parse_args()
    faults: list[PeriodicFault] = []

    def install(server: LlmServer) -> None:
        for model in server.registry:
            fault = PeriodicFault(args.fault_every)
            inject(model.engine.core, fault)  # type: ignore[attr-defined]
            faults.append(fault)

    code = asyncio.run(serve(config_from_args(args), on_serving=install))
    args.fault_report.write_text(json.dumps({"injected": sum(f.injected for f in faults),
                                             "requests_hit": sum(f.requests_hit for f in faults)}))
    return code


if __name__ == "__main__":
    raise SystemExit(main())
