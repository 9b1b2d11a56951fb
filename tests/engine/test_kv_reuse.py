"""Prefix caching and dense decode rows: fewer tokens computed, the same tokens out.

Each optimisation is checked against the reference engine with it turned off
(prefix caching by its flag, dense rows by a cache too small to allow them),
on greedy decoding with logprobs, so a wrong block or a stale row shows up as
a different token or logprob.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from service.backends.base import Finished, GenerationRequest, SamplingParams, TokenDelta
from service.backends.reference import ReferenceEngine
from service.config import EngineConfig
from service.repository.manifest import load_manifest

HEADER = list(range(1000, 1048))  # three whole 16-token blocks every prompt below starts with


def prompt(tail_seed: int, tail: int = 20) -> list[int]:
    rng = random.Random(tail_seed)
    return HEADER + [rng.randrange(200, 4000) for _ in range(tail)]


async def generate(engine: ReferenceEngine, rid: str, prompt_ids: list[int], max_tokens: int = 24,
                   n: int = 1) -> list[tuple[list[int], list[float]]]:
    """Greedy choices (seeded when n > 1), as (token ids, logprobs) per choice."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0 if n == 1 else 1.0, seed=7, ignore_eos=True,
                            logprobs=True)
    out: dict[int, tuple[list[int], list[float]]] = {i: ([], []) for i in range(n)}
    async for event in engine.generate(GenerationRequest(rid, prompt_ids, params, n=n)):
        if isinstance(event, TokenDelta):
            out[event.index][0].extend(event.token_ids)
            out[event.index][1].extend(lp.logprob for lp in event.logprobs or [])
        else:
            assert isinstance(event, Finished) and event.completion_tokens == max_tokens
    return [out[i] for i in range(n)]


def assert_same(got: list[tuple[list[int], list[float]]], want: list[tuple[list[int], list[float]]]) -> None:
    for (ids, lps), (want_ids, want_lps) in zip(got, want, strict=True):
        assert ids == want_ids
        assert lps == pytest.approx(want_lps, abs=1e-4)


async def started(engines_dir: Path, **config: object) -> ReferenceEngine:
    engine = ReferenceEngine(load_manifest(engines_dir / "demo"), EngineConfig(engine_process=False, **config))  # type: ignore[arg-type]
    await engine.start()
    return engine


@pytest.fixture(scope="module")
async def cached(engines_dir: Path) -> AsyncIterator[ReferenceEngine]:
    engine = await started(engines_dir)
    yield engine
    await engine.shutdown()


@pytest.fixture(scope="module")
async def uncached(engines_dir: Path) -> AsyncIterator[ReferenceEngine]:
    engine = await started(engines_dir, prefix_caching=False)
    yield engine
    await engine.shutdown()


async def test_a_shared_prefix_is_computed_once(cached: ReferenceEngine, uncached: ReferenceEngine) -> None:
    first, second = prompt(1), prompt(2)
    before = cached.core.prefill_tokens
    await generate(cached, "p1", first)
    assert cached.core.prefill_tokens - before == len(first)
    before = cached.core.prefill_tokens
    got = await generate(cached, "p2", second)
    assert cached.core.prefill_tokens - before == len(second) - len(HEADER)
    assert cached.stats().prefix_cache_hit_rate > 0
    assert_same(got, await generate(uncached, "p2", second))
    assert cached.stats().kv_blocks_used == 0


async def test_a_repeated_prompt_still_computes_its_last_token(cached: ReferenceEngine,
                                                               uncached: ReferenceEngine) -> None:
    exact = HEADER + list(range(2000, 2016))  # a whole number of blocks, all of them cached after the first run
    await generate(cached, "r1", exact)
    before = cached.core.prefill_tokens
    got = await generate(cached, "r2", exact)
    assert cached.core.prefill_tokens - before == 16  # the last block is recomputed for the first token's logits
    assert_same(got, await generate(uncached, "r2", exact))


async def test_forks_of_a_cached_prefix(cached: ReferenceEngine, uncached: ReferenceEngine) -> None:
    await generate(cached, "f0", prompt(30))
    got = await generate(cached, "f1", prompt(31), n=3)
    assert len({tuple(ids) for ids, _ in got}) == 3
    assert_same(got, await generate(uncached, "f1", prompt(31), n=3))
    assert cached.stats().kv_blocks_used == 0


async def test_evicted_blocks_are_never_read_as_cached(engines_dir: Path, uncached: ReferenceEngine) -> None:
    """A 16-block cache: every request evicts older prefixes, and later ones reuse what is left."""
    small = await started(engines_dir, max_cache_tokens=256, max_running=4)
    try:
        prompts = [prompt(s % 5, tail=20 + s) if s % 2 else [9 + s] * 8 + prompt(s) for s in range(12)]
        for i, p in enumerate(prompts):
            assert_same(await generate(small, f"e{i}", p, max_tokens=16),
                        await generate(uncached, f"e{i}", p, max_tokens=16))
        assert small.stats().kv_blocks_used == 0
    finally:
        await small.shutdown()


async def test_dense_rows_match_the_paged_cache_through_joins_leaves_and_fallback(engines_dir: Path) -> None:
    """Concurrent requests of different lengths join and leave the decode batch; one engine reads dense rows
    until they outgrow their memory bound (then the paged cache), the other can never afford rows."""
    rows = await started(engines_dir, max_running=8, max_cache_tokens=1536, prefix_caching=False)
    paged = await started(engines_dir, max_running=64, max_cache_tokens=2048, prefix_caching=False)
    try:
        jobs = [(prompt(40 + i, tail=5 + 9 * i), 20 + 30 * i) for i in range(6)]  # the longest passes 192 tokens

        async def run_all(engine: ReferenceEngine) -> list:
            return await asyncio.gather(*(generate(engine, f"d{i}", p, max_tokens=m)
                                          for i, (p, m) in enumerate(jobs)))

        grown: list[int] = []
        grow = rows.core.runner.decode_rows._grow
        rows.core.runner.decode_rows._grow = lambda capacity: (grown.append(capacity), grow(capacity))[1]  # type: ignore[method-assign]
        got, want = await run_all(rows), await run_all(paged)
        assert grown and paged.core.runner.decode_rows.capacity == 0  # one read dense rows, the other never did
        for g, w in zip(got, want, strict=True):
            assert_same(g, w)
        assert rows.core.runner.decode_rows.capacity == 0  # it fell back once contexts outgrew the bound
        assert rows.stats().kv_blocks_used == 0
    finally:
        await rows.shutdown()
        await paged.shutdown()
