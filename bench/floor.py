"""The weight-read floor: at one stream, decode cannot be faster than reading every weight once a token.

A decode step at batch 1 multiplies one token's activations by every weight
matrix, so each step streams all the weights from memory (a 135M-parameter
model in float32 is 538 MB, far beyond any CPU cache); the floor on time per
token is the weights' bytes over the memory bandwidth. Bandwidth is measured
here, once per record, by the simplest large copy (1 GiB, best of five,
counting the bytes read and written, as STREAM's copy does), with the torch
thread count the engine decodes with.
"""

from __future__ import annotations

import struct
import time
from pathlib import Path

import torch

GIB = 2**30


def copy_bandwidth(threads: int, size: int = GIB, repeats: int = 5) -> float:
    """Bytes per second of the best of `repeats` copies of `size` bytes, read and written counted."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        source = torch.ones(size // 4, dtype=torch.float32)
        target = torch.empty_like(source)
        target.copy_(source)  # the pages exist before the clock starts
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            target.copy_(source)
            best = min(best, time.perf_counter() - started)
        return 2 * size / best
    finally:
        torch.set_num_threads(previous)


def weight_bytes(checkpoint: Path) -> int:
    """The tensors' bytes in the checkpoint's safetensors files (each file: an 8-byte header length, the header,
    then the tensors)."""
    total = 0
    for file in checkpoint.glob("*.safetensors"):
        with file.open("rb") as f:
            (header,) = struct.unpack("<Q", f.read(8))
        total += file.stat().st_size - 8 - header
    return total


def floor_note(weights: int, bandwidth: float, tpot_ms: dict[str, float]) -> list[str]:
    """The doc's lines on the floor, beside the measured time per output token at one stream."""
    floor_ms = weights / bandwidth * 1000
    measured = ", ".join(f"{target} {ms:.1f} ms ({ms / floor_ms:.1f}x the floor)" for target, ms in tpot_ms.items())
    return [f"Weight-read floor at 1 stream: {weights / 1e6:,.0f} MB of weights / {bandwidth / 1e9:.1f} GB/s "
            f"(one 1 GiB copy, best of 5, read + write counted) = **{floor_ms:.1f} ms a token**. "
            f"Measured TPOT p50 at 1 stream: {measured or 'not measured'}."]
