"""Prometheus metrics under vLLM's names and labels, so existing vLLM dashboards work unchanged.

Latencies are observed per request as its events arrive (RequestTimer); engine
gauges (running, waiting, KV usage) are read from each engine's stats() at
scrape time, so they cost nothing between scrapes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from service.backends.base import EngineStats, Event, Finished, TokenDelta

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


class RequestTimer:
    """Observes one request's latencies from its engine events."""

    def __init__(self, model: str, prompt_tokens: int) -> None:
        self._model = model
        self._start = time.monotonic()
        self._last: float | None = None
        self._choices_open: int | None = None
        PROMPT_TOKENS.labels(model).inc(prompt_tokens)

    def on_event(self, event: Event) -> None:
        now = time.monotonic()
        if isinstance(event, TokenDelta):
            if self._last is None:
                TTFT.labels(self._model).observe(now - self._start)
            else:
                ITL.labels(self._model).observe(now - self._last)
            self._last = now
        elif isinstance(event, Finished):
            GENERATION_TOKENS.labels(self._model).inc(event.completion_tokens)
            SUCCESS.labels(self._model, event.finish_reason.value).inc()
            if event.index == 0:
                E2E.labels(self._model).observe(now - self._start)
                QUEUE.labels(self._model).observe(event.queue_time)


StatsSource = Callable[[], Iterable[tuple[str, EngineStats]]]


class EngineGauges(Collector):
    """num_requests_running/waiting and kv_cache_usage_perc, read from the engines when scraped.

    Registered once per process; each running server adds its engines as a source.
    """

    def __init__(self) -> None:
        self.sources: list[StatsSource] = []

    def collect(self) -> Iterable[GaugeMetricFamily]:
        running = GaugeMetricFamily("vllm:num_requests_running", "Sequences being decoded.", labels=["model_name"])
        waiting = GaugeMetricFamily("vllm:num_requests_waiting", "Requests waiting.", labels=["model_name"])
        kv = GaugeMetricFamily("vllm:kv_cache_usage_perc", "KV cache usage, 1 is full.", labels=["model_name"])
        for source in self.sources:
            for model, s in source():
                running.add_metric([model], s.running)
                waiting.add_metric([model], s.waiting)
                kv.add_metric([model], s.kv_usage)
        yield from (running, waiting, kv)

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return []


ENGINE_GAUGES = EngineGauges()
REGISTRY.register(ENGINE_GAUGES)
