"""Soak: a bounded mixed load against a real server process, watching for anything lost or leaked.

    python -m bench.soak [--minutes 10] [--concurrency 16] [--fault-every 15] [--out soak.json]

The server (bench.soak_server: llmserve with an engine step fault injected every --fault-every seconds) gets
unary and streaming requests over gRPC and REST, streams cancelled at random points, invalid requests and
requests with deadlines too short to finish. Every request must end with a complete answer or an explicit
status; every INTERNAL must be explained by an injected fault. The server's RSS and KV usage are sampled
throughout; the run fails on a rising RSS trend after warm-up, on KV still held at the end, on a server that is
not SERVING, or on a drain that does not exit 0. Writes JSON (bench/results/soak-<time>.json) and a plot.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from bench.processes import free_port
from service.gen.llmserve.v1 import chat_pb2, chat_pb2_grpc
from service.healthcheck import wait_serving

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
KINDS = {"unary": 30, "stream": 30, "cancel": 20, "invalid": 10, "deadline": 10}  # weights
MAX_REQUESTS = 1_000_000  # a count bound beside the time bound


class SoakServer:
    def __init__(self, engines_dir: Path, fault_every: float, workdir: Path) -> None:
        self.grpc_port, self.http_port = free_port(), free_port()
        self.report = workdir / "faults.json"
        self.log = workdir / "server.log"
        cmd = [sys.executable, "-m", "bench.soak_server", "--fault-every", str(fault_every), "--fault-report",
               str(self.report), "--engines-dir", str(engines_dir), "--host", "127.0.0.1", "--grpc-port",
               str(self.grpc_port), "--http-port", str(self.http_port), "--log-level", "warning",
               "--max-running", "16", "--max-queue", "64",
               "--no-engine-process"]  # the fault hook is installed in the engine, in this process
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log.open("w"), stderr=subprocess.STDOUT)

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return -9


@dataclass
class Tally:
    outcomes: Counter[str] = field(default_factory=Counter)
    by_door: Counter[str] = field(default_factory=Counter)
    unexpected: list[str] = field(default_factory=list)

    def add(self, door: str, kind: str, outcome: str, expected: set[str]) -> None:
        self.by_door[door] += 1
        self.outcomes[outcome] += 1
        if outcome not in expected:
            self.unexpected.append(f"{door} {kind}: {outcome}")

    @property
    def total(self) -> int:
        return sum(self.by_door.values())


class Load:
    """One request at a time per worker, of a random kind, through a random front door."""

    def __init__(self, server: SoakServer, seed: int) -> None:
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}")
        self.stub = chat_pb2_grpc.ChatServiceStub(self.channel)
        self.http = httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.http_port}", timeout=60)
        self.rng = random.Random(seed)
        self.tally = Tally()

    async def one(self, i: int) -> None:
        rng = self.rng
        kind = rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
        door = "rest" if rng.random() < 1 / 3 else "grpc"
        tokens = rng.randint(8, 128)
        body: dict[str, Any] = {"model": "demo", "messages": [{"role": "user", "content": f"soak {i} " * rng.randint(
            1, 40)}], "max_tokens": tokens, "ignore_eos": True, "seed": i}
        if kind == "invalid":
            body["temperature"] = 7.5
        if kind in ("stream", "cancel"):
            body.update(stream=True, stream_options={"include_usage": True})
        timeout = rng.uniform(0.05, 0.5) if kind == "deadline" else 60.0
        expected = {"ok", "internal"} | {"cancel": {"cancelled"}, "invalid": {"invalid_argument"},
                                         "deadline": {"deadline_exceeded"}}.get(kind, set())
        chunks_before_cancel = rng.randint(0, 10) if kind == "cancel" else None
        send = self._rest if door == "rest" else self._grpc
        outcome = await send(body, tokens, timeout, chunks_before_cancel)
        self.tally.add(door, kind, outcome, expected)

    async def _grpc(self, body: dict[str, Any], tokens: int, timeout: float, cancel_after: int | None) -> str:
        from google.protobuf import json_format

        req = json_format.ParseDict({k: v for k, v in body.items() if k != "stream"}, chat_pb2.ChatCompletionRequest())
        try:
            if not body.get("stream"):
                reply = await self.stub.CreateChatCompletion(req, timeout=timeout)
                return "ok" if reply.usage.completion_tokens == tokens else f"short {reply.usage.completion_tokens}"
            call = self.stub.StreamChatCompletion(req, timeout=timeout)
            chunks = []
            while (chunk := await call.read()) is not grpc.aio.EOF:
                chunks.append(chunk)
                if cancel_after is not None and len(chunks) > cancel_after:
                    call.cancel()
                    return "cancelled"
            finished = any(c.finish_reason for chunk in chunks for c in chunk.choices)
            usage = chunks[-1].usage.completion_tokens if chunks else -1
            return "ok" if finished and usage == tokens else f"stream ended without finish ({usage} tokens)"
        except grpc.aio.AioRpcError as e:
            return e.code().name.lower()

    async def _rest(self, body: dict[str, Any], tokens: int, timeout: float, cancel_after: int | None) -> str:
        headers = {"x-request-timeout": f"{timeout:.3f}"}
        try:
            if not body.get("stream"):
                r = await self.http.post("/v1/chat/completions", json=body, headers=headers)
                if r.status_code != 200:
                    return r.json()["error"]["code"]
                return "ok" if r.json()["usage"]["completion_tokens"] == tokens else "short"
            async with self.http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r:
                if r.status_code != 200:
                    return json.loads(await r.aread())["error"]["code"]
                events = []
                async for line in r.aiter_lines():
                    if not line:
                        continue
                    events.append(line)
                    if cancel_after is not None and len(events) > cancel_after:
                        return "cancelled"  # leaving the block closes the connection
        except httpx.HTTPError as e:
            return f"http error {type(e).__name__}"
        if events[-1] != "data: [DONE]":
            return f"stream ended without [DONE]: {events[-1][:200]}"
        last = json.loads(events[-2][6:])
        if "error" in last:
            return str(last["error"]["code"])
        finished = any(c.get("finish_reason") for e in events[:-1] for c in json.loads(e[6:]).get("choices", []))
        return "ok" if finished and last["usage"]["completion_tokens"] == tokens else "stream ended without finish"

    async def close(self) -> None:
        await self.channel.close()
        await self.http.aclose()


async def engine_sample(server: SoakServer, http: httpx.AsyncClient, started: float) -> dict[str, float]:
    metrics = {m.name: m.samples[0].value for m in text_string_to_metric_families((await http.get("/metrics")).text)
               if m.name.startswith("vllm:num_requests") or m.name == "vllm:kv_cache_usage_perc"}
    return {"t": round(time.monotonic() - started, 1), "rss_mib": round(server.rss_mib(), 1),
            "kv_usage": metrics.get("vllm:kv_cache_usage_perc", 0.0),
            "running": metrics.get("vllm:num_requests_running", 0.0),
            "waiting": metrics.get("vllm:num_requests_waiting", 0.0)}


def slope_per_minute(samples: list[dict[str, float]]) -> float:
    """Least-squares slope of RSS against time, MiB a minute."""
    n = len(samples)
    if n < 3:
        return 0.0
    ts = [s["t"] / 60 for s in samples]
    ys = [s["rss_mib"] for s in samples]
    mt, my = sum(ts) / n, sum(ys) / n
    var = sum((t - mt) ** 2 for t in ts)
    return sum((t - mt) * (y - my) for t, y in zip(ts, ys, strict=True)) / var if var else 0.0


async def soak(args: argparse.Namespace, server: SoakServer) -> dict[str, Any]:
    load = Load(server, args.seed)
    samples: list[dict[str, float]] = []
    started = time.monotonic()
    stop_at = started + args.minutes * 60
    counter = iter(range(MAX_REQUESTS))

    async def worker() -> None:
        while time.monotonic() < stop_at and (i := next(counter, None)) is not None:
            await load.one(i)

    async def sampler() -> None:
        while True:
            samples.append(await engine_sample(server, load.http, started))
            s, t = samples[-1], load.tally
            print(f"[{s['t']:6.0f}s / {args.minutes * 60:.0f}s] {t.total} requests {dict(t.outcomes)} "
                  f"RSS {s['rss_mib']:.0f} MiB, KV {s['kv_usage']:.0%}", flush=True)
            await asyncio.sleep(args.sample_every)

    sampling = asyncio.create_task(sampler())
    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    sampling.cancel()
    idle_by = time.monotonic() + 15
    while True:
        end = await engine_sample(server, load.http, started)
        if (end["running"], end["waiting"], end["kv_usage"]) == (0, 0, 0) or time.monotonic() > idle_by:
            break
        await asyncio.sleep(0.2)
    samples.append(end)
    health = await health_pb2_grpc.HealthStub(load.channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    await load.close()
    return {"samples": samples, "end": end, "serving": health.status == health_pb2.HealthCheckResponse.SERVING,
            "tally": load.tally, "seconds": round(time.monotonic() - started, 1)}


def plot(samples: list[dict[str, float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, rss = plt.subplots(figsize=(8, 4))
    ts = [s["t"] / 60 for s in samples]
    rss.plot(ts, [s["rss_mib"] for s in samples], color="tab:blue", label="server RSS (MiB)")
    rss.set_xlabel("minutes")
    rss.set_ylabel("RSS (MiB)", color="tab:blue")
    kv = rss.twinx()
    kv.plot(ts, [100 * s["kv_usage"] for s in samples], color="tab:orange", label="KV cache used (%)")
    kv.set_ylabel("KV cache used (%)", color="tab:orange")
    kv.set_ylim(0, 100)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--fault-every", type=float, default=15.0, help="seconds between injected engine faults")
    parser.add_argument("--sample-every", type=float, default=5.0, help="seconds between RSS and KV samples")
    parser.add_argument("--warmup", type=float, default=0.25, help="fraction of the run left out of the RSS trend")
    parser.add_argument("--leak-mib", type=float, default=32.0,
                        help="fail when RSS rises by more than this after warm-up, in trend and in fact")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--engines-dir", type=Path, default=ROOT / "engines")
    parser.add_argument("--out", type=Path, help="default: bench/results/soak-<time>.json")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        server = SoakServer(args.engines_dir, args.fault_every, Path(tmp))
        try:
            try:
                wait_serving(f"127.0.0.1:{server.grpc_port}", server.proc, 60, lambda: server.log.read_text()[-2000:])
            except (RuntimeError, TimeoutError) as e:
                raise SystemExit(str(e)) from None
            print(f"soaking for {args.minutes:g} min at {args.concurrency} concurrent requests", flush=True)
            run = asyncio.run(soak(args, server))
        finally:
            exit_code = server.stop()
        faults = json.loads(server.report.read_text()) if server.report.exists() else {}
        server_log = server.log.read_text()

    tally: Tally = run["tally"]
    samples = run["samples"]
    trend = [s for s in samples if s["t"] >= args.warmup * run["seconds"]]
    slope = slope_per_minute(trend)
    window = (trend[-1]["t"] - trend[0]["t"]) / 60 if trend else 0.0
    growth = trend[-1]["rss_mib"] - trend[0]["rss_mib"] if trend else 0.0
    problems = list(tally.unexpected[:20])
    if tally.outcomes["internal"] > faults.get("requests_hit", 0):
        problems.append(f"{tally.outcomes['internal']} INTERNAL answers but faults hit {faults.get('requests_hit')}")
    end = run["end"]
    if (end["running"], end["waiting"], end["kv_usage"]) != (0, 0, 0):
        problems.append(f"engine not idle at the end: {end}")
    if not run["serving"]:
        problems.append("the server was not SERVING at the end")
    if exit_code != 0:
        problems.append(f"the drain exited {exit_code}")
    if slope * window > args.leak_mib and growth > args.leak_mib:
        problems.append(f"RSS rising: {slope:.1f} MiB/min over {window:.1f} min, {growth:.0f} MiB in all")
    if "Traceback" in server_log.replace("injected soak fault", ""):
        tracebacks = [b for b in server_log.split("Traceback")[1:] if "injected soak fault" not in b]
        if tracebacks:
            problems.append(f"unexplained traceback in the server log: {tracebacks[0][:500]}")

    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H%M%SZ")
    out = args.out or RESULTS / f"soak-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "minutes": args.minutes, "seconds": run["seconds"], "concurrency": args.concurrency,
        "requests": tally.total, "by_door": dict(tally.by_door), "outcomes": dict(tally.outcomes),
        "faults_injected": faults.get("injected", 0), "requests_hit_by_faults": faults.get("requests_hit", 0),
        "rss_mib": {"start": samples[0]["rss_mib"], "after_warmup": trend[0]["rss_mib"] if trend else None,
                    "end": samples[-1]["rss_mib"], "trend_mib_per_min": round(slope, 2)},
        "end": end, "drain_exit_code": exit_code, "problems": problems, "samples": samples,
        "host": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
    }
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot(samples, out.with_suffix(".png"), f"soak: {tally.total} requests in {run['seconds'] / 60:.1f} min")
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=2))
    print(f"wrote {out} and its plot", flush=True)
    if problems:
        print("SOAK FAILED:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
