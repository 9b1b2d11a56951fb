"""The load generator: its metric definitions, its workload, and short bounded runs against a real server."""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench.floor import floor_note, weight_bytes
from bench.report import BEGIN, END, goals, markers, update_doc
from service.cli import main as cli_main
from service.loadgen.clients import OpenAIClient, Target
from service.loadgen.metrics import RequestRecord, parse_slos, percentile, summarize
from service.loadgen.runner import Level, Workload, run_target
from service.loadgen.workload import (
    arrival_offsets,
    jsonl_conversations,
    load_tokenizer,
    synthetic_conversations,
    synthetic_prompt,
)

ROOT = Path(__file__).resolve().parents[2]


def record(start: float, chunks: list[float], end: float, tokens: int, prompt: int = 10) -> RequestRecord:
    return RequestRecord(start=start, chunk_times=chunks, end=end, prompt_tokens=prompt, output_tokens=tokens,
                         usage_reported=True)


def test_request_metrics_follow_the_field_definitions() -> None:
    # Four chunks carried six tokens: the server coalesced some, so ITL is per chunk gap, TPOT per token.
    r = record(1.0, [1.1, 1.12, 1.15, 1.2], 1.21, tokens=6)
    assert r.ttft == pytest.approx(0.1)
    assert r.itls == pytest.approx([0.02, 0.03, 0.05])
    assert r.latency == pytest.approx(0.21)
    assert r.tpot == pytest.approx((0.21 - 0.1) / 5)
    assert record(0, [0.1], 0.1, tokens=1).tpot is None


@given(st.lists(st.floats(0, 1e4, allow_nan=False), min_size=1, max_size=50), st.sampled_from([0, 50, 90, 99, 100]))
def test_percentile_is_numpys_linear_percentile(values: list[float], p: int) -> None:
    assert percentile(values, p) == pytest.approx(float(np.percentile(values, p)), rel=1e-9, abs=1e-9)


def test_summary_divides_by_wall_time_and_counts_goodput_under_slos() -> None:
    fast = record(0.0, [0.05, 0.07, 0.09], 0.10, tokens=3, prompt=7)
    slow = record(0.5, [0.8, 0.9], 1.0, tokens=2, prompt=9)
    failed = RequestRecord(start=0.2, end=0.3, error="HTTP 500: boom")
    s = summarize([fast, slow, failed], duration=2.0, slos=parse_slos(["ttft:100"]))
    assert (s["completed"], s["failed"]) == (2, 1)
    assert s["output_tokens_per_s"] == pytest.approx(5 / 2.0)
    assert s["total_tokens_per_s"] == pytest.approx((5 + 16) / 2.0)
    assert s["requests_per_s"] == pytest.approx(1.0)
    assert s["goodput_requests_per_s"] == pytest.approx(0.5)  # only `fast` answered within 100 ms
    assert s["ttft_ms"]["mean"] == pytest.approx((50 + 300) / 2)
    assert s["itl_ms"]["mean"] == pytest.approx((20 + 20 + 100) / 3)  # pooled over both requests
    assert s["tpot_ms"]["p50"] == pytest.approx(((0.05 / 2) + (0.2 / 1)) / 2 * 1000)
    assert s["errors"] == ["HTTP 500: boom"]


def test_slo_flags_are_checked() -> None:
    assert parse_slos(["ttft:200", "tpot:50"]) == {"ttft": 0.2, "tpot": 0.05}
    with pytest.raises(ValueError, match="ttft, tpot, e2el"):
        parse_slos(["latency:3"])


def test_target_specs() -> None:
    assert Target.parse("grpc://127.0.0.1:1", "demo") == Target("grpc", "grpc", "grpc://127.0.0.1:1")
    assert Target.parse("vllm=http://127.0.0.1:2/v1", "m") == Target("vllm", "openai", "http://127.0.0.1:2/v1", "m")
    assert Target.parse("hf+http://127.0.0.1:3/v1", "demo").kind == "hf"
    with pytest.raises(ValueError, match="kind"):
        Target.parse("tgi+http://127.0.0.1:4", "demo")


def test_transformers_serve_is_asked_for_exact_length_through_its_generation_config() -> None:
    hf = OpenAIClient(Target("hf", "hf", "http://127.0.0.1:1/v1"), output_len=64, max_connections=1, timeout=1)
    body = hf.body([{"role": "user", "content": "hi"}], seed=3)
    config = json.loads(body["generation_config"])
    assert config["min_new_tokens"] == config["max_new_tokens"] == 64
    assert "model" not in body and "ignore_eos" not in body
    openai = OpenAIClient(Target("v", "openai", "http://127.0.0.1:1/v1"), output_len=64, max_connections=1, timeout=1)
    assert openai.body([{"role": "user", "content": "hi"}], seed=3)["ignore_eos"] is True


def test_poisson_arrivals_are_seeded_with_the_requested_rate() -> None:
    offsets = arrival_offsets(4000, request_rate=50.0, seed=1)
    gaps = np.diff(offsets)
    assert gaps.mean() == pytest.approx(1 / 50, rel=0.06)
    assert gaps.std() == pytest.approx(1 / 50, rel=0.1)  # exponential: std equals mean
    assert offsets == arrival_offsets(4000, 50.0, seed=1)
    assert arrival_offsets(3, math.inf, seed=1) == [0.0, 0.0, 0.0]


def test_synthetic_prompts_have_the_requested_token_length(engines_dir: Path) -> None:
    tokenizer = load_tokenizer(engines_dir / "demo" / "checkpoint")
    rng = random.Random(0)
    lengths = [len(tokenizer.encode(synthetic_prompt(tokenizer, 32, rng), add_special_tokens=False).ids)
               for _ in range(40)]
    assert sum(n == 32 for n in lengths) >= 36
    assert all(28 <= n <= 36 for n in lengths)


def test_jsonl_conversations_end_at_the_last_user_turn(tmp_path: Path) -> None:
    path = tmp_path / "chats.jsonl"
    path.write_text(
        json.dumps({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q1"},
                                 {"role": "assistant", "content": "a1"}]}) + "\n\n" +
        json.dumps({"conversations": [{"from": "human", "value": "q2"}, {"from": "gpt", "value": "a2"},
                                      {"from": "human", "value": "q3"}]}) + "\n")
    chats = jsonl_conversations(path, count=4, seed=0)
    assert len(chats) == 4
    assert {json.dumps(c) for c in chats} == {
        json.dumps([{"role": "system", "content": "s"}, {"role": "user", "content": "q1"}]),
        json.dumps([{"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"},
                    {"role": "user", "content": "q3"}])}


@pytest.fixture(scope="module")
def workload(engines_dir: Path) -> Workload:
    tokenizer = load_tokenizer(engines_dir / "demo" / "checkpoint")
    return Workload(synthetic_conversations(tokenizer, 8, 16, seed=0), output_len=8, duration=20, request_timeout=20)


@pytest.mark.timeout(60)
async def test_grpc_and_rest_runs_measure_every_request(server: object, workload: Workload) -> None:
    grpc_target = Target("grpc", "grpc", f"127.0.0.1:{server.grpc_port}")  # type: ignore[attr-defined]
    rest_target = Target("rest", "openai",
                         f"http://127.0.0.1:{server.config.server.http_port}/v1")  # type: ignore[attr-defined]
    runs = []
    for target in (grpc_target, rest_target):
        runs += await run_target(target, workload, [Level(6, concurrency=3)], parse_slos(["e2el:60000"]),
                                 show_progress=False)
    for run in runs:
        assert (run["completed"], run["failed"]) == (6, 0), run["errors"]
        assert run["usage_reported"]
        assert run["output_tokens"] == 6 * 8  # EOS ignored: exactly max_tokens each
        assert run["goodput_requests_per_s"] == pytest.approx(run["requests_per_s"])
        assert 0 < run["ttft_ms"]["p50"] <= run["e2el_ms"]["p50"]
        assert run["tpot_ms"]["p50"] > 0 and run["itl_ms"]["p99"] > 0
    # The same prompts went to both APIs, rendered by the same template.
    assert runs[0]["prompt_tokens"] == runs[1]["prompt_tokens"] > 6 * 16


@pytest.mark.timeout(30)
async def test_duration_bounds_a_run(server: object, workload: Workload) -> None:
    target = Target("grpc", "grpc", f"127.0.0.1:{server.grpc_port}")  # type: ignore[attr-defined]
    bounded = Workload(workload.conversations, output_len=4, duration=0.6, request_timeout=10)
    started = time.monotonic()
    [run] = await run_target(target, bounded, [Level(1000, request_rate=4.0)], show_progress=False)
    assert time.monotonic() - started < 10
    assert 1 <= run["completed"] <= 4  # Poisson at 4/s for 0.6 s, not the 1000 asked for


@pytest.mark.timeout(60)
async def test_cli_writes_json_and_plot(server: object, engines_dir: Path, tmp_path: Path) -> None:
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    argv = ["bench", "--target", f"grpc://127.0.0.1:{server.grpc_port}",  # type: ignore[attr-defined]
            "--tokenizer", str(engines_dir / "demo" / "checkpoint"), "--concurrency", "1,2", "--num-requests", "3",
            "--output-len", "4", "--warmup", "1", "--no-progress", "--goodput", "ttft:60000", "--out", str(out),
            "--plot", str(png)]
    assert await asyncio.to_thread(cli_main, argv) == 0
    result = json.loads(out.read_text())
    assert [r["concurrency"] for r in result["runs"]] == [1, 2]
    assert all(r["completed"] == 3 and r["output_tokens"] == 12 for r in result["runs"])
    assert result["meta"]["levels"][0]["request_rate"] is None  # infinity is written as null
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _run(target: str, c: int, tps: float, ttft_p99: float = 10.0) -> dict:
    return {"target": target, "concurrency": c, "output_tokens_per_s": tps, "ttft_ms": {"p99": ttft_p99}}


def test_record_goals_and_doc_section(tmp_path: Path) -> None:
    runs = [_run("llmserve-grpc", 8, 3000, 20), _run("vllm", 8, 2000, 40), _run("llmserve-rest", 8, 2600),
            _run("llmserve-grpc", 32, 3000, 90), _run("vllm", 32, 2800, 60)]
    met = {(g, c): ok for g, c, _, ok in goals(runs)}
    assert met[("gRPC / vLLM ≥ 1.2", 8)] and not met[("gRPC / vLLM ≥ 1.2", 32)]
    assert not met[("REST / gRPC ≥ 0.9", 8)]  # 2600 / 3000 = 0.87
    assert met[("TTFT p99 gRPC / vLLM < 1", 8)] and not met[("TTFT p99 gRPC / vLLM < 1", 32)]
    assert ("gRPC / transformers serve ≥ 2.0", 8) not in met  # not measured: not judged
    doc = tmp_path / "performance.md"
    doc.write_text(f"# Performance\n\nbefore\n\n{BEGIN}\nold\n{END}\n\nafter\n")
    update_doc(doc, [], Path("bench/results/x.json"))
    text = doc.read_text()
    assert "before" in text and "after" in text and "old" not in text and "bench/results/x.json" in text


def test_each_models_record_has_its_own_section(tmp_path: Path) -> None:
    doc = tmp_path / "performance.md"
    doc.write_text(f"# Performance\n\n{BEGIN}\ndemo record\n{END}\n\nafter\n")
    note = "Weight-read floor at 1 stream: ..."
    update_doc(doc, [], Path("bench/results/y.json"), "smollm2-135m-instruct", (note,))
    update_doc(doc, [], Path("bench/results/z.json"), "smollm2-135m-instruct", (note,))  # rewritten in place
    text = doc.read_text()
    begin, end = markers("smollm2-135m-instruct")
    assert "demo record" in text and "after" in text and text.count(begin) == text.count(end) == 1
    assert note in text.partition(begin)[2] and "bench/results/z.json" in text and "y.json" not in text


def test_the_floor_is_the_weights_bytes_over_the_bandwidth(engines_dir: Path) -> None:
    from safetensors.torch import load_file

    checkpoint = engines_dir / "demo" / "checkpoint"
    tensors = load_file(str(checkpoint / "model.safetensors"))
    assert weight_bytes(checkpoint) == sum(t.numel() * t.element_size() for t in tensors.values())
    line = floor_note(500_000_000, 25e9, {"llmserve-grpc": (30.0, "bfloat16"), "vllm": (60.0, "float32")})[0]
    assert "25.0 GB/s" in line and "float32, 500 MB: **20.0 ms a token**" in line
    assert "bfloat16, 250 MB: **10.0 ms a token**" in line
    assert "llmserve-grpc (bfloat16) 30.0 ms (3.0x its floor)" in line and "vllm (float32) 60.0 ms (3.0x its" in line
