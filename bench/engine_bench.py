"""The reference engine against the model's own speed limit.

  python -m bench.engine_bench [--model demo] [--batches 1 8 32] [--seconds 4]

1. The ceiling: the model's batched decode step with its KV cache and nothing
   else (no scheduler, sampling or detokenization), tokens/s at each batch size.
2. The engine: the same model behind ReferenceEngine, with that many
   concurrent requests (32-token prompts, 64 new tokens, EOS ignored,
   temperature 1 with seeds), output tokens/s, closed loop.

Each measurement runs in a fresh child process whose single thread is the
only torch user, as in the server, and the figures are reported as ratios of
one run. Writes bench/results/engine-<date>.json and a PNG beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from service.backends.reference.model import Llama

ROOT = Path(__file__).resolve().parents[1]
ENGINES = ROOT / "engines"


def decode_steps(model: Llama, batch: int, prompt_tokens: int, new_tokens: int, seconds: float) -> dict:
    """Decode steps over a context growing as in a generation: the model's own decode path (paged cache writes,
    attention over dense rows, as the engine runs it) with nothing around it, on the model's device and dtype."""
    import torch

    from service.backends.reference.model import AttentionBatch

    c, dtype, device = model.config, model.embed.weight.dtype, model.embed.weight.device
    block = 16
    span = -(-(prompt_tokens + new_tokens) // block) * block
    with torch.device(device):
        kv = [(torch.zeros(batch * span, c.num_kv_heads, c.head_dim, dtype=dtype),
               torch.zeros(batch * span, c.num_kv_heads, c.head_dim, dtype=dtype)) for _ in range(c.num_layers)]
        rows = [(torch.zeros(batch, c.num_kv_heads, span, c.head_dim),
                 torch.zeros(batch, c.num_kv_heads, span, c.head_dim)) for _ in range(c.num_layers)]
        base = torch.arange(batch) * span
        tokens = torch.randint(0, c.vocab_size, (batch,))
        index = torch.arange(batch)
        steps_of = [((torch.arange(pos + 1) <= pos).expand(batch, 1, 1, -1), torch.full((batch,), pos))
                    for pos in range(prompt_tokens, prompt_tokens + new_tokens)]

    def generation() -> None:
        for mask, positions in steps_of:
            step = AttentionBatch(block, base + positions, index, None, mask, [], rows, positions)
            model(tokens, positions, kv, step, index)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    with torch.inference_mode():
        generation()
        steps, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            generation()
            steps += new_tokens
        elapsed = time.perf_counter() - started
    return {"batch": batch, "step_ms": elapsed / steps * 1000, "tokens_per_s": batch * steps / elapsed,
            "dtype": str(dtype).removeprefix("torch.")}


def measure_ceiling(model_dir: Path, batch: int, prompt_tokens: int, new_tokens: int, seconds: float) -> dict:
    """The forward-step ceiling of a model of engines/, in the precision the server defaults to."""
    import torch

    from service.backends.reference.model import load_model
    from service.backends.reference.model_runner import resolve_dtype

    cpu = torch.device("cpu")
    model = load_model(model_dir / "checkpoint", resolve_dtype("auto", model_dir / "checkpoint", cpu), cpu)
    return decode_steps(model, batch, prompt_tokens, new_tokens, seconds)


def measure_engine(model_dir: Path, concurrency: int, prompt_tokens: int, new_tokens: int, seconds: float) -> dict:
    from service.backends.base import GenerationRequest, SamplingParams, TokenDelta
    from service.backends.reference import ReferenceEngine
    from service.config import EngineConfig
    from service.repository.manifest import load_manifest

    async def run() -> dict:
        engine = ReferenceEngine(load_manifest(model_dir), EngineConfig(max_running=max(32, concurrency)))
        await engine.start()
        prompt = list(range(100, 100 + prompt_tokens))
        counter = iter(range(10**9))

        async def request() -> int:
            i = next(counter)
            params = SamplingParams(max_tokens=new_tokens, ignore_eos=True, seed=i)
            out = 0
            async for event in engine.generate(GenerationRequest(f"b{i}", prompt, params)):
                if isinstance(event, TokenDelta):
                    out += len(event.token_ids)
            return out

        await asyncio.gather(*(request() for _ in range(concurrency)))  # warm up
        deadline = time.perf_counter() + seconds
        started = time.perf_counter()

        async def worker() -> int:
            total = 0
            while time.perf_counter() < deadline:
                total += await request()
            return total

        tokens = sum(await asyncio.gather(*(worker() for _ in range(concurrency))))
        elapsed = time.perf_counter() - started
        await engine.shutdown()
        return {"concurrency": concurrency, "tokens_per_s": tokens / elapsed, "output_tokens": tokens}

    return asyncio.run(run())


def _child(kind: str, n: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-m", "bench.engine_bench", "--child", kind, str(n), "--model", args.model,
           "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens),
           "--seconds", str(args.seconds)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True, timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    labels = [str(r["batch"]) for r in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar([i - 0.2 for i in x], [r["ceiling_tokens_per_s"] for r in rows], 0.4, label="forward-step ceiling")
    ax.bar([i + 0.2 for i in x], [r["engine_tokens_per_s"] for r in rows], 0.4, label="reference engine")
    for i, r in enumerate(rows):
        ax.annotate(f"{r['ratio']:.2f}x", (i + 0.2, r["engine_tokens_per_s"]), ha="center", va="bottom")
    ax.set_xticks(list(x), labels)
    ax.set_xlabel("batch size / concurrent requests")
    ax.set_ylabel("output tokens/s")
    ax.set_title(f"{result['model']}, {result['prompt_tokens']}-token prompts, {result['new_tokens']} new tokens (CPU)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo", help="a model of engines/ served by the reference engine")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=4.0, help="per measurement")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--child", nargs=2, metavar=("KIND", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, n = args.child[0], int(args.child[1])
        measure = measure_ceiling if kind == "ceiling" else measure_engine
        print(json.dumps(measure(ENGINES / args.model, n, args.prompt_tokens, args.new_tokens, args.seconds)))
        return 0
    if not (ENGINES / args.model / "manifest.json").is_file():
        raise SystemExit(f"no model {args.model!r} in engines/: `make demo` or `make smollm2` builds one")
    rows = []
    for i, batch in enumerate(args.batches, 1):
        print(f"[{i}/{len(args.batches)}] batch {batch}: ceiling...", end=" ", flush=True)
        ceiling = _child("ceiling", batch, args)
        print(f"{ceiling['tokens_per_s']:.0f} tok/s; engine...", end=" ", flush=True)
        engine = _child("engine", batch, args)
        ratio = engine["tokens_per_s"] / ceiling["tokens_per_s"]
        print(f"{engine['tokens_per_s']:.0f} tok/s ({ratio:.2f} of the ceiling)", flush=True)
        rows.append({"batch": batch, "ceiling_step_ms": ceiling["step_ms"],
                     "ceiling_tokens_per_s": ceiling["tokens_per_s"], "engine_tokens_per_s": engine["tokens_per_s"],
                     "ratio": ratio})
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H%M%SZ")
    out = args.out or ROOT / "bench" / "results" / f"engine-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": "engine", "model": args.model, "date": stamp, "machine": platform.machine(),
              "python": platform.python_version(),
              "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "seconds": args.seconds,
              "rows": rows}
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out.relative_to(ROOT)} and {out.with_suffix('.png').relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
