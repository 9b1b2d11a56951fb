"""Where a worker is and which protocol it speaks: `KIND://HOST:PORT`, and `NAME=KIND://HOST:PORT` for a model's.

The kinds are the three token-level protocols of smg-grpc-proto: `trtllm`
(TensorRT-LLM's `trtllm-serve --grpc`), `vllm` (vLLM's gRPC server) and
`sglang` (SGLang's `--grpc-mode` scheduler). Addresses are checked when the
configuration is read, so a typo stops the server with the flag's value in
the message rather than surfacing later as an unreachable worker.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

KINDS = ("trtllm", "vllm", "sglang")
_ADDRESS = re.compile(r"^(?P<kind>[a-z]+)://(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(?P<port>[0-9]{1,5})$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,255}$")


class WorkerAddressError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class WorkerAddress:
    kind: str
    host: str
    port: int

    @property
    def target(self) -> str:
        """The gRPC target (host:port)."""
        return f"{self.host}:{self.port}"

    def __str__(self) -> str:
        return f"{self.kind}://{self.target}"


def parse_address(text: str) -> WorkerAddress:
    match = _ADDRESS.match(text.strip())
    if not match:
        raise WorkerAddressError(f"{text!r} is not KIND://HOST:PORT (KIND one of {', '.join(KINDS)})")
    kind, port = match["kind"], int(match["port"])
    if kind not in KINDS:
        raise WorkerAddressError(f"{text!r}: worker kind {kind!r} is not one of {', '.join(KINDS)}")
    if not 0 < port < 65536:
        raise WorkerAddressError(f"{text!r}: port {port} is out of range")
    return WorkerAddress(kind, match["host"], port)


def parse_model_workers(specs: list[str]) -> dict[str, list[WorkerAddress]]:
    """`NAME=KIND://HOST:PORT` values (the --worker flag, LLMSERVE_WORKERS) grouped by model, in order."""
    models: dict[str, list[WorkerAddress]] = {}
    for spec in specs:
        name, equals, address = spec.partition("=")
        if not equals or not _NAME.match(name.strip()):
            raise WorkerAddressError(f"{spec!r} is not NAME=KIND://HOST:PORT")
        parsed = parse_address(address)
        workers = models.setdefault(name.strip(), [])
        if parsed in workers:
            raise WorkerAddressError(f"{spec!r}: {parsed} is given twice for model {name.strip()!r}")
        workers.append(parsed)
    return models
