"""The real model, SmolLM2-135M-Instruct: one server for the whole session, and transformers on the same checkpoint.

`make test` builds engines/smollm2-135m-instruct first (`make smollm2`: its GGUF file converted once, then
kept); these tests read it from there, so the conversion is never repeated.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM, PreTrainedTokenizerBase

from service.config import EngineConfig
from service.gen.llmserve.v1 import chat_pb2_grpc
from tests.helpers import ROOT, SMOLLM2, running_server, server_config

BUILT = ROOT / "engines" / SMOLLM2


@pytest.fixture(scope="session")
def checkpoint() -> Path:
    if not (BUILT / "manifest.json").is_file():
        pytest.fail(f"{BUILT} is not built: run `make smollm2` (`make test` does)")
    return BUILT / "checkpoint"


@pytest.fixture(scope="session")
async def smollm2_server(tmp_path_factory: pytest.TempPathFactory, checkpoint: Path) -> AsyncIterator[Any]:
    engines = tmp_path_factory.mktemp("smollm2-engines")
    (engines / SMOLLM2).symlink_to(BUILT)
    # float32, as transformers runs it here: these tests prove the same computation (bfloat16, the default on
    # CPUs that have it, is test_bfloat16.py's).
    config = server_config(engines, engine=EngineConfig(max_running=32, max_queue=64, max_cache_tokens=8192,
                                                        dtype="float32"))
    async with running_server(config) as server:
        yield server


@pytest.fixture(scope="session")
async def smollm2_channel(smollm2_server: Any) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{smollm2_server.grpc_port}") as channel:
        yield channel


@pytest.fixture
def smollm2(smollm2_channel: grpc.aio.Channel) -> chat_pb2_grpc.ChatServiceStub:
    return chat_pb2_grpc.ChatServiceStub(smollm2_channel)


@pytest.fixture
async def smollm2_http(smollm2_server: Any) -> AsyncIterator[httpx.AsyncClient]:
    url = f"http://127.0.0.1:{smollm2_server.config.server.http_port}"
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        yield client


@pytest.fixture(scope="session")
def hf_tokenizer(checkpoint: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(checkpoint)


@pytest.fixture(scope="session")
def hf_model(checkpoint: Path) -> LlamaForCausalLM:
    """transformers' own Llama on the converted checkpoint, in float32 as the reference engine runs it on a CPU."""
    return LlamaForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
