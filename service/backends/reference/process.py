"""The engine in a process of its own: the child's side of the pipe.

Every torch operation releases Python's GIL and takes it back, hundreds of
times a step; in the server's process the event loop (gRPC, the REST shim)
holds the GIL in between, and a decode step measured 40% slower there than
alone. vLLM runs its engine core in a separate process for the same reason.
Here the child owns the model, the KV cache and the loop; the server sends it
commands and receives, per step, the events and a snapshot of the engine's
counters over one duplex pipe.
"""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass
from multiprocessing.connection import Connection

import torch
from transformers import AutoTokenizer

from service.backends.base import EngineError, ProfileInfo
from service.backends.reference.core import EngineCore
from service.backends.reference.loop import STOP, Command, EngineLoop, Posted
from service.config import EngineConfig
from service.repository.manifest import ModelManifest


@dataclass(frozen=True)
class Snapshot:
    """The engine's counters after a step, for stats() and admission on the server's side."""

    running: int
    waiting: int        # groups in the scheduler's queue, and requests waiting for their grammar
    applied: int        # requests the loop has taken in
    kv_blocks_used: int
    kv_blocks_total: int
    prefix_cache_hit_rate: float
    max_running: int


def snapshot(core: EngineCore, applied: int) -> Snapshot:
    s, blocks = core.scheduler, core.scheduler.blocks
    return Snapshot(len(s.running), len(s.waiting) + len(core.compiling), applied, blocks.used, blocks.num_blocks,
                    blocks.hit_rate, s.max_running)


# Grammar threads (compiling.py) run Python between xgrammar's GIL-free stretches; the step loop takes the GIL back
# after every torch call, and at the default 5 ms a step of ~50 calls waited up to 0.75 s on a large schema's shape.
GIL_SWITCH_INTERVAL = 0.0002


def engine_threads(config: EngineConfig) -> int:
    """torch's own default takes every core, and its OpenMP workers spin between parallel regions: the server's
    event loop and its clients, starved of CPU, then slowed steps tenfold on two cores (a step in flight
    waits on them). So by default one core is left to them."""
    return config.threads or max(1, (os.cpu_count() or 2) - 1)


def profile_of(core: EngineCore) -> ProfileInfo:
    arch = "cpu"
    if core.runner.device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(core.runner.device)
        arch = f"sm{major}{minor}"
    precision = str(core.runner.dtype).removeprefix("torch.")
    return ProfileInfo(f"reference-{arch}-{precision}", arch, precision)


def run_process(conn: Connection, manifest: ModelManifest, config: EngineConfig) -> None:
    """Loads the model, says so, and runs the loop until STOP or until the server's end of the pipe closes."""
    # The server drains on SIGTERM and SIGINT and then sends STOP; a signal meant for it must not kill this.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)
    try:
        torch.set_num_threads(engine_threads(config))
        core = EngineCore(manifest.checkpoint, AutoTokenizer.from_pretrained(manifest.checkpoint), config)
    except Exception as e:
        conn.send(("load_failed", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", profile_of(core)))

    def receive(timeout: float | None) -> Command | None:
        try:
            return conn.recv() if conn.poll(timeout) else None
        except (EOFError, OSError):  # the server is gone: nobody is left to answer
            return STOP

    def post(events: Posted) -> None:
        conn.send(("events", events, snapshot(core, loop.applied)))

    def fail(error: EngineError) -> None:
        conn.send(("failed", error, snapshot(core, loop.applied)))

    loop = EngineLoop(core, receive, post, fail)
    try:
        loop.run()
    except (EOFError, OSError, BrokenPipeError):
        return
    except Exception as e:  # a bug outside a step: nothing here can be trusted any more
        conn.send(("failed", EngineError(f"engine loop died: {type(e).__name__}: {e}", fatal=True),
                   snapshot(core, loop.applied)))
