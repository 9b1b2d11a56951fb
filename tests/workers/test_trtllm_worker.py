"""llmserve in front of TensorRT-LLM's gRPC worker, proved against FakeTrtllmWorker (trtllm_service.proto), which
answers as tensorrt_llm/grpc's servicer does and refuses what that servicer would mishandle."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from smg_grpc_proto import trtllm_service_pb2 as trt_pb
from transformers import AutoTokenizer

from service.backends.grammar import JSON_OBJECT_SCHEMA
from service.backends.workers.tokenizer import TokenizerUnavailable
from service.gen.llmserve.v1 import chat_pb2, chat_pb2_grpc
from service.server import LlmServer
from tests.helpers import chat, running_server, struct, wait_until, worker_config
from tests.workers.fake_workers import FakeTrtllmWorker

FR = chat_pb2.FinishReason
EOS = 4   # the demo's <|eot_id|>
SCRIPT = "Hello from the fake worker. The end."
SECOND = "Another choice, other words."


@pytest.fixture(scope="module")
def tokenizer(engines_dir: Path) -> object:
    return AutoTokenizer.from_pretrained(engines_dir / "demo" / "checkpoint")


@pytest.fixture(scope="module")
async def trt_worker(tokenizer: object) -> AsyncIterator[FakeTrtllmWorker]:
    scripts = [[*tokenizer.encode(SCRIPT, add_special_tokens=False), EOS],  # type: ignore[attr-defined]
               [*tokenizer.encode(SECOND, add_special_tokens=False), EOS]]  # type: ignore[attr-defined]
    worker = FakeTrtllmWorker(scripts, vocab_size=4096, context=1024)
    await worker.start()
    yield worker
    await worker.stop()


@pytest.fixture(scope="module")
async def gw(engines_dir: Path, trt_worker: FakeTrtllmWorker) -> AsyncIterator[object]:
    config = worker_config(engines_dir, f"demo={trt_worker.address}", worker_probe_interval=0.1)
    async with running_server(config) as server, \
            grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:  # type: ignore[attr-defined]
        server.stub = chat_pb2_grpc.ChatServiceStub(channel)  # type: ignore[attr-defined]
        server.channel = channel  # type: ignore[attr-defined]
        yield server


def last(worker: FakeTrtllmWorker) -> trt_pb.GenerateRequest:
    return worker.requests[-1]


async def test_text_usage_and_the_request_as_sent(gw: object, trt_worker: FakeTrtllmWorker) -> None:
    req = chat(max_tokens=64, temperature=0.7, top_p=0.9, top_k=20, min_p=0.05, presence_penalty=0.5,
               frequency_penalty=0.25, repetition_penalty=1.1, seed=42, stop=["zzz"])
    reply = await gw.stub.CreateChatCompletion(req)  # type: ignore[attr-defined]
    choice = reply.choices[0]
    assert choice.message.content == SCRIPT and choice.finish_reason == FR.FINISH_REASON_STOP
    sent = last(trt_worker)
    prompt = await gw.stub.Tokenize(chat_pb2.TokenizeRequest(model="demo", messages=req.messages))  # type: ignore
    assert list(sent.tokenized.input_token_ids) == list(prompt.tokens)
    assert reply.usage.prompt_tokens == prompt.count
    # The complete repeats every token (cumulative): counted once, the EOS among them.
    assert reply.usage.completion_tokens == len(trt_worker.scripts[0])
    s = sent.sampling_config
    assert (sent.max_tokens, sent.streaming, s.beam_width, s.num_return_sequences) == (64, True, 1, 1)
    assert (s.temperature, s.top_p, s.top_k, s.min_p, s.seed) == pytest.approx((0.7, 0.9, 20, 0.05, 42))
    assert (s.presence_penalty, s.frequency_penalty, s.repetition_penalty) == pytest.approx((0.5, 0.25, 1.1))
    assert list(sent.stop) == ["zzz"] and sorted(sent.stop_token_ids) == [1, 4] and not sent.ignore_eos
    assert sent.include_stop_token_in_output and not sent.HasField("guided_decoding")
    assert not sent.output_config.HasField("logprobs") and not sent.bad_token_ids


async def test_greedy_is_top_k_1_without_temperature_and_seeds_are_drawn(
        gw: object, trt_worker: FakeTrtllmWorker) -> None:
    for _ in range(2):
        await gw.stub.CreateChatCompletion(chat(max_tokens=8, temperature=0))  # type: ignore[attr-defined]
    first, second = trt_worker.requests[-2:]
    for sent in (first, second):
        s = sent.sampling_config
        assert s.HasField("top_k") and s.top_k == 1 and not s.HasField("temperature") and not s.HasField("top_p")
    assert first.sampling_config.seed != second.sampling_config.seed   # the runtime's default would be one seed


async def test_stream_equals_unary_and_ignore_eos(gw: object, trt_worker: FakeTrtllmWorker) -> None:
    req = chat(max_tokens=64, seed=1)
    unary = await gw.stub.CreateChatCompletion(req)  # type: ignore[attr-defined]
    streamed = "".join([c.delta.content async for chunk in gw.stub.StreamChatCompletion(req)  # type: ignore
                        for c in chunk.choices])
    assert streamed == unary.choices[0].message.content == SCRIPT
    reply = await gw.stub.CreateChatCompletion(chat(max_tokens=64, ignore_eos=True))  # type: ignore[attr-defined]
    assert last(trt_worker).ignore_eos and not last(trt_worker).stop_token_ids
    assert reply.choices[0].message.content == SCRIPT   # a special token's text is skipped, as by default
    reply = await gw.stub.CreateChatCompletion(  # type: ignore[attr-defined]
        chat(max_tokens=64, ignore_eos=True, skip_special_tokens=False))
    assert reply.choices[0].message.content == SCRIPT + "<|eot_id|>"   # EOS is text once it does not stop


async def test_n_choices_and_greedy_n(gw: object, trt_worker: FakeTrtllmWorker) -> None:
    reply = await gw.stub.CreateChatCompletion(chat(max_tokens=64, n=2, seed=3))  # type: ignore[attr-defined]
    assert last(trt_worker).sampling_config.num_return_sequences == 2
    assert [c.message.content for c in reply.choices] == [SCRIPT, SECOND]
    reply = await gw.stub.CreateChatCompletion(chat(max_tokens=64, n=3, temperature=0))  # type: ignore
    assert last(trt_worker).sampling_config.num_return_sequences == 1   # one greedy answer, given to all three
    assert [c.message.content for c in reply.choices] == [SCRIPT] * 3
    assert reply.usage.completion_tokens == 3 * len(trt_worker.scripts[0])


async def test_max_tokens_is_length_and_stop_strings_cut(gw: object) -> None:
    reply = await gw.stub.CreateChatCompletion(chat(max_tokens=3))  # type: ignore[attr-defined]
    assert reply.choices[0].finish_reason == FR.FINISH_REASON_LENGTH and reply.usage.completion_tokens == 3
    reply = await gw.stub.CreateChatCompletion(chat(max_tokens=64, stop=["ake wo"]))  # type: ignore[attr-defined]
    assert reply.choices[0].message.content == "Hello from the f"
    assert reply.choices[0].finish_reason == FR.FINISH_REASON_STOP


async def test_logprobs_keep_the_best_alternatives(gw: object, trt_worker: FakeTrtllmWorker) -> None:
    reply = await gw.stub.CreateChatCompletion(  # type: ignore[attr-defined]
        chat(max_tokens=5, logprobs=True, top_logprobs=2))
    assert last(trt_worker).output_config.logprobs == 2
    entries = reply.choices[0].logprobs.content
    assert len(entries) == 5 and all(e.logprob == pytest.approx(-3.0) for e in entries)
    # The worker's list holds the sampled token (-3.0) besides the best two (-0.5, -1.5): only those are kept.
    assert all([t.logprob for t in e.top_logprobs] == [-0.5, -1.5] for e in entries)


async def test_response_format_and_forced_tools_reach_guided_decoding(
        gw: object, trt_worker: FakeTrtllmWorker) -> None:
    await gw.stub.CreateChatCompletion(  # type: ignore[attr-defined]
        chat(max_tokens=8, response_format=chat_pb2.ResponseFormat(type="json_object")))
    sent = last(trt_worker)
    assert sent.guided_decoding.guide_type == trt_pb_guide("GUIDE_TYPE_JSON_SCHEMA")
    assert sent.guided_decoding.guide == JSON_OBJECT_SCHEMA   # never GUIDE_TYPE_JSON with an empty guide
    assert sent.bad_token_ids and all(b < 4096 for b in sent.bad_token_ids)   # raw control characters
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    tool = chat_pb2.Tool(type="function", function=chat_pb2.FunctionDefinition(name="f", parameters=struct(schema)))
    await gw.stub.CreateChatCompletion(chat(max_tokens=8, tools=[tool], tool_choice=chat_pb2.ToolChoice(  # type: ignore
        mode="required")))
    sent = last(trt_worker)
    assert sent.guided_decoding.guide_type == trt_pb_guide("GUIDE_TYPE_JSON_SCHEMA")
    assert json.loads(sent.guided_decoding.guide)["properties"]["name"] == {"const": "f"}


async def test_regex_choice_grammar_and_logit_bias_reach_the_runtime(
        gw: object, trt_worker: FakeTrtllmWorker) -> None:
    async def sent(**fields: object) -> trt_pb.GenerateRequest:
        await gw.stub.CreateChatCompletion(chat(max_tokens=8, **fields))  # type: ignore[attr-defined]
        return last(trt_worker)

    regex = await sent(structured_outputs=chat_pb2.StructuredOutputs(regex="(yes|no)[0-9]{3}"))
    assert (regex.guided_decoding.guide_type, regex.guided_decoding.guide) == (
        trt_pb_guide("GUIDE_TYPE_REGEX"), "(yes|no)[0-9]{3}")
    assert not regex.bad_token_ids   # a regex may write any character it matches
    choice = await sent(structured_outputs=chat_pb2.StructuredOutputs(choice=["alpha", "beta"]))
    assert choice.guided_decoding.guide_type == trt_pb_guide("GUIDE_TYPE_EBNF_GRAMMAR")
    assert choice.guided_decoding.guide == 'root ::= "alpha" | "beta"'
    grammar = await sent(structured_outputs=chat_pb2.StructuredOutputs(grammar='root ::= "ab" [0-9]+'))
    assert (grammar.guided_decoding.guide_type, grammar.guided_decoding.guide) == (
        trt_pb_guide("GUIDE_TYPE_EBNF_GRAMMAR"), 'root ::= "ab" [0-9]+')
    biased = await sent(logit_bias={42: 100.0, 7: -5.5})
    bias = list(biased.embedding_bias)
    assert len(bias) == 4096 and (bias[42], bias[7]) == (100.0, -5.5) and sum(map(abs, bias)) == 105.5


def trt_pb_guide(name: str) -> int:
    return trt_pb.GuidedDecodingParams.GuideType.Value(name)


async def test_cancel_and_deadline_abort_the_request(gw: object, trt_worker: FakeTrtllmWorker) -> None:
    trt_worker.step = 0.05
    try:
        call = gw.stub.StreamChatCompletion(chat(max_tokens=64))  # type: ignore[attr-defined]
        async for _ in call:
            break
        sent = last(trt_worker).request_id
        call.cancel()
        assert await wait_until(lambda: sent in trt_worker.aborts and not trt_worker.running, timeout=5)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await gw.stub.CreateChatCompletion(chat(max_tokens=64), timeout=0.2)  # type: ignore[attr-defined]
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        sent = last(trt_worker).request_id
        assert await wait_until(lambda: sent in trt_worker.aborts and not trt_worker.running, timeout=5)
    finally:
        trt_worker.step = 0.002


async def test_health_string_takes_the_worker_out_and_back(gw: object, trt_worker: FakeTrtllmWorker) -> None:
    health = health_pb2_grpc.HealthStub(gw.channel)  # type: ignore[attr-defined]

    async def status(service: str) -> int:
        return (await health.Check(health_pb2.HealthCheckRequest(service=service))).status

    trt_worker.status = "Executor is unhealthy"
    try:
        engine = gw.registry.get("demo").engine  # type: ignore[attr-defined]
        assert await wait_until(lambda: not engine.health().ok, timeout=5)
        await asyncio.sleep(0.5)   # the server's watcher publishes it
        assert await status("demo") == health_pb2.HealthCheckResponse.NOT_SERVING
        assert await status("") == health_pb2.HealthCheckResponse.SERVING   # the process itself is fine
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await gw.stub.CreateChatCompletion(chat(max_tokens=4))  # type: ignore[attr-defined]
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "Executor is unhealthy" in e.value.details()
    finally:
        trt_worker.status = "OK"
    assert await wait_until(lambda: engine.health().ok, timeout=5)
    await asyncio.sleep(0.5)
    assert await status("demo") == health_pb2.HealthCheckResponse.SERVING
    assert (await gw.stub.CreateChatCompletion(chat(max_tokens=64))).choices[0].message.content == SCRIPT  # type: ignore


async def test_a_trtllm_model_needs_a_folder_for_its_tokenizer(tmp_path: Path, trt_worker: FakeTrtllmWorker) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    server = LlmServer(worker_config(empty, f"m={trt_worker.address}"))
    try:
        with pytest.raises(TokenizerUnavailable, match="trtllm workers do not serve their tokenizer"):
            await server.start()
    finally:
        await server.shutdown()


async def test_healthcheck_command_probes_a_worker(trt_worker: FakeTrtllmWorker) -> None:
    """What a Kubernetes exec probe of a TensorRT-LLM worker runs (it serves no grpc.health.v1)."""
    async def probe() -> tuple[str, int]:
        done = await asyncio.create_subprocess_exec(sys.executable, "-m", "service", "healthcheck", "--worker",
                                                    trt_worker.address, stdout=asyncio.subprocess.PIPE)
        return (await done.communicate())[0].decode().strip(), done.returncode  # type: ignore[return-value]

    assert await probe() == ("SERVING", 0)
    trt_worker.status = "LLM not initialized"
    try:
        assert await probe() == ("NOT_SERVING: LLM not initialized", 1)
    finally:
        trt_worker.status = "OK"
