"""Prometheus metrics under vLLM's names and labels, so existing vLLM dashboards work unchanged.

Latencies are observed per request as its events arrive (RequestTimer); engine
gauges (running, waiting, KV usage) are read from each engine's stats() at
scrape time, so they cost nothing between scrapes. As vLLM labels each of its
engines with `engine`, a model served by gRPC workers has one series per
worker (`engine` is its KIND://HOST:PORT address, with the counts it reports),
and an in-process engine is engine "0". Beside them, per worker, what only
llmserve knows: its requests in flight there, whether the worker is in
rotation, and the errors of its calls (llmserve:worker_*).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from service.backends.base import Engine, EngineStats, Event, Finished, TokenDelta, WorkerStatus

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                    20.0, 40.0, 80.0)

TTFT = Histogram("vllm:time_to_first_token_seconds", "Time to first token.", ["model_name"], buckets=_LATENCY_BUCKETS)
ITL = Histogram("vllm:inter_token_latency_seconds", "Time between streamed tokens.", ["model_name"],
                buckets=_LATENCY_BUCKETS)
E2E = Histogram("vllm:e2e_request_latency_seconds", "End-to-end request latency.", ["model_name"],
                buckets=_LATENCY_BUCKETS)
QUEUE = Histogram("vllm:request_queue_time_seconds", "Time waiting before the prefill.", ["model_name"],
                  buckets=_LATENCY_BUCKETS)
SUCCESS = Counter("vllm:request_success", "Finished requests by finish reason.", ["model_name", "finished_reason"])
PROMPT_TOKENS = Counter("vllm:prompt_tokens", "Prompt tokens processed.", ["model_name"])
GENERATION_TOKENS = Counter("vllm:generation_tokens", "Tokens generated.", ["model_name"])
WORKER_ERRORS = Counter("llmserve:worker_errors", "Calls to a gRPC worker that failed, by gRPC code (EOF: the "
                        "stream ended early).", ["model_name", "engine", "code"])


class RequestTimer:
    """Observes one request's latencies from its engine events."""

    def __init__(self, model: str, prompt_tokens: int) -> None:
        self._model = model
        self._start = time.monotonic()
        self._last: float | None = None
        self._choices_open: int | None = None
        self._itl = ITL.labels(model)   # observed per token: looked up once
        PROMPT_TOKENS.labels(model).inc(prompt_tokens)

    def on_event(self, event: Event) -> None:
        now = time.monotonic()
        if isinstance(event, TokenDelta):
            if self._last is None:
                TTFT.labels(self._model).observe(now - self._start)
            else:
                self._itl.observe(now - self._last)
            self._last = now
        elif isinstance(event, Finished):
            GENERATION_TOKENS.labels(self._model).inc(event.completion_tokens)
            SUCCESS.labels(self._model, event.finish_reason.value).inc()
            if event.index == 0:
                E2E.labels(self._model).observe(now - self._start)
                QUEUE.labels(self._model).observe(event.queue_time)


EngineSource = Callable[[], Iterable[tuple[str, Engine]]]
IDLE = EngineStats(0, 0, 0, 0)


def _worker_stats(worker: WorkerStatus) -> EngineStats:
    """What a worker reports, or this server's calls on it where its kind reports nothing; zero for a worker out
    of rotation, as for an engine that failed: the autoscaler must not count work that may never finish."""
    if not worker.healthy:
        return IDLE
    return worker.stats or EngineStats(worker.in_flight, 0, 0, 0)


class EngineGauges(Collector):
    """num_requests_running/waiting and kv_cache_usage_perc per engine (each worker of a model), and the workers'
    requests in flight and rotation, read from the engines when scraped.

    Registered once per process; each running server adds its models as a source.
    """

    def __init__(self) -> None:
        self.sources: list[EngineSource] = []

    def collect(self) -> Iterable[GaugeMetricFamily]:
        labels = ["model_name", "engine"]
        running = GaugeMetricFamily("vllm:num_requests_running", "Sequences being decoded.", labels=labels)
        waiting = GaugeMetricFamily("vllm:num_requests_waiting", "Requests waiting.", labels=labels)
        kv = GaugeMetricFamily("vllm:kv_cache_usage_perc", "KV cache usage, 1 is full.", labels=labels)
        in_flight = GaugeMetricFamily("llmserve:worker_requests_in_flight", "This server's requests on a gRPC "
                                      "worker now.", labels=labels)
        healthy = GaugeMetricFamily("llmserve:worker_healthy", "1 while a gRPC worker is in rotation (answers its "
                                    "health probe), else 0.", labels=labels)
        for source in self.sources:
            for model, engine in source():
                workers = engine.workers()
                rows = [(w.address, _worker_stats(w)) for w in workers] or \
                    [("0", engine.stats() if engine.health().ok else IDLE)]
                for label, stats in rows:
                    running.add_metric([model, label], stats.running)
                    waiting.add_metric([model, label], stats.waiting)
                    kv.add_metric([model, label], stats.kv_usage)
                for w in workers:
                    in_flight.add_metric([model, w.address], w.in_flight)
                    healthy.add_metric([model, w.address], int(w.healthy))
        yield from (running, waiting, kv, in_flight, healthy)

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return []


ENGINE_GAUGES = EngineGauges()
REGISTRY.register(ENGINE_GAUGES)
