"""vLLM's CPU build as a gRPC worker, from its locked venv: what `make test` serves through llmserve, and what
`python -m bench.gateway` puts llmserve in front of (beside vLLM's own OpenAI server on the same engine, `openai`).

The venv (build/vllm-worker) is installed by `make vllm-worker` from
requirements-vllm-worker.lock. The worker runs on 127.0.0.1 only, in a process
group of its own so stopping (or killing, to play a crash) its PID takes its
engine-core process along; its caches live in the venv's folder. Two settings
keep it off other interfaces: vLLM's internal address is loopback, and the
servicer's KV-event publisher, which binds every interface, is off.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
from smg_grpc_proto import vllm_engine_pb2, vllm_engine_pb2_grpc

from bench.processes import free_port, stop_group

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / "build" / "vllm-worker"
INSTALL_LOG = ROOT / "build" / "vllm-worker.log"
CACHE = VENV / "cache"

ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",          # GiB of KV cache
    "SMG_VLLM_SERVICER_KV_EVENTS": "0",     # no ZMQ publisher on tcp://*
    "VLLM_HOST_IP": "127.0.0.1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # the model runs in the engine-core process: one process fewer
    "SMG_VLLM_SERVICER_WARMUP": "off",
    "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
    "HF_HOME": str(CACHE / "hf"), "XDG_CACHE_HOME": str(CACHE / "xdg"), "VLLM_CACHE_ROOT": str(CACHE / "vllm"),
    "VLLM_CONFIG_ROOT": str(CACHE / "vllm-config"), "TORCHINDUCTOR_CACHE_DIR": str(CACHE / "inductor"),
}
# JSON without free whitespace: a random-weight model would otherwise fill max_tokens with blanks (llmserve's
# reference engine compiles JSON the same way, service/backends/grammar.py).
STRUCTURED_OUTPUTS = '{"backend": "xgrammar", "disable_any_whitespace": true}'


def installed() -> bool:
    return (VENV / ".installed").is_file()


def install() -> None:
    """`make vllm-worker`: the one recipe, so tests, benchmarks and CI install the same locked venv."""
    subprocess.run(["make", "--no-print-directory", "vllm-worker"], cwd=ROOT, check=True)


class VllmWorker:
    """One worker process serving `checkpoint` as `name` on a loopback port, which a restart keeps. With `openai`,
    vLLM's own OpenAI-compatible server instead, on the same engine and settings (the gateway benchmark's
    baseline)."""

    def __init__(self, checkpoint: Path, log: Path, name: str = "demo", port: int | None = None,
                 openai: bool = False) -> None:
        self.checkpoint, self.name, self.log, self.openai = checkpoint, name, log, openai
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"vllm://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def command(self) -> list[str]:
        launcher = "vllm.entrypoints.openai.api_server" if self.openai else "vllm.entrypoints.launchers.grpc_server"
        return [str(VENV / "bin" / "python"), "-m", launcher,
                "--model", str(self.checkpoint), "--served-model-name", self.name, "--host", "127.0.0.1",
                "--port", str(self.port), "--max-model-len", "512", "--dtype", "float32",
                "--structured-outputs-config", STRUCTURED_OUTPUTS,
                "--enforce-eager",   # no torch.compile: ready in half a minute rather than one and a half
                # Never split a prefill: vLLM-CPU 0.32 crashes re-seeding a chunked seeded request.
                "--max-num-batched-tokens", "8192"]

    def start(self) -> None:
        """Starts the process and returns at once (it takes half a minute to a minute to load)."""
        base = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHONPATH"))}
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(self.command(), cwd=VENV, env={**base, **ENV}, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def _ready(self, stub: vllm_engine_pb2_grpc.VllmEngineStub) -> bool:
        if self.openai:
            with contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError), \
                    urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1) as reply:
                return reply.status == 200
            return False
        with contextlib.suppress(grpc.RpcError):
            return stub.HealthCheck(vllm_engine_pb2.HealthCheckRequest(), timeout=1).healthy
        return False

    def wait_ready(self, timeout: float = 300.0) -> float:
        """Polls its health until it says healthy; returns the seconds it took. Fails at once, with the log's tail,
        if the process exits."""
        assert self.proc is not None, "start() first"
        started = time.monotonic()
        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            stub = vllm_engine_pb2_grpc.VllmEngineStub(channel)
            while time.monotonic() - started < timeout:
                if self.proc.poll() is not None:
                    tail = self.log.read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"vLLM exited {self.proc.returncode}: {tail}")
                if self._ready(stub):
                    return time.monotonic() - started
                time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"vLLM was not healthy after {timeout:.0f} s; see {self.log}")

    async def requests(self) -> int:
        """Requests the worker itself says it holds (GetLoads: running and waiting), each with its KV."""
        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            loads = await vllm_engine_pb2_grpc.VllmEngineStub(channel).GetLoads(vllm_engine_pb2.GetLoadsRequest(),
                                                                               timeout=5)
        return sum(x.num_running_reqs + x.num_waiting_reqs for x in loads.loads)

    def kill(self) -> None:
        """SIGKILL to its process group: a crash, as far as its clients can tell."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)

    def stop(self, grace: float = 15.0) -> None:
        if self.proc is not None:
            stop_group(self.proc, grace)
