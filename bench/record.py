"""`make bench`: the performance record, one model of engines/ at a time.

  python -m bench.record [--model demo] [--concurrency 1,8,32] [--peers vllm,transformers] [--rounds 3]

`make bench` records the demo model (1, 8, 32 streams; vLLM and transformers
serve), then SmolLM2-135M-Instruct (1, 8, 16 streams; vLLM), a real model
whose cost is in its arithmetic. Side by side at each concurrency, with the
same prompts, seeds and client:
1. the model's raw batched forward-step ceiling (bench.engine_bench's ceiling), at
   the context the served requests carry: the prompt as the chat template
   renders it (templates add system headers), not the user text alone;
2. llmserve over gRPC and over its REST shim, serving this model alone;
3. vLLM's CPU build (float32 and bfloat16: --peers vllm,vllm-bf16) and
   4. transformers serve --continuous-batching on the same checkpoint, each in
   a venv of its own (bench.peers).
Once per run, before any server starts, the machine's memory bandwidth is
measured and the weight-read floor at one stream reported beside the measured
time per token (bench.floor). Only one server runs at a time, so none takes
CPU from another's measurement, and the load comes from this process, never
from the server's; every server is measured once per round, over several
interleaved rounds, and the tables show each one's median round. Writes bench/results/<date>[-<model>].json and .png,
docs/performance[-<model>].png, and the model's table between its record
markers of docs/performance.md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.floor import copy_bandwidth, floor_note, weight_bytes
from bench.peers import PEERS, PEERS_DIR, PeerServer, install
from bench.processes import free_port, stop_group
from bench.report import update_doc
from service.healthcheck import wait_serving
from service.loadgen.clients import Target
from service.loadgen.plot import plot
from service.loadgen.runner import Level, Workload, metadata, print_table, run_target, write_json
from service.loadgen.workload import load_tokenizer, synthetic_conversations

ROOT = Path(__file__).resolve().parents[1]
ENGINES = ROOT / "engines"
RESULTS = ROOT / "bench" / "results"
DOC = ROOT / "docs" / "performance.md"


class LlmserveServer:
    """`python -m service serve` of one model on loopback ports, in its own process group, stopped by PID."""

    def __init__(self, model: str, log: Path, threads: int, *args: str) -> None:
        self.grpc_port, self.http_port = free_port(), free_port()
        self._log = log.open("w")
        engines = PEERS_DIR / "engines" / model  # a repository holding this model alone
        engines.mkdir(parents=True, exist_ok=True)
        (engines / model).unlink(missing_ok=True)
        (engines / model).symlink_to(ENGINES / model, target_is_directory=True)
        cmd = [sys.executable, "-m", "service", "serve", "--engines-dir", str(engines), "--host", "127.0.0.1",
               "--grpc-port", str(self.grpc_port), "--http-port", str(self.http_port), "--log-level", "warning",
               "--threads", str(threads), *args]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def wait_serving(self, timeout: float = 120.0) -> None:
        wait_serving(f"127.0.0.1:{self.grpc_port}", self.proc, timeout, lambda: f"see {self._log.name}")

    def precision(self, model: str) -> str:
        """The dtype the engine chose (its profile's precision: bfloat16 on CPUs with native bfloat16)."""
        import grpc

        from service.gen.llmserve.v1 import chat_pb2, chat_pb2_grpc

        with grpc.insecure_channel(f"127.0.0.1:{self.grpc_port}") as channel:
            listed = chat_pb2_grpc.ChatServiceStub(channel).ListModels(chat_pb2.ListModelsRequest(), timeout=30)
        return next(m.profile.precision for m in listed.data if m.id == model)

    def stop(self) -> None:
        stop_group(self.proc, 30)
        self._log.close()


def _shown(path: Path) -> Path:
    path = path.resolve()
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


def templated_length(model: str, conversations: list[list[dict[str, str]]]) -> int:
    """Mean prompt length in tokens once the model's chat template has rendered the conversations."""
    from transformers import AutoTokenizer

    from service.models.template import ChatTemplate
    from service.repository.manifest import load_manifest

    manifest = load_manifest(ENGINES / model)
    template = ChatTemplate(AutoTokenizer.from_pretrained(manifest.checkpoint), manifest.chat_template)
    return round(sum(len(template.encode(c, None, True)) for c in conversations) / len(conversations))


def ceiling_runs(model: str, levels: list[int], input_len: int, output_len: int, seconds: float,
                 threads: int) -> list[dict[str, Any]]:
    """The forward-step ceiling at each batch size, each in a fresh process as bench.engine_bench measures it."""
    runs = []
    for batch in levels:
        cmd = [sys.executable, "-m", "bench.engine_bench", "--child", "ceiling", str(batch), "--model", model,
               "--prompt-tokens", str(input_len), "--new-tokens", str(output_len), "--seconds", str(seconds)]
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True, timeout=600,
                             env={**os.environ, "OMP_NUM_THREADS": str(threads)})
        row = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"  ceiling, batch {batch}: {row['tokens_per_s']:.0f} tokens/s ({row['step_ms']:.2f} ms a step, "
              f"{row['dtype']})", flush=True)
        runs.append({"target": "ceiling", "kind": "forward-step", "concurrency": batch, "request_rate": None,
                     "step_ms": row["step_ms"], "output_tokens_per_s": row["tokens_per_s"], "dtype": row["dtype"]})
    return runs


def measure(targets: list[Target], workload: Workload, levels: list[Level]) -> list[dict[str, Any]]:
    runs: list[dict[str, Any]] = []
    for target in targets:
        runs += asyncio.run(run_target(target, workload, levels))
    return runs


def medians(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each target's median round at each level, by output tokens/s (the lower middle of an even count): a
    whole run, so its latencies are the ones measured beside that throughput."""
    grouped: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for run in runs:
        grouped.setdefault((run["target"], run["concurrency"]), []).append(run)
    return [sorted(group, key=lambda r: r["output_tokens_per_s"])[(len(group) - 1) // 2]
            for group in grouped.values()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo", help="the model of engines/ to record (make demo, make smollm2)")
    parser.add_argument("--concurrency", default="1,8,32", help="comma-separated concurrency levels")
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--requests-per-stream", type=int, default=8,
                        help="requests per level: this many per concurrent stream, at least 32")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds per level after which none is sent")
    parser.add_argument("--ceiling-seconds", type=float, default=4.0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of llmserve's engine, of the ceiling and of transformers serve; vLLM "
                             "picks 1 itself on two cores, leaving the other core to its frontend and the client")
    parser.add_argument("--peers", default="vllm,transformers", help="comma-separated peers to measure ('' for none)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved rounds, each server once per round and one at a time (this machine is "
                             "shared and noisy); the tables show each target's median round")
    parser.add_argument("--out", type=Path, help="default: bench/results/<date>.json")
    parser.add_argument("--doc", type=Path, default=DOC, help="markdown file whose record section is rewritten")
    args = parser.parse_args(argv)
    model = args.model
    if not (ENGINES / model / "manifest.json").is_file():
        raise SystemExit(f"no model {model!r} in engines/: `make demo` or `make smollm2` builds one")
    checkpoint = (ENGINES / model / "checkpoint").resolve()
    concurrencies = [int(c) for c in args.concurrency.split(",") if c]
    peers = [PEERS[name] for name in args.peers.split(",") if name]
    steps = ["memory bandwidth", "ceiling", *(["llmserve", *(p.name for p in peers)] * args.rounds)]
    step = iter(range(1, len(steps) + 1))

    def announce(what: str) -> None:
        print(f"[{next(step)}/{len(steps)}] {what}", flush=True)

    for peer in peers:
        print(f"installing {peer.name} into {peer.venv.relative_to(ROOT)} (once)...", flush=True)
        install(peer)
    levels = [Level(max(32, args.requests_per_stream * c), concurrency=c) for c in concurrencies]
    conversations = synthetic_conversations(load_tokenizer(checkpoint), max(lv.num_requests for lv in levels),
                                            args.input_len, seed=0)
    workload = Workload(conversations, args.output_len, seed=0, duration=args.duration, warmup=8)
    RESULTS.mkdir(parents=True, exist_ok=True)
    PEERS_DIR.mkdir(parents=True, exist_ok=True)

    announce(f"memory bandwidth ({args.threads} thread(s), a 1 GiB copy)")
    bandwidth, weights = copy_bandwidth(args.threads), weight_bytes(checkpoint)
    print(f"  {bandwidth / 1e9:.1f} GB/s; {weights / 1e6:,.0f} MB of weights: a floor of "
          f"{weights / bandwidth * 1000:.1f} ms a token at one stream", flush=True)

    context = templated_length(model, conversations)
    announce(f"forward-step ceiling (at the templated prompt length, {context} tokens)")
    runs = ceiling_runs(model, concurrencies, context, args.output_len, args.ceiling_seconds, args.threads)

    for round_ in range(1, args.rounds + 1):
        announce(f"round {round_}/{args.rounds}: llmserve (gRPC, then REST)")
        server = LlmserveServer(model, PEERS_DIR / "llmserve.log", args.threads)
        try:
            server.wait_serving()
            precision = server.precision(model)
            served = measure([Target("llmserve-grpc", "grpc", f"127.0.0.1:{server.grpc_port}", model),
                              Target("llmserve-rest", "openai", f"http://127.0.0.1:{server.http_port}/v1", model)],
                             workload, levels)
        finally:
            server.stop()
        for peer in peers:
            announce(f"round {round_}/{args.rounds}: {peer.name} (starting; vLLM takes about a minute)")
            peer_server = PeerServer(peer, checkpoint, model, free_port(), {"OMP_NUM_THREADS": str(args.threads)})
            try:
                peer_server.wait_ready()
                kind = "hf" if peer.name == "transformers" else "openai"
                served += measure([Target(peer.name, kind, peer_server.base_url, model)], workload, levels)
            finally:
                peer_server.stop()
        runs += [run | {"round": round_} for run in served]

    shown = [r for r in runs if r["target"] == "ceiling"] + medians([r for r in runs if r["target"] != "ceiling"])
    print_table([r for r in shown if r["target"] != "ceiling"])
    suffix = "" if model == "demo" else f"-{model}"
    out = args.out or RESULTS / f"{datetime.date.today().isoformat()}{suffix}.json"
    meta = metadata(workload, input_len=args.input_len, model=model, checkpoint=str(_shown(checkpoint)),
                    threads=args.threads, ceiling_prompt_tokens=context,
                    peers={p.name: p.version for p in peers},
                    copy_bandwidth_bytes_per_s=bandwidth, weight_bytes=weights,
                    weight_read_floor_ms=weights / bandwidth * 1000, rounds=args.rounds)
    write_json(out, meta, runs)
    title = f"{model}, {args.input_len}-token prompts, {args.output_len} output tokens, {os.cpu_count()} CPU cores"
    picture = ROOT / "docs" / f"performance{suffix}.png"
    plot(shown, out.with_suffix(".png"), title)
    plot(shown, picture, title)
    dtypes = {"llmserve-grpc": precision, "llmserve-rest": precision} | {p.name: p.dtype for p in peers}
    tpot = {r["target"]: (r["tpot_ms"]["p50"], dtypes[r["target"]]) for r in shown
            if r["concurrency"] == 1 and "tpot_ms" in r}
    rounds = f"Each served figure is its target's median of {args.rounds} interleaved rounds (all rounds in the JSON)."
    update_doc(args.doc, shown, _shown(out), model, (rounds, *floor_note(weights, bandwidth, tpot)))
    print(f"wrote {_shown(out)}, {_shown(out.with_suffix('.png'))}, {_shown(picture)} and the table in "
          f"{_shown(args.doc)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
