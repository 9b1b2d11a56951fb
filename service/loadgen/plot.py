"""The benchmark's picture: output tokens/s and TTFT p99 against load, one line per target."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def _load(run: dict[str, Any]) -> float | None:
    return run["concurrency"] if run["concurrency"] is not None else run["request_rate"]


def plot(runs: list[dict[str, Any]], path: Path, title: str = "") -> None:
    """Runs without a TTFT (a forward-step ceiling) appear on the throughput panel only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_rate = all(r["concurrency"] is None for r in runs)
    fig, (tput, ttft) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label in dict.fromkeys(r["target"] for r in runs):
        points = sorted((_load(r), r) for r in runs if r["target"] == label and _load(r) is not None)
        xs = [x for x, _ in points]
        style = {"linestyle": "--", "color": "gray"} if label == "ceiling" else {}
        tput.plot(xs, [r["output_tokens_per_s"] for _, r in points], marker="o", label=label, **style)
        p99 = [r.get("ttft_ms", {}).get("p99") for _, r in points]
        if any(v is not None and not math.isnan(v) for v in p99):
            ttft.plot(xs, p99, marker="o", label=label, **style)
    xlabel = "request rate (req/s)" if by_rate else "concurrent streams"
    loads = sorted({x for r in runs if (x := _load(r)) is not None})
    for ax, ylabel in ((tput, "output tokens/s"), (ttft, "TTFT p99 (ms, log scale)")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_xscale("log", base=2)
        ax.set_xticks(loads, [f"{x:g}" for x in loads])
        ax.grid(True, alpha=0.3)
        ax.legend()
    tput.set_ylim(bottom=0)
    ttft.set_yscale("log")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
