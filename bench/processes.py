"""The processes a benchmark or test starts on loopback: a free port for each, and a stop that takes the
whole process group (a server's workers, vLLM's engine core) along with its leader."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_group(proc: subprocess.Popen, grace: float = 15.0) -> None:
    """SIGTERM to the process group `proc` leads (started with start_new_session), SIGKILL after `grace`
    seconds; then SIGKILL once more to the group, whose members may outlive their leader by a moment."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
