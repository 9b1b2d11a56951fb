"""The reference engine on a CUDA device: skipped without one; `bench/gpu_check.sh` runs these on a GPU machine."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from service.backends.base import Finished, FinishReason, GenerationRequest, SamplingParams, TokenDelta
from service.backends.reference import ReferenceEngine
from service.config import EngineConfig
from service.repository.manifest import load_manifest

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

PROMPTS = [[0, 2, 1100, 3, 271, 40, 1002, 333], [0, 5, 17, 4, 2, 78, 3, 271, 90, 12], [0, 400, 401, 402], [0, 9]]


async def generate(engines_dir: Path, device: str, dtype: str, **params: object) -> list[tuple[list[int], object]]:
    """Every prompt at once (one batch), each answer's token ids and finish reason."""
    config = EngineConfig(max_running=8, max_cache_tokens=4096, engine_process=False, device=device, dtype=dtype)
    engine = ReferenceEngine(load_manifest(engines_dir / "demo"), config)
    await engine.start()

    async def one(i: int, prompt: list[int]) -> tuple[list[int], object]:
        ids: list[int] = []
        finish = None
        async for event in engine.generate(GenerationRequest(f"{device}-{i}", prompt, SamplingParams(**params))):
            if isinstance(event, TokenDelta):
                ids += event.token_ids
            elif isinstance(event, Finished):
                finish = event.finish_reason
        return ids, finish

    try:
        return await asyncio.gather(*(one(i, p) for i, p in enumerate(PROMPTS)))
    finally:
        await engine.shutdown()


async def test_greedy_answers_on_cuda_equal_the_cpus_in_float32(engines_dir: Path) -> None:
    params = {"max_tokens": 16, "temperature": 0.0, "ignore_eos": True}
    cpu = await generate(engines_dir, "cpu", "float32", **params)
    cuda = await generate(engines_dir, "cuda", "float32", **params)
    assert cuda == cpu


async def test_a_bfloat16_batch_on_cuda_runs_to_its_budget(engines_dir: Path) -> None:
    answers = await generate(engines_dir, "cuda", "bfloat16", max_tokens=48, ignore_eos=True, seed=3)
    assert [(len(ids), finish) for ids, finish in answers] == [(48, FinishReason.LENGTH)] * len(PROMPTS)
