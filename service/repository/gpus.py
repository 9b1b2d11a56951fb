"""NVIDIA GPUs, described or detected.

A TensorRT plan only loads on the compute capability it was built for, and what
fits depends on each GPU's memory, so planning, profile selection and the
backend all reason about the same `Gpu` record. Planning runs anywhere, so GPUs
can also be described by name (`--gpu H100-80GB`) from the table below.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass

MIB = 1024**2
GIB = 1024**3


@dataclass(frozen=True, slots=True)
class Gpu:
    name: str
    compute_capability: tuple[int, int]
    memory_bytes: int

    @property
    def architecture(self) -> str:
        """The build target, as TensorRT-LLM and NIM name it: sm80, sm86, sm89, sm90, sm100."""
        major, minor = self.compute_capability
        return f"sm{major}{minor}"

    @property
    def memory_gib(self) -> float:
        return self.memory_bytes / GIB

    def describe(self) -> str:
        return f"{self.name} ({self.architecture}, {self.memory_gib:.1f} GiB)"


class GpuError(ValueError):
    pass


# Memory as nvidia-smi reports `memory.total` (MiB), which is a little under the marketed size.
KNOWN_GPUS: dict[str, Gpu] = {
    g.name: g
    for g in (
        Gpu("A100-40GB", (8, 0), 40960 * MIB),
        Gpu("A100-80GB", (8, 0), 81920 * MIB),
        Gpu("A10", (8, 6), 23028 * MIB),
        Gpu("A10G", (8, 6), 23028 * MIB),
        Gpu("L4", (8, 9), 23034 * MIB),
        Gpu("L40S", (8, 9), 46068 * MIB),
        Gpu("H100-80GB", (9, 0), 81559 * MIB),
        Gpu("H100-NVL", (9, 0), 95830 * MIB),
        Gpu("H200", (9, 0), 143771 * MIB),
        Gpu("B200", (10, 0), 183359 * MIB),
    )
}
_ALIASES = {"H100": "H100-80GB", "H200-141GB": "H200", "B200-180GB": "B200"}


def parse_gpu(text: str) -> Gpu:
    """A GPU from the table, by name (case-insensitive); the error lists the names known."""
    wanted = text.strip().upper()
    for name, gpu in KNOWN_GPUS.items():
        if name.upper() == wanted:
            return gpu
    for alias, name in _ALIASES.items():
        if alias.upper() == wanted:
            return KNOWN_GPUS[name]
    raise GpuError(f"--gpu: unknown GPU {text!r}; known: {', '.join(KNOWN_GPUS)}")


def parse_nvidia_smi(output: str) -> list[Gpu]:
    """Parses `nvidia-smi --query-gpu=name,compute_cap,memory.total --format=csv,noheader` lines,
    e.g. `NVIDIA H100 80GB HBM3, 9.0, 81559 MiB`."""
    gpus = []
    for line in output.splitlines():
        if not line.strip():
            continue
        parts = [p.strip() for p in line.rsplit(",", 2)]
        if len(parts) != 3:
            raise GpuError(f"unexpected nvidia-smi line: {line!r}")
        name, cap, memory = parts
        try:
            major, minor = (int(x) for x in cap.split("."))
            mib = int(memory.split()[0])
        except ValueError:
            raise GpuError(f"unexpected nvidia-smi line: {line!r}") from None
        gpus.append(Gpu(name, (major, minor), mib * MIB))
    return gpus


def visible(gpus: list[Gpu], cuda_visible_devices: str | None) -> list[Gpu]:
    """nvidia-smi lists every GPU; CUDA (and so TensorRT-LLM) sees only CUDA_VISIBLE_DEVICES, when it lists
    indices. UUIDs and other forms are left to the driver: then every GPU counts."""
    if cuda_visible_devices is None:
        return gpus
    entries = [e.strip() for e in cuda_visible_devices.split(",") if e.strip()]
    if not all(e.isdigit() for e in entries):
        return gpus
    return [gpus[int(e)] for e in entries if int(e) < len(gpus)]


def _torch_gpus() -> list[Gpu]:
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    gpus = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        gpus.append(Gpu(props.name, (props.major, props.minor), props.total_memory))
    return gpus


def detect_gpus() -> list[Gpu]:
    """The local NVIDIA GPUs CUDA can use: from nvidia-smi, or torch.cuda where nvidia-smi is absent;
    [] where there are none (or no driver)."""
    if shutil.which("nvidia-smi") is None:
        return _torch_gpus()
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=name,compute_cap,memory.total", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return []
    return visible(parse_nvidia_smi(done.stdout), os.environ.get("CUDA_VISIBLE_DEVICES"))
