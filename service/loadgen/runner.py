"""`llmserve bench`: the load generator, measured the way vLLM's `bench serve` and GenAI-Perf measure.

It runs in its own process, one asyncio loop, so it never shares an event loop
with the server it loads; per token it only reads the clock. Each level of a
sweep is bounded twice: no request is sent after `duration` seconds, and each
request gives up after `request_timeout`.

  llmserve bench --target grpc://127.0.0.1:50051 --target rest=http://127.0.0.1:8000/v1 \
      --concurrency 1,8,32 --input-len 32 --output-len 64 --out bench.json --plot bench.png
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from service.loadgen.clients import Client, Target, make_client
from service.loadgen.metrics import RequestRecord, parse_slos, summarize
from service.loadgen.workload import (
    Messages,
    arrival_offsets,
    jsonl_conversations,
    load_tokenizer,
    synthetic_conversations,
)


@dataclass(frozen=True)
class Level:
    """One point of a sweep: at most `concurrency` requests in flight, sent as a Poisson process at `request_rate`."""

    num_requests: int
    concurrency: int | None = None
    request_rate: float = math.inf

    @property
    def name(self) -> str:
        parts = [f"concurrency {self.concurrency}"] if self.concurrency else []
        if self.request_rate != math.inf:
            parts.append(f"{self.request_rate:g} req/s")
        return ", ".join(parts) or "all at once"


@dataclass(frozen=True)
class Workload:
    conversations: list[Messages]
    output_len: int
    seed: int = 0
    duration: float = 60.0
    request_timeout: float = 120.0
    warmup: int = 0


async def _drive(client: Client, workload: Workload, level: Level, progress: tqdm | None) -> tuple[list[RequestRecord],
                                                                                                    float]:
    """Sends the level's requests on schedule; returns their records and the wall time from first send to last end."""
    offsets = arrival_offsets(level.num_requests, level.request_rate, workload.seed)
    limit = asyncio.Semaphore(level.concurrency or level.num_requests)
    records: list[RequestRecord] = []
    tasks: list[asyncio.Task[None]] = []
    conversations = workload.conversations

    async def one(index: int, record: RequestRecord) -> None:
        try:
            await client.send(conversations[index % len(conversations)], workload.seed + index, record)
        finally:
            limit.release()
            if progress is not None:
                progress.update(1)

    start = time.perf_counter()
    deadline = start + workload.duration
    for i, offset in enumerate(offsets):
        delay = start + offset - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        await limit.acquire()
        if time.perf_counter() >= deadline:
            limit.release()
            break
        record = RequestRecord()
        records.append(record)
        tasks.append(asyncio.create_task(one(i, record)))
    if tasks:
        _, pending = await asyncio.wait(tasks, timeout=workload.request_timeout)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    for record in records:
        if not record.end:
            record.error = record.error or "timed out"
    end = max((r.end for r in records if r.end), default=time.perf_counter())
    return records, end - start


async def run_target(target: Target, workload: Workload, levels: list[Level], slos: dict[str, float] | None = None,
                     show_progress: bool = True) -> list[dict[str, Any]]:
    """Every level against one target, in order, each after the target's queue has drained."""
    most = max((lv.concurrency or lv.num_requests) for lv in levels)
    client = make_client(target, workload.output_len, most, workload.request_timeout)
    results = []
    try:
        if workload.warmup:
            await _drive(client, workload, Level(workload.warmup, concurrency=min(most, workload.warmup)), None)
        for level in levels:
            with tqdm(total=level.num_requests, desc=f"{target.label} {level.name}", unit="req", mininterval=0.5,
                      disable=not show_progress, leave=True) as progress:
                records, wall = await _drive(client, workload, level, progress)
            summary = summarize(records, wall, slos)
            results.append({"target": target.label, "kind": target.kind, "url": target.url,
                            "concurrency": level.concurrency,
                            "request_rate": None if level.request_rate == math.inf else level.request_rate,
                            "num_requests": level.num_requests, **summary})
    finally:
        await client.close()
    return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", action="append", required=True, metavar="[LABEL=][KIND+]URL",
                        help="grpc://HOST:PORT (llmserve gRPC), http://HOST:PORT/v1 (any OpenAI-compatible server: "
                             "llmserve REST, vLLM), hf+http://HOST:PORT/v1 (transformers serve); repeatable")
    parser.add_argument("--model", default="demo", help="model id sent in requests")
    parser.add_argument("--api-key", default=os.environ.get("LLMSERVE_BENCH_API_KEY", ""),
                        help="bearer token (env LLMSERVE_BENCH_API_KEY)")
    parser.add_argument("--concurrency", default="", help="comma-separated concurrency levels, e.g. 1,8,32")
    parser.add_argument("--request-rate", default="",
                        help="comma-separated Poisson request rates per second (inf: all at once)")
    parser.add_argument("--num-requests", type=int, default=64, help="requests per level")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds per level after which none is sent")
    parser.add_argument("--request-timeout", type=float, default=120.0, help="seconds before a request is abandoned")
    parser.add_argument("--warmup", type=int, default=4, help="requests sent before measuring, per target")
    parser.add_argument("--input-len", type=int, default=32, help="tokens per synthetic prompt")
    parser.add_argument("--output-len", type=int, default=64, help="tokens generated per request, EOS ignored")
    parser.add_argument("--dataset", type=Path, help="JSONL of conversations (OpenAI messages or ShareGPT) "
                                                     "instead of synthetic prompts")
    parser.add_argument("--tokenizer", type=Path, default=Path("engines/demo/checkpoint"),
                        help="tokenizer.json or a checkpoint folder, to make synthetic prompts of --input-len tokens")
    parser.add_argument("--seed", type=int, default=0, help="seeds prompts, arrivals and each request's sampling")
    parser.add_argument("--goodput", nargs="*", default=[], metavar="METRIC:MS",
                        help="SLOs for goodput, e.g. ttft:200 tpot:50 e2el:2000")
    parser.add_argument("--out", type=Path, help="write the results here as JSON")
    parser.add_argument("--plot", type=Path, help="write a PNG plot here (needs matplotlib)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def levels_from_args(args: argparse.Namespace) -> list[Level]:
    concurrencies = [int(c) for c in args.concurrency.split(",") if c] or [None]
    rates = [float(r) for r in args.request_rate.split(",") if r] or [math.inf]
    return [Level(args.num_requests, c, r) for c in concurrencies for r in rates]


def metadata(workload: Workload, **extra: Any) -> dict[str, Any]:
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()},
            "output_len": workload.output_len, "seed": workload.seed, "duration_s": workload.duration,
            "warmup": workload.warmup, **extra}


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: a statistic with no samples, or an unlimited rate, is written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def write_json(path: Path, meta: dict[str, Any], runs: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_finite({"meta": meta, "runs": runs}), indent=1, default=str) + "\n")


def print_table(runs: list[dict[str, Any]]) -> None:
    head = f"{'target':<14}{'level':>8}{'ok':>6}{'out tok/s':>11}{'req/s':>8}{'TTFT p50':>10}{'TTFT p99':>10}" \
           f"{'TPOT p50':>10}{'ITL p99':>9}{'E2E p99':>9}"
    print(head)
    for r in runs:
        level = r["concurrency"] if r["concurrency"] is not None else r["request_rate"]
        print(f"{r['target']:<14}{level!s:>8}{r['completed']:>6}{r['output_tokens_per_s']:>11.0f}"
              f"{r['requests_per_s']:>8.1f}{r['ttft_ms']['p50']:>10.1f}{r['ttft_ms']['p99']:>10.1f}"
              f"{r['tpot_ms']['p50']:>10.2f}{r['itl_ms']['p99']:>9.1f}{r['e2el_ms']['p99']:>9.0f}")


def main(args: argparse.Namespace) -> int:
    targets = [Target.parse(spec, args.model, args.api_key) for spec in args.target]
    levels = levels_from_args(args)
    count = max(lv.num_requests for lv in levels)
    if args.dataset:
        conversations = jsonl_conversations(args.dataset, count, args.seed)
    else:
        conversations = synthetic_conversations(load_tokenizer(args.tokenizer), count, args.input_len, args.seed)
    workload = Workload(conversations, args.output_len, args.seed, args.duration, args.request_timeout, args.warmup)
    slos = parse_slos(args.goodput)
    runs: list[dict[str, Any]] = []
    for target in targets:
        runs += asyncio.run(run_target(target, workload, levels, slos, show_progress=not args.no_progress))
    print_table(runs)
    if args.out:
        meta = metadata(workload, input_len=None if args.dataset else args.input_len,
                        dataset=str(args.dataset) if args.dataset else None,
                        levels=[asdict(lv) for lv in levels])
        write_json(args.out, meta, runs)
    if args.plot:
        from service.loadgen.plot import plot

        plot(runs, args.plot)
    return 0 if all(r["failed"] == 0 for r in runs) else 1
