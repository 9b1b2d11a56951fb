"""The TensorRT-LLM backend: the request mapping against the pinned release's fields, the event stream, a real
gRPC server serving a tensorrt-llm model through FakeTrtllmLLM, and GPU tests that run where TensorRT-LLM does."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
import xgrammar as xgr
from transformers import AutoTokenizer

from service.backends import trtllm as backend
from service.backends.base import (
    EngineError,
    Finished,
    FinishReason,
    GenerationRequest,
    GuidedDecoding,
    SamplingParams,
    TokenDelta,
)
from service.backends.vocab import eos_token_ids, special_token_ids, token_byte_table
from service.config import EngineConfig, TrtllmConfig
from service.gen.llmserve.v1 import chat_pb2, chat_pb2_grpc
from service.repository.gpus import detect_gpus, parse_gpu
from service.repository.profiles import ProfileError, load_profile
from tests.engine.fake_trtllm import (
    GUIDED_FIELDS,
    LLM_ARGS_FIELDS,
    SAMPLING_FIELDS,
    FakeCompletionOutput,
    FakeGuidedDecodingParams,
    FakeLLMConstructor,
    FakeLogprob,
    FakeSamplingParams,
    FakeTorchLLM,
    FakeTrtLLM,
    FakeTrtllmLLM,
    fake_tensorrt_llm_modules,
)
from tests.helpers import chat, running_server, server_config, wait_until

ROOT = Path(__file__).resolve().parents[2]
FR = chat_pb2.FinishReason
MODEL = "trt-demo"
SCRIPTS = ["Hello from the fake runtime. The end.", "A second choice says something else."]
CREATE_RUNTIME = backend.create_runtime   # the module-scoped server below patches the module's attribute


def request(n: int = 1, guided: GuidedDecoding | None = None, **sampling: Any) -> GenerationRequest:
    return GenerationRequest("r1", [1, 2, 3], SamplingParams(**{"max_tokens": 16, **sampling}), n=n, guided=guided)


# -- (a) the mapping -------------------------------------------------------------------------------------------

SAMPLING_CASES = [
    {},
    {"temperature": 0.0},
    {"temperature": 0.7, "top_p": 0.9, "top_k": 40, "min_p": 0.05, "seed": 11},
    {"presence_penalty": 0.5, "frequency_penalty": -0.5, "repetition_penalty": 1.2, "ignore_eos": True},
    {"stop": ("\n\n", "END"), "logprobs": True, "top_logprobs": 5},
    {"logit_bias": ((3, -100.0), (9, 2.5))},
]


@pytest.mark.parametrize("sampling", SAMPLING_CASES)
def test_every_kwarg_is_a_field_of_the_pinned_sampling_params(sampling: dict[str, Any]) -> None:
    kwargs = backend.sampling_kwargs(request(n=3, **sampling), lambda: 99, {2, 7}, 256)
    assert set(kwargs) <= SAMPLING_FIELDS, set(kwargs) - SAMPLING_FIELDS


def test_the_fixtures_hold_the_fields_the_contract_needs() -> None:
    assert {"temperature", "top_p", "top_k", "min_p", "max_tokens", "stop", "n", "best_of", "presence_penalty",
            "frequency_penalty", "repetition_penalty", "seed", "ignore_eos", "logprobs", "detokenize",
            "include_stop_str_in_output", "guided_decoding", "embedding_bias"} <= SAMPLING_FIELDS
    assert {"json", "json_object", "grammar"} <= GUIDED_FIELDS


def test_every_contract_field_is_mapped() -> None:
    kwargs = backend.sampling_kwargs(request(n=2, temperature=0.7, top_p=0.9, top_k=40, min_p=0.05,
                                             presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=1.1,
                                             seed=5, stop=("END",), ignore_eos=True, logprobs=True,
                                             top_logprobs=3), lambda: 99, {2}, 256)
    assert kwargs == {
        "max_tokens": 16, "n": 2, "best_of": 2, "temperature": 0.7, "top_p": 0.9, "top_k": 40, "min_p": 0.05,
        "presence_penalty": 0.5, "frequency_penalty": 0.25, "repetition_penalty": 1.1, "seed": 5,
        "stop": ["END"], "include_stop_str_in_output": True, "ignore_eos": True, "logprobs": 3,
        "detokenize": False,
    }


def test_logit_bias_is_the_runtimes_embedding_bias() -> None:
    bias = backend.sampling_kwargs(request(logit_bias=((3, -100.0), (9, 2.5))), lambda: 0, set(), 16)["embedding_bias"]
    assert bias.shape == (16,) and bias[3] == -100.0 and bias[9] == 2.5 and bias.abs().sum() == 102.5
    assert "embedding_bias" not in backend.sampling_kwargs(request(), lambda: 0, set(), 16)


def test_greedy_is_top_k_1_with_no_temperature() -> None:
    kwargs = backend.sampling_kwargs(request(temperature=0.0, top_p=0.5, top_k=7), lambda: 99, set(), 256)
    assert kwargs["top_k"] == 1
    assert "temperature" not in kwargs and "top_p" not in kwargs and "min_p" not in kwargs


def test_no_seed_draws_one_per_request_and_logprobs_default_to_one() -> None:
    assert backend.sampling_kwargs(request(), lambda: 1234, set(), 256)["seed"] == 1234
    assert "logprobs" not in backend.sampling_kwargs(request(), lambda: 0, set(), 256)
    assert backend.sampling_kwargs(request(logprobs=True), lambda: 0, set(), 256)["logprobs"] == 1
    assert "stop" not in backend.sampling_kwargs(request(), lambda: 0, set(), 256)


def test_every_eos_token_stops_unless_ignore_eos(tokenizer: Any, engines_dir: Path) -> None:
    """TensorRT-LLM's end_id is one token; Llama 3.1 ends turns with any of three."""
    assert backend.sampling_kwargs(request(), lambda: 0, {128009, 128001, 128008}, 256)["stop_token_ids"] == [
        128001, 128008, 128009]
    assert "stop_token_ids" not in backend.sampling_kwargs(request(ignore_eos=True), lambda: 0, {128009}, 256)
    assert eos_token_ids(engines_dir / "demo" / "checkpoint", tokenizer) == {1, 4}


def test_guided_decoding_mapping() -> None:
    schema = '{"type": "object"}'
    assert backend.guided_kwargs(GuidedDecoding(json_schema=schema)) == {"json": schema}
    assert backend.guided_kwargs(GuidedDecoding(json_object=True)) == {"json": '{"type": "object"}'}, \
        "an object, as the reference engine enforces it (json_object=True would also admit an array)"
    assert backend.guided_kwargs(GuidedDecoding(ebnf='root ::= "a"')) == {"grammar": 'root ::= "a"'}
    assert backend.guided_kwargs(GuidedDecoding(regex="[a-z]+")) == {"regex": "[a-z]+"}
    assert backend.guided_kwargs(GuidedDecoding(choice=("yes", 'say "no"'))) == {
        "grammar": 'root ::= "yes" | "say \\"no\\""'}, "a choice is the grammar of exactly its strings"
    assert backend.guided_kwargs(None) is None
    tagged = GuidedDecoding(json_schema='{"type": "object", "properties": {"a": {"type": "integer"}}, '
                                        '"required": ["a"]}', tags=("<tool_call>", "</tool_call>"))
    grammar = backend.guided_kwargs(tagged)["grammar"]  # a Hermes-style forced call: the schema between its tags
    matcher = xgr.GrammarMatcher(xgr.GrammarCompiler(xgr.TokenizerInfo([chr(c) for c in range(32, 127)]))
                                 .compile_grammar(grammar))
    assert all(matcher.accept_string(part) for part in ('<tool_call>{"a": ', "12}", "</tool_call>"))
    assert matcher.is_completed()
    for guided in (GuidedDecoding(json_schema=schema), GuidedDecoding(json_object=True), GuidedDecoding(ebnf="x"),
                   GuidedDecoding(regex="x"), GuidedDecoding(choice=("x",)), tagged):
        assert set(backend.guided_kwargs(guided) or {}) <= GUIDED_FIELDS


# -- the event stream ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(engines_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(engines_dir / "demo" / "checkpoint")


def streams_for(tokenizer: Any, req: GenerationRequest) -> backend.ChoiceStreams:
    return backend.ChoiceStreams(req, token_byte_table(tokenizer), {1, 4}, special_token_ids(tokenizer))  # demo EOS


def grow(out: FakeCompletionOutput, ids: list[int], finish: str | None = None) -> list[FakeCompletionOutput]:
    out.token_ids.extend(ids)
    out.finish_reason = finish
    return [out]


def test_stop_string_across_tokens_is_held_back_and_cut(tokenizer: Any) -> None:
    ids = tokenizer.encode("one two END three", add_special_tokens=False)
    streams = streams_for(tokenizer, request(stop=("END",)))
    out = FakeCompletionOutput(0)
    events = [e for token in ids for e in streams.events(grow(out, [token]))]
    text = "".join(e.text for e in events if isinstance(e, TokenDelta))
    assert text == "one two "
    assert isinstance(events[-1], Finished) and events[-1].finish_reason is FinishReason.STOP
    assert streams.done
    assert streams.events(grow(out, ids[:1])) == [], "nothing after the choice finished"


def test_eos_ends_the_choice_without_text_unless_ignored(tokenizer: Any) -> None:
    ids = tokenizer.encode("hello world", add_special_tokens=False)
    streams = streams_for(tokenizer, request())
    events = streams.events([FakeCompletionOutput(0, [*ids, 4, *ids])])
    assert "".join(e.text for e in events if isinstance(e, TokenDelta)) == "hello world"
    assert [(e.finish_reason, e.completion_tokens) for e in events if isinstance(e, Finished)] == [
        (FinishReason.STOP, len(ids) + 1)]
    ignoring = streams_for(tokenizer, request(ignore_eos=True))
    events = ignoring.events([FakeCompletionOutput(0, [*ids, 4])])
    assert not ignoring.done and sum(len(e.token_ids) for e in events if isinstance(e, TokenDelta)) == len(ids) + 1


def test_special_tokens_add_no_text_unless_asked_for(tokenizer: Any) -> None:
    """Under ignore_eos the end-of-turn token is generated like any other: its text must not reach the content."""
    ids = tokenizer.encode("hello world", add_special_tokens=False)
    tag = tokenizer.convert_tokens_to_ids("<|python_tag|>")
    for skip, expected in ((True, "hello worldhello world"), (False, "hello world<|eot_id|><|python_tag|>hello world")):
        streams = streams_for(tokenizer, request(ignore_eos=True, skip_special_tokens=skip))
        events = streams.events([FakeCompletionOutput(0, [*ids, 4, tag, *ids])])
        assert "".join(e.text for e in events if isinstance(e, TokenDelta)) == expected


def test_length_and_cancelled_finishes_count_tokens(tokenizer: Any) -> None:
    ids = tokenizer.encode("hello world again", add_special_tokens=False)
    streams = streams_for(tokenizer, request(n=2))
    first, second = FakeCompletionOutput(0), FakeCompletionOutput(1)
    first.token_ids, second.token_ids = list(ids), list(ids[:1])
    first.finish_reason = "length"
    events = streams.events([first, second])
    finished = [e for e in events if isinstance(e, Finished)]
    assert [(e.index, e.finish_reason, e.completion_tokens) for e in finished] == [(0, FinishReason.LENGTH, len(ids))]
    assert "".join(e.text for e in events if isinstance(e, TokenDelta) and e.index == 0) == "hello world again"
    second.finish_reason = "cancelled"
    assert [(e.index, e.finish_reason) for e in streams.events([first, second]) if isinstance(e, Finished)] == [
        (1, FinishReason.CANCELLED)]


def test_logprobs_are_mapped_with_their_top_tokens(tokenizer: Any) -> None:
    ids = tokenizer.encode("hi there", add_special_tokens=False)
    streams = streams_for(tokenizer, request(logprobs=True, top_logprobs=1))
    out = FakeCompletionOutput(0, list(ids), [{t: FakeLogprob(-0.5, 2), 7: FakeLogprob(-0.1, 1)} for t in ids])
    delta = streams.events([out])[0]
    assert isinstance(delta, TokenDelta) and delta.logprobs is not None and len(delta.logprobs) == len(ids)
    first = delta.logprobs[0]
    assert (first.token_id, first.logprob) == (ids[0], -0.5)
    assert [(t.token_id, t.logprob) for t in first.top] == [(7, -0.1)]


def test_unknown_finish_reason_is_an_engine_error(tokenizer: Any) -> None:
    streams = streams_for(tokenizer, request())
    with pytest.raises(EngineError, match="unknown reason 'exploded'"):
        streams.events([FakeCompletionOutput(0, [5], [], "exploded")])


# -- (b) a real gRPC server serving a tensorrt-llm model through the fake ---------------------------------------


def write_trt_model(engines: Path, demo_checkpoint: Path) -> None:
    model = engines / MODEL
    (model / "profiles" / "tensorrt-sm90-fp8-tp1").mkdir(parents=True)
    (model / "checkpoint").symlink_to(demo_checkpoint.resolve(), target_is_directory=True)
    (model / "manifest.json").write_text(json.dumps({"name": MODEL, "backend": "tensorrt-llm", "context_length": 2048,
                                                     "checkpoint": "checkpoint", "profiles": "profiles"}))
    profile = {"id": "tensorrt-sm90-fp8-tp1", "runtime": "tensorrt", "gpu_architecture": "sm90",
               "gpu_name": "H100-80GB", "precision": "fp8", "tensor_parallel_size": 1,
               "min_gpu_memory_bytes": 1 << 30, "tensorrt_llm_version": "1.2.0", "tensorrt_version": "10.13",
               "max_batch_size": 8, "max_seq_len": 2048, "max_num_tokens": 8192}
    (model / "profiles" / "tensorrt-sm90-fp8-tp1" / "profile.json").write_text(json.dumps(profile))


@dataclasses.dataclass
class TrtServer:
    server: Any
    fake: FakeTrtllmLLM
    loaded: list[tuple[Any, TrtllmConfig]]
    stub: chat_pb2_grpc.ChatServiceStub

    @property
    def engine(self) -> backend.TrtllmEngine:
        return self.server.registry.get(MODEL).engine


def patch_runtime(mp: pytest.MonkeyPatch, fake: FakeTrtllmLLM, loaded: list, gpus: list) -> None:
    def fake_runtime(profile: Any, manifest: Any, config: TrtllmConfig) -> backend.Runtime:
        loaded.append((profile, config))
        return backend.Runtime(fake, FakeSamplingParams, FakeGuidedDecodingParams)

    mp.setattr(backend, "create_runtime", fake_runtime)
    mp.setattr(backend, "detect_gpus", lambda: gpus)
    mp.setattr(backend, "installed_trtllm_version", lambda: "1.2.0")


@pytest.fixture(scope="module")
async def trt(engines_dir: Path, tmp_path_factory: pytest.TempPathFactory,
              tokenizer: Any) -> AsyncIterator[TrtServer]:
    engines = tmp_path_factory.mktemp("trt-engines")
    write_trt_model(engines, engines_dir / "demo" / "checkpoint")
    fake = FakeTrtllmLLM([tokenizer.encode(s, add_special_tokens=False) for s in SCRIPTS])
    loaded: list = []
    config = dataclasses.replace(server_config(engines, engine=EngineConfig(max_queue=2)),
                                 trtllm=TrtllmConfig(trt_max_batch_size=2, trt_kv_cache_fraction=0.5))
    with pytest.MonkeyPatch.context() as mp:
        patch_runtime(mp, fake, loaded, [parse_gpu("H100-80GB")])
        async with running_server(config) as srv, grpc.aio.insecure_channel(f"127.0.0.1:{srv.grpc_port}") as ch:
            yield TrtServer(srv, fake, loaded, chat_pb2_grpc.ChatServiceStub(ch))


def trt_chat(content: str = "Hello there", **fields: Any) -> chat_pb2.ChatCompletionRequest:
    return chat(content, model=MODEL, **fields)


async def test_profile_is_selected_and_flags_reach_the_runtime(trt: TrtServer) -> None:
    profile, config = trt.loaded[0]
    assert profile.id == "tensorrt-sm90-fp8-tp1"
    assert (config.trt_max_batch_size, config.trt_kv_cache_fraction) == (2, 0.5)
    info = trt.engine.profile
    assert (info.id, info.gpu_architecture, info.precision) == ("tensorrt-sm90-fp8-tp1", "sm90", "fp8")
    models = await trt.stub.ListModels(chat_pb2.ListModelsRequest())
    assert MODEL in [m.id for m in models.data]
    listed = next(m for m in models.data if m.id == MODEL)
    assert "regex" in listed.structured_output.forms and not listed.structured_output.closes_within_max_tokens, \
        "TensorRT-LLM cannot be told to close outputs within max_tokens, and says so"


async def test_unary(trt: TrtServer) -> None:
    reply = await trt.stub.CreateChatCompletion(trt_chat(temperature=0.0, max_tokens=64))
    choice = reply.choices[0]
    assert choice.message.content == SCRIPTS[0]
    assert choice.finish_reason == FR.FINISH_REASON_STOP
    result = trt.fake.results[-1]
    assert reply.usage.completion_tokens == len(result.outputs[0].token_ids)
    assert reply.usage.prompt_tokens == len(result.prompt_token_ids)
    assert result.sampling_params.kwargs["top_k"] == 1 and "temperature" not in result.sampling_params.kwargs


async def test_streaming_deltas_add_up(trt: TrtServer) -> None:
    chunks = [c async for c in trt.stub.StreamChatCompletion(trt_chat(max_tokens=64, seed=3))]
    text = "".join(c.delta.content for chunk in chunks for c in chunk.choices)
    assert text == SCRIPTS[0]
    assert sum(1 for chunk in chunks for c in chunk.choices if c.delta.content) > 3
    assert trt.fake.results[-1].sampling_params.kwargs["seed"] == 3


async def test_n_choices(trt: TrtServer) -> None:
    reply = await trt.stub.CreateChatCompletion(trt_chat(n=2, max_tokens=64))
    assert [c.message.content for c in reply.choices] == SCRIPTS
    kwargs = trt.fake.results[-1].sampling_params.kwargs
    assert (kwargs["n"], kwargs["best_of"]) == (2, 2)


async def test_stop_string_ends_the_choice_and_aborts_the_runtime(trt: TrtServer) -> None:
    reply = await trt.stub.CreateChatCompletion(trt_chat(stop=["The end"], max_tokens=64))
    assert reply.choices[0].message.content == "Hello from the fake runtime. "
    assert reply.choices[0].finish_reason == FR.FINISH_REASON_STOP
    result = trt.fake.results[-1]
    assert result.sampling_params.kwargs["stop"] == ["The end"]
    assert result.aborted, "the fake ignores stop strings, so the backend must abort the runtime's request"


async def test_max_tokens_is_length(trt: TrtServer) -> None:
    reply = await trt.stub.CreateChatCompletion(trt_chat(max_tokens=3))
    assert reply.choices[0].finish_reason == FR.FINISH_REASON_LENGTH
    assert reply.usage.completion_tokens == 3


async def test_logprobs(trt: TrtServer) -> None:
    reply = await trt.stub.CreateChatCompletion(trt_chat(max_tokens=4, logprobs=True, top_logprobs=2))
    entries = reply.choices[0].logprobs.content
    assert len(entries) == 4 and all(e.logprob == -0.25 and len(e.top_logprobs) == 2 for e in entries)
    assert trt.fake.results[-1].sampling_params.kwargs["logprobs"] == 2


async def test_cancel_aborts_the_runtime_request(trt: TrtServer) -> None:
    call = trt.stub.StreamChatCompletion(trt_chat(max_tokens=1500, ignore_eos=True))
    async for chunk in call:
        if any(c.delta.content for c in chunk.choices):
            break
    result = trt.fake.results[-1]
    assert trt.engine.stats().running == 1
    call.cancel()
    assert await wait_until(lambda: result.aborted and trt.engine.stats().running == 0, 5)


async def test_deadline_aborts_the_runtime_request(trt: TrtServer) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await trt.stub.CreateChatCompletion(trt_chat(max_tokens=1500, ignore_eos=True), timeout=0.4)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    result = trt.fake.results[-1]
    assert await wait_until(lambda: result.aborted and trt.engine.stats().running == 0, 5)


async def test_response_format_reaches_guided_decoding(trt: TrtServer) -> None:
    await trt.stub.CreateChatCompletion(trt_chat(max_tokens=4, response_format=chat_pb2.ResponseFormat(
        type="json_object")))
    guided = trt.fake.results[-1].sampling_params.kwargs["guided_decoding"]
    assert isinstance(guided, FakeGuidedDecodingParams) and guided.kwargs == {"json": '{"type": "object"}'}
    schema = chat_pb2.ResponseFormat(type="json_schema")
    schema.json_schema.name = "answer"
    schema.json_schema.schema.update({"type": "object", "properties": {"a": {"type": "integer"}}})
    await trt.stub.CreateChatCompletion(trt_chat(max_tokens=4, response_format=schema))
    guided = trt.fake.results[-1].sampling_params.kwargs["guided_decoding"]
    assert json.loads(guided.kwargs["json"]) == {"type": "object", "properties": {"a": {"type": "integer"}}}


async def test_queue_full_past_batch_and_queue(trt: TrtServer) -> None:
    """Batch 2 and queue 2: four streams are admitted (two wait inside TensorRT-LLM), the fifth is refused."""
    calls = [trt.stub.StreamChatCompletion(trt_chat(max_tokens=1500, ignore_eos=True)) for _ in range(4)]
    for call in calls:
        await call.read()
    assert trt.engine.stats().waiting == 2
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await trt.stub.CreateChatCompletion(trt_chat(max_tokens=2))
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    for call in calls:
        call.cancel()
    assert await wait_until(lambda: trt.engine.stats().running == 0, 5)


async def test_prompt_the_runtime_refuses_is_invalid_argument(trt: TrtServer) -> None:
    trt.fake.max_input_len = 4
    try:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await trt.stub.CreateChatCompletion(trt_chat(max_tokens=2))
    finally:
        trt.fake.max_input_len = 1 << 20
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "should not exceed max_input_len (4)" in (e.value.details() or "")
    assert trt.engine.stats().running == 0


async def test_no_fitting_profile_stops_the_start_with_the_reason(engines_dir: Path, tmp_path: Path,
                                                                  tokenizer: Any) -> None:
    write_trt_model(tmp_path, engines_dir / "demo" / "checkpoint")
    with pytest.MonkeyPatch.context() as mp:
        patch_runtime(mp, FakeTrtllmLLM([[1]]), [], [parse_gpu("A100-80GB")])
        with pytest.raises(ProfileError, match="tensorrt-sm90-fp8-tp1: needs sm90; found sm80"):
            async with running_server(server_config(tmp_path)):
                pass


async def test_shutdown_shuts_the_runtime_down(engines_dir: Path, tmp_path: Path, tokenizer: Any) -> None:
    write_trt_model(tmp_path, engines_dir / "demo" / "checkpoint")
    fake = FakeTrtllmLLM([tokenizer.encode("ok", add_special_tokens=False)])
    with pytest.MonkeyPatch.context() as mp:
        patch_runtime(mp, fake, [], [parse_gpu("H100-80GB")])
        async with running_server(server_config(tmp_path)) as srv:
            engine = srv.registry.get(MODEL).engine
            assert engine.health().ok
        assert fake.shut_down and not engine.health().ok


async def test_pending_request_ends_with_an_engine_error_at_shutdown(engines_dir: Path, tmp_path: Path,
                                                                      tokenizer: Any) -> None:
    write_trt_model(tmp_path, engines_dir / "demo" / "checkpoint")
    fake = FakeTrtllmLLM([tokenizer.encode("ok", add_special_tokens=False)])
    with pytest.MonkeyPatch.context() as mp:
        patch_runtime(mp, fake, [], [parse_gpu("H100-80GB")])
        engine = backend.TrtllmEngine(SimpleNamespace(name=MODEL, profiles=tmp_path / MODEL / "profiles",
                                                      root=tmp_path / MODEL,
                                                      checkpoint=tmp_path / MODEL / "checkpoint"),
                                      EngineConfig(), TrtllmConfig())
        await engine.start()
    events = engine.generate(request(max_tokens=1500, ignore_eos=True))
    assert isinstance(await anext(events), TokenDelta)
    await engine.shutdown()
    with pytest.raises(EngineError, match="the engine shut down"):
        await asyncio.wait_for(anext(events), 5)


# -- (c) on a GPU with TensorRT-LLM ----------------------------------------------------------------------------


def _gpu_skip_reason() -> str | None:
    if importlib.util.find_spec("tensorrt_llm") is None:
        return "TensorRT-LLM is not installed (the Dockerfile's trtllm target has it)"
    if not detect_gpus():
        return "no NVIDIA GPU"
    return None


@pytest.mark.gpu
@pytest.mark.skipif(not detect_gpus(), reason="no NVIDIA GPU")
def test_plan_for_the_detected_gpus() -> None:
    done = subprocess.run([sys.executable, "build_engine.py", "--plan", "--model", "llama-3.1-70b-instruct"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    gpu = detect_gpus()[0]
    assert done.returncode in (0, 2), done.stderr
    assert gpu.architecture in done.stdout + done.stderr


@pytest.mark.gpu
@pytest.mark.skipif(_gpu_skip_reason() is not None, reason=_gpu_skip_reason() or "")
async def test_build_and_serve_for_real(engines_dir: Path, tmp_path: Path) -> None:
    """Builds the small demo checkpoint into a bf16 engine for this GPU, then serves it through gRPC."""
    built = subprocess.run([sys.executable, "build_engine.py", "--model", str(engines_dir / "demo" / "checkpoint"),
                            "--name", MODEL, "--backend", "tensorrt-llm", "--dtype", "bf16", "--gpus", "1",
                            "--max-seq-len", "1024", "--max-batch-size", "8", "--engines-dir", str(tmp_path)],
                           cwd=ROOT, capture_output=True, text=True, timeout=3600)
    assert built.returncode == 0, built.stdout + built.stderr
    profiles = list((tmp_path / MODEL / "profiles").iterdir())
    record = json.loads((profiles[0] / "profile.json").read_text())
    assert record["gpu_architecture"] == detect_gpus()[0].architecture and record["tensorrt_llm_version"]
    async with running_server(server_config(tmp_path)) as srv, \
            grpc.aio.insecure_channel(f"127.0.0.1:{srv.grpc_port}") as ch:
        stub = chat_pb2_grpc.ChatServiceStub(ch)
        reply = await stub.CreateChatCompletion(trt_chat(max_tokens=8, ignore_eos=True, temperature=0.0))
        assert reply.choices[0].finish_reason == FR.FINISH_REASON_LENGTH
        assert reply.usage.completion_tokens == 8
        chunks = [c async for c in stub.StreamChatCompletion(trt_chat(max_tokens=8, ignore_eos=True,
                                                                      temperature=0.0))]
        streamed = "".join(c.delta.content for chunk in chunks for c in chunk.choices)
        assert streamed == reply.choices[0].message.content


# -- create_runtime and the build, against a fake tensorrt_llm package ------------------------------------------


@pytest.fixture
def fake_tensorrt_llm(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, module in fake_tensorrt_llm_modules().items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(FakeLLMConstructor, "created", [])


def test_create_runtime_passes_only_llm_api_arguments(fake_tensorrt_llm: None, engines_dir: Path,
                                                      tmp_path: Path) -> None:
    write_trt_model(tmp_path, engines_dir / "demo" / "checkpoint")
    model = tmp_path / MODEL
    manifest = SimpleNamespace(name=MODEL, checkpoint=model / "checkpoint")
    engine_profile = load_profile(model / "profiles" / "tensorrt-sm90-fp8-tp1")
    config = TrtllmConfig(trt_max_batch_size=64, trt_max_num_tokens=4096, trt_kv_cache_fraction=0.8,
                          trt_block_reuse=False, trt_chunked_prefill=True)
    runtime = CREATE_RUNTIME(engine_profile, manifest, config)
    llm = runtime.llm
    assert isinstance(llm, FakeTrtLLM) and set(llm.kwargs) <= LLM_ARGS_FIELDS
    assert llm.kwargs["model"] == str(engine_profile.path)
    assert llm.kwargs["tokenizer"] == str(manifest.checkpoint)
    assert (llm.kwargs["max_batch_size"], llm.kwargs["max_num_tokens"]) == (8, 4096), "capped at the engine's"
    assert llm.kwargs["kv_cache_config"].kwargs == {"free_gpu_memory_fraction": 0.8, "enable_block_reuse": False}
    assert llm.kwargs["enable_chunked_prefill"] is True and llm.kwargs["guided_decoding_backend"] == "xgrammar"
    assert llm.kwargs["gather_generation_logits"] is True and llm.kwargs["max_input_len"] == 2048
    assert runtime.sampling_params is FakeSamplingParams
    assert runtime.guided_decoding_params is FakeGuidedDecodingParams

    folder = model / "profiles" / "pytorch-sm80-bf16-tp2"
    folder.mkdir()
    data = json.loads((engine_profile.path / "profile.json").read_text())
    data.update(id=folder.name, runtime="pytorch", gpu_architecture="sm80", precision="bf16",
                tensor_parallel_size=2, tensorrt_llm_version="1.3")
    (folder / "profile.json").write_text(json.dumps(data))
    torch_llm = CREATE_RUNTIME(load_profile(folder), manifest, config).llm
    assert isinstance(torch_llm, FakeTorchLLM) and set(torch_llm.kwargs) <= LLM_ARGS_FIELDS
    assert torch_llm.kwargs["model"] == str(folder / "model")
    assert (torch_llm.kwargs["backend"], torch_llm.kwargs["dtype"], torch_llm.kwargs["tensor_parallel_size"]) == (
        "pytorch", "bfloat16", 2)
    assert "gather_generation_logits" not in torch_llm.kwargs


def test_engine_build_drives_the_llm_api(fake_tensorrt_llm: None, engines_dir: Path, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from service.repository.build import trtllm as build_trtllm

    monkeypatch.setattr(build_trtllm, "detect_gpus", lambda: [parse_gpu("H100-80GB")] * 2)
    args = SimpleNamespace(model=str(engines_dir / "demo" / "checkpoint"), name="tiny", engines_dir=tmp_path,
                           backend="tensorrt-llm", plan=False, gpu=None, gpus=None, dtype="auto", tp=None,
                           max_batch_size=8, max_seq_len=1024, max_num_tokens=2048)
    assert build_trtllm.run(args) == 0
    [llm] = FakeLLMConstructor.created
    assert isinstance(llm, FakeTrtLLM) and llm.shut_down
    assert llm.kwargs["build_config"].kwargs == {"max_batch_size": 8, "max_seq_len": 1024, "max_input_len": 1024,
                                                 "max_num_tokens": 2048}
    assert llm.kwargs["quant_config"].kwargs == {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8"}
    assert (llm.kwargs["tensor_parallel_size"], llm.kwargs["dtype"]) == (1, "auto")
    profile = load_profile(tmp_path / "tiny" / "profiles" / "tensorrt-sm90-fp8-tp1")
    assert (profile.tensorrt_llm_version, profile.data["tensorrt_version"]) == ("1.2.0", "10.13.2")
    assert "rank0.engine" in profile.data["checksum"]["files"]
