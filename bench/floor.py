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


BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def floor_note(weights: int, bandwidth: float, tpot_ms: dict[str, tuple[float, str]], stored: str = "float32"
               ) -> list[str]:
    """The doc's lines on the floor, beside each target's measured time per output token at one stream and the
    floor of the precision it serves (`tpot_ms`: target -> (TPOT p50, dtype)); `weights` are the checkpoint's
    bytes, stored in `stored`."""
    def floor(dtype: str) -> float:
        return weights * BYTES[dtype] / BYTES[stored] / bandwidth * 1000

    dtypes = sorted({stored, *(dtype for _, dtype in tpot_ms.values())}, key=lambda d: -BYTES[d])
    floors = "; ".join(f"{dtype}, {weights * BYTES[dtype] / BYTES[stored] / 1e6:,.0f} MB: **{floor(dtype):.1f} ms "
                       "a token**" for dtype in dtypes)
    measured = ", ".join(f"{target} ({dtype}) {ms:.1f} ms ({ms / floor(dtype):.1f}x its floor)"
                         for target, (ms, dtype) in tpot_ms.items())
    return [f"Weight-read floor at 1 stream, the weights' bytes over {bandwidth / 1e9:.1f} GB/s (one 1 GiB copy, "
            f"best of 5, read + write counted): {floors}. Measured TPOT p50 at 1 stream: {measured or 'none'}."]
