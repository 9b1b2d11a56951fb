"""Decode time per token of a Llama-3.1-8B-shaped model against the device's memory floor (bench/gpu_check.sh).

  python -m bench.gpu_decode [--device cuda] [--shape llama-3.1-8b|tiny] [--batches 1 32] [--out F.json]

Random weights cost the same bytes and arithmetic as trained ones, and need no
checkpoint on a machine without network. At batch 1 a step reads every weight
once, so the floor on time per token is the weights' bytes over the device's
copy bandwidth (measured here: a 1 GiB copy, best of five, read + write
counted); the figure is reported beside it. The steps are bench.engine_bench's
decode steps (the reference engine's own decode path), run eagerly: the
engine has no CUDA graphs. `--shape tiny --device cpu` runs the same code in
seconds, which is how it is checked where there is no GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from bench.engine_bench import decode_steps
from service.backends.reference.model import Llama, LlamaConfig, rope_tables
from service.backends.reference.packed_linear import pack_linears

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
SHAPES = {
    "llama-3.1-8b": LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
                                num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
                                rope_scaling=LLAMA3_ROPE, max_position_embeddings=8192, tie_word_embeddings=False),
    "tiny": LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=64, rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE,
                        max_position_embeddings=512, tie_word_embeddings=False),
}


def random_model(config: LlamaConfig, dtype: torch.dtype, device: torch.device) -> Llama:
    """Initialized on the device itself: an 8B model's 16 GB never pass through host memory."""
    with torch.device(device):
        model = Llama(config).to(dtype).eval()
    model.cos, model.sin = (table.to(dtype) for table in rope_tables(config, device))
    return model


def copy_bandwidth(device: torch.device, size: int = 2**30, repeats: int = 5) -> float:
    source = torch.ones(size // 4, dtype=torch.float32, device=device)
    target = torch.empty_like(source)
    best = float("inf")
    for _ in range(repeats + 1):  # the first copy is a warm-up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        target.copy_(source)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - started)
    return 2 * size / best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.1-8b")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0, help="per batch size")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    bandwidth = copy_bandwidth(device)
    print(f"copy bandwidth on {device}: {bandwidth / 1e9:,.0f} GB/s", flush=True)
    model = random_model(SHAPES[args.shape], dtype, device)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    if device.type == "cpu":
        pack_linears(model)  # as load_model does on a CPU
    floor_ms = weights / bandwidth * 1000
    print(f"{args.shape}, {args.dtype}: {weights / 1e9:.2f} GB of weights, a floor of {floor_ms:.2f} ms a token "
          "at batch 1", flush=True)
    rows = []
    for i, batch in enumerate(args.batches, 1):
        row = decode_steps(model, batch, args.prompt_tokens, args.new_tokens, args.seconds)
        rows.append(row | {"floor_ratio": row["step_ms"] / floor_ms})
        print(f"[{i}/{len(args.batches)}] batch {batch}: {row['step_ms']:.2f} ms a step "
              f"({row['step_ms'] / floor_ms:.2f}x the floor), {row['tokens_per_s']:,.0f} tokens/s", flush=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result = {"benchmark": "gpu_decode", "device": name, "shape": args.shape, "dtype": args.dtype,
              "torch": torch.__version__, "weight_bytes": weights, "copy_bandwidth_bytes_per_s": bandwidth,
              "floor_ms": floor_ms, "cuda_graphs": False, "rows": rows}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
