"""The record's table in docs/performance.md: figures, ratios, and the goals met or missed.

Only the text between a model's two markers is rewritten, so the hand-written
parts of the page (the GPU picture, where the time goes) and the other models'
records survive every record run.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

BEGIN, END = "<!-- record:begin -->", "<!-- record:end -->"  # the demo model's record
# (label, target, ratio wanted) with llmserve gRPC's output tokens/s as the numerator.
THROUGHPUT_GOALS = (("gRPC / vLLM", "vllm", 1.2), ("gRPC / vLLM bf16", "vllm-bf16", 1.2),
                    ("gRPC / transformers serve", "transformers", 2.0), ("gRPC / forward ceiling", "ceiling", 0.8))
# At one stream the goal against vLLM is parity (issue 19); the others apply under load only.
ONE_STREAM_GOALS = {"vllm": 1.0, "vllm-bf16": 1.0}


def _index(runs: list[dict[str, Any]]) -> dict[tuple[str, int], dict[str, Any]]:
    return {(r["target"], r["concurrency"]): r for r in runs}


def _ratio(a: dict[str, Any] | None, b: dict[str, Any] | None) -> float:
    if not a or not b or not b.get("output_tokens_per_s"):
        return math.nan
    return a["output_tokens_per_s"] / b["output_tokens_per_s"]


def _fmt(value: float | None, digits: int = 1) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:,.{digits}f}"


def figures_table(runs: list[dict[str, Any]]) -> list[str]:
    lines = ["| streams | target | output tok/s | req/s | TTFT p50 | TTFT p99 | TPOT p50 | ITL p99 | E2E p50 "
             "| E2E p99 |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(runs, key=lambda r: (r["concurrency"], r["target"] != "ceiling")):
        if r["target"] == "ceiling":
            lines.append(f"| {r['concurrency']} | forward-step ceiling ({r['step_ms']:.2f} ms a step) | "
                         f"{_fmt(r['output_tokens_per_s'], 0)} | | | | | | | |")
            continue
        ttft, tpot, itl, e2el = (r[k] for k in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"))
        failed = f" ({r['failed']} failed)" if r["failed"] else ""
        lines.append(f"| {r['concurrency']} | {r['target']}{failed} | {_fmt(r['output_tokens_per_s'], 0)} | "
                     f"{_fmt(r['requests_per_s'])} | {_fmt(ttft['p50'])} | {_fmt(ttft['p99'])} | "
                     f"{_fmt(tpot['p50'], 2)} | {_fmt(itl['p99'])} | {_fmt(e2el['p50'], 0)} | {_fmt(e2el['p99'], 0)} |")
    return lines


def _peers(runs: list[dict[str, Any]]) -> list[tuple[str, str, float]]:
    """The throughput comparisons whose peer this record measured."""
    measured = {r["target"] for r in runs}
    return [goal for goal in THROUGHPUT_GOALS if goal[1] in measured]


def ratios_table(runs: list[dict[str, Any]]) -> list[str]:
    at = _index(runs)
    levels = sorted({r["concurrency"] for r in runs})
    peers = _peers(runs)
    lines = ["| streams | " + " | ".join(label for label, _, _ in peers) +
             " | REST / gRPC | TTFT p99 gRPC / vLLM |", "|---:|" + "---:|" * (len(peers) + 2)]
    for c in levels:
        grpc = at.get(("llmserve-grpc", c))
        cells = [_fmt(_ratio(grpc, at.get((peer, c))), 2) for _, peer, _ in peers]
        cells.append(_fmt(_ratio(at.get(("llmserve-rest", c)), grpc), 2))
        vllm = at.get(("vllm", c))
        ttft = grpc["ttft_ms"]["p99"] / vllm["ttft_ms"]["p99"] if grpc and vllm else math.nan
        cells.append(_fmt(ttft, 2))
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    return lines


def goals(runs: list[dict[str, Any]]) -> list[tuple[str, int, float, bool]]:
    """Each goal at each level measured: (goal, streams, measured, met); goals whose runs are absent are left out,
    and at one stream only parity with vLLM is a goal."""
    at = _index(runs)
    out = []
    for c in sorted({r["concurrency"] for r in runs}):
        grpc = at.get(("llmserve-grpc", c))
        for label, peer, wanted in _peers(runs):
            if c == 1 and peer not in ONE_STREAM_GOALS:
                continue
            wanted = ONE_STREAM_GOALS[peer] if c == 1 else wanted
            ratio = _ratio(grpc, at.get((peer, c)))
            if not math.isnan(ratio):
                out.append((f"{label} ≥ {wanted}", c, ratio, ratio >= wanted))
        rest = _ratio(at.get(("llmserve-rest", c)), grpc)
        if c > 1 and not math.isnan(rest):
            out.append(("REST / gRPC ≥ 0.9", c, rest, rest >= 0.9))
        vllm = at.get(("vllm", c))
        if c > 1 and grpc and vllm:
            ratio = grpc["ttft_ms"]["p99"] / vllm["ttft_ms"]["p99"]
            out.append(("TTFT p99 gRPC / vLLM < 1", c, ratio, ratio < 1))
    return out


def markers(model: str) -> tuple[str, str]:
    return (BEGIN, END) if model == "demo" else (f"<!-- record:{model}:begin -->", f"<!-- record:{model}:end -->")


def section(runs: list[dict[str, Any]], source: Path, model: str = "demo", notes: tuple[str, ...] = ()) -> str:
    begin, end = markers(model)
    lines = [begin, "", f"Raw figures: [`{source}`](../{source}); times in milliseconds.", "",
             *(line for note in notes for line in (note, "")),
             *figures_table(runs), "", "Ratios (output tokens/s unless named):", "", *ratios_table(runs), "",
             "| goal | streams | measured | met |", "|---|---:|---:|---|"]
    lines += [f"| {g} | {c} | {v:.2f} | {'yes' if ok else '**no**'} |" for g, c, v, ok in goals(runs)]
    return "\n".join([*lines, "", end])


def update_doc(doc: Path, runs: list[dict[str, Any]], source: Path, model: str = "demo",
               notes: tuple[str, ...] = ()) -> None:
    """Rewrites the model's record section, or appends one when the page has none yet."""
    text = doc.read_text() if doc.is_file() else "# Performance\n"
    new = section(runs, source, model, notes)
    begin, end = markers(model)
    if begin in text and end in text:
        head, _, rest = text.partition(begin)
        _, _, tail = rest.partition(end)
        text = head + new + tail
    else:
        text = text.rstrip("\n") + "\n\n" + new + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)
