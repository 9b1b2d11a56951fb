"""The default precision on this CPU: bfloat16 where it has native bfloat16 dot products, and answers that stay
float32's (bench/agreement.py measures how often over more chats).

A bfloat16 step rounds weights and activations to 8 bits of mantissa, so a near-tie may flip and an answer
then goes its own way; what must hold is that an answer parts from float32's only at such a near-tie, never
at a token float32 is sure of, and that, where the tokens agree, their logprobs are float32's to within
bfloat16's rounding.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerBase

from service.config import EngineConfig
from service.gen.llmserve.v1 import chat_pb2, chat_pb2_grpc
from tests.helpers import SMOLLM2 as NAME
from tests.helpers import running_server, server_config
from tests.smollm2.conftest import BUILT
from tests.smollm2.test_parity import CHATS, Reference, grpc_unary, reference

NATIVE = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


@pytest.fixture(scope="module")
async def default_stub(tmp_path_factory: pytest.TempPathFactory, checkpoint: Path
                       ) -> AsyncIterator[chat_pb2_grpc.ChatServiceStub]:
    engines = tmp_path_factory.mktemp("smollm2-default")
    (engines / NAME).symlink_to(BUILT)
    config = server_config(engines, engine=EngineConfig(max_running=8, max_queue=16, max_cache_tokens=4096))
    async with running_server(config) as server, \
            grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:  # type: ignore[attr-defined]
        yield chat_pb2_grpc.ChatServiceStub(channel)


@pytest.fixture(scope="module")
def float32_answers(hf_model: LlamaForCausalLM, hf_tokenizer: PreTrainedTokenizerBase) -> list[Reference]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return [reference(hf_model, hf_tokenizer, messages) for messages in CHATS]
    finally:
        torch.set_num_threads(threads)


async def test_the_default_is_bfloat16_on_a_cpu_with_native_bfloat16(
        default_stub: chat_pb2_grpc.ChatServiceStub) -> None:
    listed = await default_stub.ListModels(chat_pb2.ListModelsRequest())
    (model,) = [m for m in listed.data if m.id == NAME]
    assert model.profile.precision == ("bfloat16" if NATIVE else "float32")


@pytest.mark.skipif(not NATIVE, reason="this CPU has no native bfloat16: the default is float32 (test_parity.py)")
async def test_bfloat16_answers_agree_with_float32(default_stub: chat_pb2_grpc.ChatServiceStub,
                                                   float32_answers: list[Reference]) -> None:
    answers: list[Any] = [await grpc_unary(default_stub, messages) for messages in CHATS]
    prefixes = []
    for i, (answer, expected) in enumerate(zip(answers, float32_answers, strict=True)):
        common = 0
        while common < min(len(answer.token_bytes), len(expected.token_bytes)) and \
                answer.token_bytes[common] == expected.token_bytes[common]:
            common += 1
        prefixes.append(common / len(expected.token_bytes))
        # Over the agreeing tokens the probabilities are float32's, to bfloat16's rounding of the logits.
        assert all(abs(a - b) < 0.25 for a, b in zip(answer.logprobs[:common], expected.logprobs[:common], strict=True))
        if common < min(len(answer.token_bytes), len(expected.token_bytes)):
            # They part only where float32 itself was unsure (its token under 82%): a near-tie that rounding
            # flipped, never a confident token lost.
            assert expected.logprobs[common] < -0.2, (i, common, expected.logprobs[common])
    # Measured 2026-11-29 over these 6 chats: 2 answers identical and 54% of float32's tokens agreeing on average
    # on an AMD EPYC; 2 and 51% on an Intel Xeon (no AMX), where the first answer parts from float32's "The
    # capital of France is Paris." at its first token, to which float32 itself gives 15%. transformers' own
    # bfloat16 against its float32: 3 identical, 67%.
    assert sum(prefixes) / len(prefixes) >= 0.4, prefixes
