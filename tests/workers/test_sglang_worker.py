"""llmserve in front of SGLang's gRPC scheduler, proved against FakeSglangWorker (sglang_scheduler.proto), which
answers as smg-grpc-servicer's SGLang servicer does and refuses what that servicer would mishandle."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import httpx
import pytest
from smg_grpc_proto import sglang_scheduler_pb2 as sg
from transformers import AutoTokenizer

from service.backends.grammar import JSON_OBJECT_SCHEMA
from service.gen.llmserve.v1 import chat_pb2, chat_pb2_grpc
from tests.helpers import assert_error, body, chat, field_violations, running_server, wait_until, worker_config
from tests.workers.fake_workers import FakeSglangWorker

FR = chat_pb2.FinishReason
EOS = 4
SCRIPT = "Hello from the fake scheduler. Done."


@pytest.fixture(scope="module")
async def sglang_worker(engines_dir: Path) -> AsyncIterator[FakeSglangWorker]:
    checkpoint = engines_dir / "demo" / "checkpoint"
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    script = [*tokenizer.encode(SCRIPT, add_special_tokens=False), EOS]
    worker = FakeSglangWorker([script, [*script[-2::-1], EOS]], vocab_size=4096, context=1024, tokenizer_dir=checkpoint,
                              eos=(4, 1))
    await worker.start()
    yield worker
    await worker.stop()


@pytest.fixture(scope="module")
async def gw(engines_dir: Path, sglang_worker: FakeSglangWorker) -> AsyncIterator[object]:
    config = worker_config(engines_dir, f"demo={sglang_worker.address}", worker_probe_interval=0.1)
    async with running_server(config) as server, \
            grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:  # type: ignore[attr-defined]
        server.stub = chat_pb2_grpc.ChatServiceStub(channel)  # type: ignore[attr-defined]
        yield server


def last(worker: FakeSglangWorker) -> sg.GenerateRequest:
    return worker.requests[-1]


async def test_seed_is_refused_by_name_on_both_front_doors(gw: object, sglang_worker: FakeSglangWorker) -> None:
    sent = len(sglang_worker.requests)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await gw.stub.CreateChatCompletion(chat(max_tokens=4, seed=7))  # type: ignore[attr-defined]
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field_violations(e.value) == ["seed"]
    assert "sglang" in e.value.details()
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gw.config.server.http_port}") as http:  # type: ignore
        error = assert_error(await http.post("/v1/chat/completions", json=body(seed=7)), 400,
                             "invalid_request_error", "invalid_argument", "seed")
    assert "sglang" in error["message"]
    assert len(sglang_worker.requests) == sent   # refused before any worker saw it


async def test_text_usage_and_the_request_as_sent(gw: object, sglang_worker: FakeSglangWorker) -> None:
    req = chat(max_tokens=64, temperature=0, stop=["qq"])
    reply = await gw.stub.CreateChatCompletion(req)  # type: ignore[attr-defined]
    assert reply.choices[0].message.content == SCRIPT and reply.choices[0].finish_reason == FR.FINISH_REASON_STOP
    assert reply.usage.completion_tokens == len(sglang_worker.scripts[0])   # the complete's repeat is not counted
    sent = last(sglang_worker)
    p = sent.sampling_params
    assert (p.temperature, p.top_p, p.top_k, p.max_new_tokens, p.n) == (0.0, 1.0, 0, 64, 1)
    assert (p.repetition_penalty, p.no_stop_trim, list(p.stop)) == (1.0, True, ["qq"])
    assert sorted(p.stop_token_ids) == [1, 4] and not p.ignore_eos and p.WhichOneof("constraint") is None
    assert (sent.stream, sent.logprob_start_len, sent.return_logprob) == (True, -1, False)
    streamed = "".join([c.delta.content async for chunk in gw.stub.StreamChatCompletion(req)  # type: ignore
                        for c in chunk.choices])
    assert streamed == SCRIPT


async def test_n_goes_to_the_worker_and_logprobs_are_its_top_k(gw: object, sglang_worker: FakeSglangWorker) -> None:
    reply = await gw.stub.CreateChatCompletion(  # type: ignore[attr-defined]
        chat(max_tokens=6, n=2, temperature=0.8, logprobs=True, top_logprobs=2))
    sent = last(sglang_worker)
    assert sent.sampling_params.n == 2 and sent.return_logprob and sent.top_logprobs_num == 2
    assert len(reply.choices) == 2 and reply.choices[0].message.content != reply.choices[1].message.content
    for choice in reply.choices:
        assert [[t.logprob for t in e.top_logprobs] for e in choice.logprobs.content] == [[-0.5, -1.5]] * 6


async def test_json_object_goes_as_the_object_schema_with_control_tokens_banned(
        gw: object, sglang_worker: FakeSglangWorker) -> None:
    await gw.stub.CreateChatCompletion(  # type: ignore[attr-defined]
        chat(max_tokens=8, temperature=0, response_format=chat_pb2.ResponseFormat(type="json_object")))
    p = last(sglang_worker).sampling_params
    assert p.WhichOneof("constraint") == "json_schema" and json.loads(p.json_schema) == json.loads(JSON_OBJECT_SCHEMA)
    assert p.logit_bias and set(p.logit_bias.values()) == {-100.0} and all(k.isdigit() for k in p.logit_bias)


async def test_regex_choice_and_logit_bias_are_mapped(gw: object, sglang_worker: FakeSglangWorker) -> None:
    async def sent(**fields: object) -> object:
        await gw.stub.CreateChatCompletion(chat(max_tokens=8, temperature=0, **fields))  # type: ignore[attr-defined]
        return last(sglang_worker).sampling_params

    p = await sent(structured_outputs=chat_pb2.StructuredOutputs(regex="[a-z]+"))
    assert (p.WhichOneof("constraint"), p.regex) == ("regex", "[a-z]+")
    p = await sent(structured_outputs=chat_pb2.StructuredOutputs(choice=["alpha", "beta"]))   # no choice field
    assert (p.WhichOneof("constraint"), p.ebnf_grammar) == ("ebnf_grammar", 'root ::= "alpha" | "beta"')
    p = await sent(logit_bias={42: 100.0})
    assert dict(p.logit_bias) == {"42": 100.0} and not p.WhichOneof("constraint")
    # A ban under a JSON document wins over the request's own bias for the same token.
    banned = next(iter((await sent(response_format=chat_pb2.ResponseFormat(type="json_object"))).logit_bias))
    p = await sent(logit_bias={int(banned): 50.0, 42: 3.0}, response_format=chat_pb2.ResponseFormat(type="json_object"))
    assert p.logit_bias[banned] == -100.0 and p.logit_bias["42"] == 3.0


async def test_cancel_aborts_and_cancels_the_call(gw: object, sglang_worker: FakeSglangWorker) -> None:
    sglang_worker.step = 0.05
    try:
        call = gw.stub.StreamChatCompletion(chat(max_tokens=64, temperature=0))  # type: ignore[attr-defined]
        async for _ in call:
            break
        sent = last(sglang_worker).request_id
        call.cancel()
        assert await wait_until(lambda: sent in sglang_worker.aborts and not sglang_worker.running, timeout=5)
    finally:
        sglang_worker.step = 0.002


async def test_model_from_the_flag_alone_takes_the_tokenizer_bundle(
        tmp_path: Path, gw: object, sglang_worker: FakeSglangWorker) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    async with running_server(worker_config(empty, f"s={sglang_worker.address}")) as server, \
            grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:  # type: ignore[attr-defined]
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        (model,) = (await stub.ListModels(chat_pb2.ListModelsRequest())).data
        assert (model.id, model.context_length, model.backend) == ("s", 1024, "sglang")
        messages = chat("Hi there").messages
        own = await stub.Tokenize(chat_pb2.TokenizeRequest(model="s", messages=messages))
        folder = await gw.stub.Tokenize(chat_pb2.TokenizeRequest(model="demo", messages=messages))  # type: ignore
        assert list(own.tokens) == list(folder.tokens)
        req = chat(max_tokens=64, temperature=0)
        req.model = "s"
        assert (await stub.CreateChatCompletion(req)).choices[0].message.content == SCRIPT
