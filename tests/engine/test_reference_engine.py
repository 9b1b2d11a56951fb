"""The reference engine: numerics against transformers, batching, every sampling parameter, streaming text."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from service.backends.base import (
    Finished,
    FinishReason,
    GenerationRequest,
    InvalidRequest,
    QueueFull,
    SamplingParams,
    TokenDelta,
)
from service.backends.detokenizer import IncrementalDetokenizer
from service.backends.reference import ReferenceEngine
from service.backends.reference.model import AttentionBatch, load_model
from service.backends.vocab import token_byte_table
from service.config import EngineConfig
from service.repository.manifest import load_manifest

PROMPT = [0, 2, 1100, 3, 271, 40, 1002, 333, 400, 17, 4, 2, 78, 3, 271]


@pytest.fixture(scope="module")
async def engine(engines_dir: Path) -> AsyncIterator[ReferenceEngine]:
    # float32: these tests compare with transformers' float32 token for token (bfloat16 is test_bfloat16.py's).
    eng = ReferenceEngine(load_manifest(engines_dir / "demo"), EngineConfig(max_running=32, max_cache_tokens=16384,
                                                                          engine_process=False, dtype="float32"))
    await eng.start()
    yield eng
    await eng.shutdown()


async def run(engine: ReferenceEngine, request: GenerationRequest) -> dict[int, dict]:
    out: dict[int, dict] = {}
    async for event in engine.generate(request):
        choice = out.setdefault(event.index, {"ids": [], "text": "", "logprobs": [], "finish": None})
        if isinstance(event, TokenDelta):
            choice["ids"] += event.token_ids
            choice["text"] += event.text
            choice["logprobs"] += event.logprobs or []
        else:
            choice["finish"], choice["completion_tokens"] = event.finish_reason, event.completion_tokens
    return out


def req(rid: str, prompt: list[int] = PROMPT, n: int = 1, **params: object) -> GenerationRequest:
    params.setdefault("max_tokens", 24)
    return GenerationRequest(rid, prompt, SamplingParams(**params), n=n)  # type: ignore[arg-type]


def _reference_logits(checkpoint: Path, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Our forward pass (prefill in two chunks, then decode one by one) and transformers' on the same tokens."""
    model = load_model(checkpoint, torch.float32, torch.device("cpu"))
    hf = LlamaForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    c = model.config
    kv = [(torch.zeros(256, c.num_kv_heads, c.head_dim), torch.zeros(256, c.num_kv_heads, c.head_dim))
          for _ in range(c.num_layers)]
    blocks = torch.tensor([5, 2, 9, 0, 7, 11, 3])  # scattered blocks of 8 slots, as the block manager hands them out
    slots = (blocks.unsqueeze(1) * 8 + torch.arange(8)).view(-1)
    with torch.inference_mode():
        expected = hf(ids[None]).logits[0]
        first = AttentionBatch(8, slots[:20], None, None, None, [(0, 20, blocks[:3], 0)])
        second = AttentionBatch(8, slots[20:30], None, None, None, [(0, 10, blocks[:4], 20)])
        parts = [model(ids[:20], torch.arange(20), kv, first, torch.arange(20)),
                 model(ids[20:30], torch.arange(20, 30), kv, second, torch.arange(10))]
        for p in range(30, len(ids)):
            n = p // 8 + 1
            mask = (torch.arange(n * 8) <= p).view(1, 1, 1, -1)
            step = AttentionBatch(8, slots[p:p + 1], torch.tensor([0]), blocks[:n][None], mask, [])
            parts.append(model(ids[p:p + 1], torch.tensor([p]), kv, step, torch.tensor([0])))
    return torch.cat(parts), expected


def test_logits_match_transformers_on_the_demo_model(engines_dir: Path) -> None:
    ids = torch.randint(0, 4096, (40,), generator=torch.Generator().manual_seed(0))
    ours, theirs = _reference_logits(engines_dir / "demo" / "checkpoint", ids)
    assert ((ours - theirs).abs().max() / theirs.abs().max()).item() < 1e-4


@pytest.mark.parametrize("rope", [
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 16},
    None,
], ids=["llama3-scaling", "codellama-theta"])
def test_logits_match_transformers_on_other_configs(tmp_path: Path, rope: dict | None) -> None:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         rope_theta=500000.0 if rope else 1_000_000.0, rope_scaling=rope)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    ids = torch.randint(0, 512, (40,), generator=torch.Generator().manual_seed(1))
    ours, theirs = _reference_logits(tmp_path, ids)
    assert ((ours - theirs).abs().max() / theirs.abs().max()).item() < 1e-4


async def test_greedy_output_is_token_identical_to_generate(engine: ReferenceEngine, engines_dir: Path) -> None:
    hf = LlamaForCausalLM.from_pretrained(engines_dir / "demo" / "checkpoint", dtype=torch.float32).eval()
    for i, prompt in enumerate([PROMPT, PROMPT[:5], list(range(300, 340))]):
        with torch.inference_mode():
            ids = torch.tensor([prompt])  # the mask is explicit: BOS (id 0) must not be taken for padding
            expected = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False,
                                   eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        got = await run(engine, req(f"hf{i}", prompt, max_tokens=20, temperature=0.0, ignore_eos=True))
        assert got[0]["ids"] == expected


async def test_batch_invariance_greedy_and_seeded(engine: ReferenceEngine) -> None:
    greedy = req("alone-greedy", temperature=0.0, ignore_eos=True)
    seeded = req("alone-seeded", seed=99, ignore_eos=True, top_p=0.9)
    alone = [await run(engine, greedy), await run(engine, seeded)]
    others = [req(f"mix{i}", PROMPT[: 3 + i % 10], n=1 + i % 3, seed=i, max_tokens=8 + i, top_k=i % 5,
                  temperature=0.5 + i % 3 * 0.5, presence_penalty=0.5 if i % 4 == 0 else 0.0) for i in range(14)]
    together = await asyncio.gather(*(run(engine, r) for r in [replace(greedy, request_id="b-greedy"),
                                                              replace(seeded, request_id="b-seeded"), *others]))
    assert together[0][0]["ids"] == alone[0][0]["ids"]
    assert together[1][0]["ids"] == alone[1][0]["ids"]


async def test_seed_reproduces_and_differs(engine: ReferenceEngine) -> None:
    a = await run(engine, req("s1", seed=5, ignore_eos=True))
    b = await run(engine, req("s2", seed=5, ignore_eos=True))
    c = await run(engine, req("s3", seed=6, ignore_eos=True))
    assert a[0]["ids"] == b[0]["ids"] != c[0]["ids"]


async def test_filters_that_leave_one_token_equal_greedy(engine: ReferenceEngine) -> None:
    greedy = (await run(engine, req("g", temperature=0.0, ignore_eos=True)))[0]["ids"]
    for name, params in {"top_k=1": {"top_k": 1}, "min_p=1": {"min_p": 1.0}, "top_p tiny": {"top_p": 1e-9},
                         "temperature tiny": {"temperature": 1e-4}}.items():
        got = (await run(engine, req(f"f-{name}", seed=3, ignore_eos=True, **params)))[0]["ids"]
        assert got == greedy, name
    sampled = (await run(engine, req("plain", seed=3, ignore_eos=True)))[0]["ids"]
    assert sampled != greedy


async def test_temperature_spreads_the_distribution(engine: ReferenceEngine) -> None:
    cold = await run(engine, req("cold", n=4, seed=1, temperature=0.05, max_tokens=12, ignore_eos=True))
    hot = await run(engine, req("hot", n=4, seed=1, temperature=2.0, max_tokens=12, ignore_eos=True))
    distinct = lambda out: len({t for c in out.values() for t in c["ids"]})  # noqa: E731
    assert distinct(hot) > distinct(cold)


async def test_penalties(engine: ReferenceEngine) -> None:
    plain = (await run(engine, req("p0", temperature=0.0, max_tokens=40, ignore_eos=True)))[0]["ids"]
    assert len(set(plain)) < len(plain), "greedy decoding of the random model repeats itself"
    for name, params in {"presence": {"presence_penalty": 2.0}, "frequency": {"frequency_penalty": 2.0}}.items():
        out = (await run(engine, req(f"p-{name}", temperature=0.0, max_tokens=40, ignore_eos=True, **params)))
        ids = out[0]["ids"]
        assert len(set(ids)) == len(ids), f"a strong {name} penalty forbids repeats"
    out = (await run(engine, req("p-rep", temperature=0.0, max_tokens=40, ignore_eos=True, repetition_penalty=5.0)))
    ids = out[0]["ids"]
    assert len(set(ids)) == len(ids) and not set(ids) & set(PROMPT), "repetition penalty covers prompt and output"


async def test_logprobs_and_top_logprobs(engine: ReferenceEngine) -> None:
    out = (await run(engine, req("lp", temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=True,
                                 top_logprobs=5)))[0]
    assert len(out["logprobs"]) == 10
    for token_id, lp in zip(out["ids"], out["logprobs"], strict=True):
        assert lp.token_id == token_id and lp.logprob <= 0
        assert [t.logprob for t in lp.top] == sorted((t.logprob for t in lp.top), reverse=True) and len(lp.top) == 5
        assert lp.top[0].token_id == token_id and abs(lp.top[0].logprob - lp.logprob) < 1e-6  # greedy takes the top
    sampled = (await run(engine, req("lp2", seed=4, max_tokens=10, ignore_eos=True, logprobs=True)))[0]
    assert all(lp.top == () for lp in sampled["logprobs"]) and len(sampled["logprobs"]) == 10


async def test_stop_string_split_across_tokens(engine: ReferenceEngine) -> None:
    free = (await run(engine, req("free", seed=11, max_tokens=40, ignore_eos=True)))[0]
    table = engine.core.table
    pieces = [table[t].decode("utf-8", "replace") for t in free["ids"]]
    k = next(i for i in range(5, len(pieces) - 1) if pieces[i] and pieces[i + 1] and pieces[i].isprintable()
             and pieces[i + 1].isprintable() and "\ufffd" not in pieces[i] + pieces[i + 1])
    stop = pieces[k][-1] + pieces[k + 1][0]  # spans the boundary between two tokens
    cut = free["text"].find(stop)
    out = (await run(engine, req("stop", seed=11, max_tokens=40, ignore_eos=True, stop=(stop,))))[0]
    assert out["finish"] is FinishReason.STOP and out["text"] == free["text"][:cut] and stop not in out["text"]


async def test_max_tokens_eos_and_ignore_eos(engine: ReferenceEngine) -> None:
    out = (await run(engine, req("len", seed=2, max_tokens=7, ignore_eos=True)))[0]
    assert out["finish"] is FinishReason.LENGTH and len(out["ids"]) == out["completion_tokens"] == 7
    greedy = (await run(engine, req("eos0", temperature=0.0, max_tokens=12, ignore_eos=True)))[0]
    eos = greedy["ids"][5]
    saved = engine.core.eos
    engine.core.eos = {eos}  # make the token greedy decoding reaches at step 6 the model's EOS
    try:
        stopped = (await run(engine, req("eos1", temperature=0.0, max_tokens=12)))[0]
        kept = (await run(engine, req("eos2", temperature=0.0, max_tokens=12, ignore_eos=True)))[0]
    finally:
        engine.core.eos = saved
    first = greedy["ids"].index(eos)
    assert stopped["finish"] is FinishReason.STOP and stopped["ids"] == greedy["ids"][:first + 1]
    assert kept["finish"] is FinishReason.LENGTH and kept["ids"] == greedy["ids"]


async def test_streamed_text_equals_decode(engine: ReferenceEngine, engines_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(engines_dir / "demo" / "checkpoint")
    for seed in range(3):
        out = (await run(engine, req(f"d{seed}", seed=seed, max_tokens=80, ignore_eos=True, temperature=1.5)))[0]
        assert out["text"] == tokenizer.decode(out["ids"])
    greedy = (await run(engine, req("dg", temperature=0.0, max_tokens=60, ignore_eos=True)))[0]
    assert greedy["text"] == tokenizer.decode(greedy["ids"]) and greedy["text"], "greedy output is never silent"


def test_detokenizer_holds_split_characters_and_replaces_orphan_bytes(engines_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(engines_dir / "demo" / "checkpoint")
    table = token_byte_table(tokenizer)
    by_bytes = {b: i for i, b in enumerate(table)}
    detok = IncrementalDetokenizer(table, ())
    char = "日".encode()  # three bytes, one token each
    released = [detok.add(by_bytes[bytes([b])])[0] for b in char]
    assert released == ["", "", "日"]
    orphan = IncrementalDetokenizer(table, ())
    texts = [orphan.add(by_bytes[bytes([0xE6])])[0], orphan.add(by_bytes[b"a"])[0]]
    assert "".join(texts) == "\ufffda"
    dangling = IncrementalDetokenizer(table, ())
    assert dangling.add(by_bytes[bytes([0xE6])])[0] == "" and dangling.flush() == "\ufffd"
    assert json.dumps(table[0].decode()) == '"<|begin_of_text|>"'


async def test_abort_and_close_free_the_kv_at_once(engine: ReferenceEngine) -> None:
    stream = engine.generate(req("ab", max_tokens=1000, ignore_eos=True))
    await stream.__anext__()
    assert engine.stats().running == 1 and engine.stats().kv_blocks_used > 0
    await stream.aclose()
    deadline = time.monotonic() + 2
    while engine.stats().kv_blocks_used and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert engine.stats().running == 0 and engine.stats().kv_blocks_used == 0

    stream = engine.generate(req("ab2", max_tokens=1000, ignore_eos=True))
    await stream.__anext__()
    await engine.abort("ab2")
    events = [e async for e in stream]
    assert isinstance(events[-1], Finished) and events[-1].finish_reason is FinishReason.CANCELLED
    assert engine.stats().kv_blocks_used == 0


async def test_deadline_finishes_with_deadline(engine: ReferenceEngine) -> None:
    request = req("dl", max_tokens=1500, ignore_eos=True)
    request.deadline = time.monotonic() + 0.3
    started = time.monotonic()
    out = await run(engine, request)
    assert out[0]["finish"] is FinishReason.DEADLINE and time.monotonic() - started < 1.5
    assert engine.stats().kv_blocks_used == 0


async def test_queue_is_bounded(engines_dir: Path) -> None:
    eng = ReferenceEngine(load_manifest(engines_dir / "demo"), EngineConfig(max_running=1, max_queue=1))
    await eng.start()
    try:
        first = eng.generate(req("q1", max_tokens=200, ignore_eos=True))
        await first.__anext__()
        second = eng.generate(req("q2", max_tokens=5))
        pending = asyncio.ensure_future(second.__anext__())
        await asyncio.sleep(0.05)
        with pytest.raises(QueueFull):
            await eng.generate(req("q3", max_tokens=5)).__anext__()
        await first.aclose()
        assert isinstance(await pending, TokenDelta)
        await second.aclose()
    finally:
        await eng.shutdown()


async def test_n_choices_share_one_prefill(engine: ReferenceEngine) -> None:
    prompt = list(range(500, 560))
    before = engine.core.prefill_tokens
    out = await run(engine, req("n4", prompt, n=4, seed=8, max_tokens=10, ignore_eos=True))
    assert engine.core.prefill_tokens - before == len(prompt)
    assert sorted(out) == [0, 1, 2, 3] and len({tuple(c["ids"]) for c in out.values()}) == 4
    assert engine.stats().kv_blocks_used == 0


async def test_requests_that_can_never_run_are_refused(engine: ReferenceEngine) -> None:
    with pytest.raises(InvalidRequest) as e:
        await engine.generate(req("big", max_tokens=2100)).__anext__()
    assert e.value.field == "max_tokens"
    out = await run(engine, req("zero", max_tokens=0))
    assert out[0]["finish"] is FinishReason.LENGTH and out[0]["ids"] == []
