"""The serving metrics, defined as vLLM's `bench serve` and NVIDIA GenAI-Perf define them.

One `RequestRecord` per request holds only timestamps and counts taken while
streaming; every statistic is derived afterwards, so the client does no
per-token work beyond reading the clock.

- TTFT: from sending the request to its first streamed content chunk.
- ITL: every gap between consecutive content chunks of a request, pooled over
  requests. A server that coalesces tokens into one chunk shows fewer, longer gaps.
- TPOT: per request, (latency - TTFT) / (output tokens - 1), over requests with
  more than one output token. Output tokens come from the server's usage.
- E2E latency: from sending to the last byte of the stream.
- Throughput: totals over the benchmark's wall time (first send to last finish).
- Goodput: requests/s of those that met every SLO given.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any

PERCENTILES = (50, 90, 99)
SLO_METRICS = ("ttft", "tpot", "e2el")


@dataclass
class RequestRecord:
    """What one request measured, in seconds of time.perf_counter()."""

    start: float = 0.0
    # Arrival time of each chunk that carried content.
    chunk_times: list[float] = field(default_factory=list)
    end: float = 0.0
    prompt_tokens: int = 0
    output_tokens: int = 0
    # True when the server reported usage; otherwise output_tokens counts chunks.
    usage_reported: bool = False
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error and bool(self.chunk_times)

    @property
    def ttft(self) -> float:
        return self.chunk_times[0] - self.start

    @property
    def latency(self) -> float:
        return self.end - self.start

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in itertools.pairwise(self.chunk_times)]

    @property
    def tpot(self) -> float | None:
        if self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


def percentile(values: list[float], p: float) -> float:
    """Linear interpolation between closest ranks, as numpy.percentile's default does."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def distribution(seconds: list[float]) -> dict[str, float]:
    """Mean and percentiles, in milliseconds."""
    ms = [s * 1000 for s in seconds]
    out = {"mean": sum(ms) / len(ms) if ms else math.nan}
    out.update({f"p{p}": percentile(ms, p) for p in PERCENTILES})
    return out


def parse_slos(specs: list[str]) -> dict[str, float]:
    """`ttft:200 tpot:50` (milliseconds, as vLLM's --goodput takes them) to seconds per metric."""
    slos: dict[str, float] = {}
    for spec in specs:
        name, sep, value = spec.partition(":")
        if not sep or name not in SLO_METRICS:
            raise ValueError(f"SLO {spec!r}: expected NAME:MILLISECONDS with NAME one of {', '.join(SLO_METRICS)}")
        slos[name] = float(value) / 1000
    return slos


def meets_slos(record: RequestRecord, slos: dict[str, float]) -> bool:
    measured = {"ttft": record.ttft, "tpot": record.tpot or 0.0, "e2el": record.latency}
    return all(measured[name] <= limit for name, limit in slos.items())


def summarize(records: list[RequestRecord], duration: float, slos: dict[str, float] | None = None) -> dict[str, Any]:
    """The run's statistics; `duration` is the wall time the throughputs divide by."""
    done = [r for r in records if r.ok]
    output_tokens = sum(r.output_tokens for r in done)
    prompt_tokens = sum(r.prompt_tokens for r in done)
    good = [r for r in done if meets_slos(r, slos)] if slos else done
    return {
        "completed": len(done),
        "failed": len(records) - len(done),
        "errors": sorted({r.error for r in records if r.error})[:5],
        "usage_reported": all(r.usage_reported for r in done),
        "duration_s": duration,
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "output_tokens_per_s": output_tokens / duration if duration > 0 else math.nan,
        "total_tokens_per_s": (prompt_tokens + output_tokens) / duration if duration > 0 else math.nan,
        "requests_per_s": len(done) / duration if duration > 0 else math.nan,
        "goodput_requests_per_s": len(good) / duration if duration > 0 else math.nan,
        "slos_ms": {k: v * 1000 for k, v in (slos or {}).items()},
        "ttft_ms": distribution([r.ttft for r in done]),
        "tpot_ms": distribution([t for r in done if (t := r.tpot) is not None]),
        "itl_ms": distribution([gap for r in done for gap in r.itls]),
        "e2el_ms": distribution([r.latency for r in done]),
    }
