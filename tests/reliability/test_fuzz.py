"""Property-based fuzzing of both front doors against a real server process.

Whatever arrives, the answer is a completion or a clear error (INVALID_ARGUMENT naming fields; HTTP 4xx in
OpenAI's shape), no traceback reaches a client, and the server stays SERVING. The server runs in its own process
so that the tests can use blocking clients under hypothesis and read the server's log afterwards.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from google.protobuf import struct_pb2
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.gen.llmserve.v1 import chat_pb2
from service.healthcheck import wait_serving
from tests.helpers import ROOT, free_port

FUZZ = settings(max_examples=300, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
CHAT = "/llmserve.v1.ChatService/CreateChatCompletion"
STREAM = "/llmserve.v1.ChatService/StreamChatCompletion"
TOKENIZE = "/llmserve.v1.ChatService/Tokenize"
CLIENT_ERRORS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}


class Fuzzed:
    """A served demo model, and blocking gRPC and HTTP clients of it."""

    def __init__(self, engines_dir: Path, log: Path) -> None:
        self.grpc_port, self.http_port = free_port(), free_port()
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service", "serve", "--engines-dir", str(engines_dir), "--host", "127.0.0.1",
             "--grpc-port", str(self.grpc_port), "--http-port", str(self.http_port)],
            cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.grpc_port}")
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.http_port}", timeout=60)

    def health(self) -> int:
        return health_pb2_grpc.HealthStub(self.channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status

    def wait_serving(self) -> None:
        wait_serving(f"127.0.0.1:{self.grpc_port}", self.proc, 60, self.log.read_text)

    def raw(self, method: str, body: bytes) -> tuple[grpc.StatusCode, list[Any], grpc.RpcError | None]:
        """Sends bytes as the request message, as a client with another idea of the schema would."""
        try:
            if method == STREAM:
                call = self.channel.unary_stream(method)(body, timeout=60)
                return grpc.StatusCode.OK, list(call), None
            return grpc.StatusCode.OK, [self.channel.unary_unary(method)(body, timeout=60)], None
        except grpc.RpcError as e:
            return e.code(), [], e

    def close(self) -> str:
        self.channel.close()
        self.http.close()
        self.proc.terminate()
        self.proc.wait(30)
        return self.log.read_text()


@pytest.fixture(scope="module")
def fuzzed(engines_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzed]:
    server = Fuzzed(engines_dir, tmp_path_factory.mktemp("fuzz") / "server.log")
    try:
        server.wait_serving()
        yield server
        assert server.health() == health_pb2.HealthCheckResponse.SERVING
        assert server.proc.poll() is None
    finally:
        log = server.close()
    assert "Traceback" not in log, log[-4000:]


def assert_clear_grpc_error(code: grpc.StatusCode, error: grpc.RpcError | None) -> None:
    assert code in CLIENT_ERRORS, (code, error and error.details())
    details = error.details() if error else ""
    assert details and "Traceback" not in details and "File \"" not in details, details
    if code == grpc.StatusCode.INVALID_ARGUMENT and "not a valid message" not in details:
        status = rpc_status.from_call(error)  # type: ignore[arg-type]
        assert status is not None, details
        bad = error_details_pb2.BadRequest()
        assert status.details[0].Unpack(bad) and bad.field_violations, details


# -- gRPC: bytes that are no message, and messages with every value out of place --------------------------------

@FUZZ
@given(body=st.binary(max_size=600), method=st.sampled_from([CHAT, STREAM, TOKENIZE]))
def test_grpc_arbitrary_bytes(fuzzed: Fuzzed, body: bytes, method: str) -> None:
    code, _, error = fuzzed.raw(method, body)
    if code != grpc.StatusCode.OK:
        assert_clear_grpc_error(code, error)


# max_tokens first (fields may come in any order on the wire), so that a truncated request stays short to answer
VALID = (chat_pb2.ChatCompletionRequest(max_tokens=4).SerializeToString()
         + chat_pb2.ChatCompletionRequest(model="demo", messages=[
             chat_pb2.ChatMessage(role="user", content="Hello there")]).SerializeToString())


@FUZZ
@given(cut=st.integers(2, len(VALID)), flips=st.lists(st.tuples(st.integers(0, len(VALID) - 1),
                                                                st.integers(1, 255)), max_size=4))
def test_grpc_corrupted_and_truncated_messages(fuzzed: Fuzzed, cut: int, flips: list[tuple[int, int]]) -> None:
    body = bytearray(VALID[:cut] if cut < len(VALID) else VALID)
    for at, xor in flips:
        if at < len(body):
            body[at] ^= xor
    code, replies, error = fuzzed.raw(CHAT, bytes(body))
    if code == grpc.StatusCode.OK:
        sent = chat_pb2.ChatCompletionRequest.FromString(bytes(body))
        reply = chat_pb2.ChatCompletion.FromString(replies[0])
        assert len(reply.choices) == (sent.n if sent.HasField("n") else 1)
        if sent.HasField("max_tokens"):
            assert reply.usage.completion_tokens <= sent.max_tokens * len(reply.choices)
    else:
        assert_clear_grpc_error(code, error)


def floats() -> st.SearchStrategy[float]:
    return st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.floats(-3, 3), st.sampled_from(
        [0.0, -0.0, 1.0, 2.0, 1e-300, float("nan"), float("inf"), -float("inf")]))


def int32s() -> st.SearchStrategy[int]:
    return st.one_of(st.integers(-(2**31), 2**31 - 1), st.integers(-2, 6))


texts = st.one_of(st.text(max_size=40), st.sampled_from(["", " ", "\x00", "data: [DONE]\n\n", "\r\n\r\n", "\u2028",
                                                         "<|eot_id|>", "[INST]", "😀" * 8]))
messages = st.lists(st.builds(dict, role=st.sampled_from(["system", "user", "assistant", "tool", "", "root"]),
                              content=st.one_of(st.none(), texts), name=st.one_of(st.none(), texts),
                              tool_call_id=st.one_of(st.none(), texts)), max_size=5)


@FUZZ
@given(model=st.sampled_from(["demo", "", "nope", "DEMO"]), messages=messages, temperature=floats(), top_p=floats(),
       min_p=floats(), presence=floats(), repetition=floats(), top_k=int32s(),
       max_tokens=st.one_of(st.integers(-(2**31), -1), st.integers(0, 6), st.integers(1_000_001, 2**31 - 1)),
       n=int32s(), seed=st.integers(-(2**63), 2**63 - 1), top_logprobs=int32s(), logprobs=st.booleans(),
       stop=st.lists(texts, max_size=18))
def test_grpc_fields_out_of_range(fuzzed: Fuzzed, model: str, messages: list[dict[str, Any]], temperature: float,
                                  top_p: float, min_p: float, presence: float, repetition: float, top_k: int,
                                  max_tokens: int, n: int, seed: int, top_logprobs: int, logprobs: bool,
                                  stop: list[str]) -> None:
    req = chat_pb2.ChatCompletionRequest(model=model, temperature=temperature, top_p=top_p, min_p=min_p,
                                         presence_penalty=presence, repetition_penalty=repetition, top_k=top_k,
                                         max_tokens=max_tokens, n=n, seed=seed, top_logprobs=top_logprobs,
                                         logprobs=logprobs, stop=stop)
    for m in messages:
        req.messages.add(**{k: v for k, v in m.items() if v is not None})
    code, replies, error = fuzzed.raw(CHAT, req.SerializeToString())
    if code != grpc.StatusCode.OK:
        assert_clear_grpc_error(code, error)
        return
    reply = chat_pb2.ChatCompletion.FromString(replies[0])
    assert model == "demo" and 0 <= max_tokens <= 6 and 1 <= n <= 4 and 0.0 <= temperature <= 2.0
    assert len(reply.choices) == n and reply.usage.completion_tokens <= max_tokens * n


def test_grpc_invalid_utf8_in_a_string_field(fuzzed: Fuzzed) -> None:
    body = VALID.replace(b"Hello there", b"Hello \xff\xfe\xfd\xc3(")
    code, _, error = fuzzed.raw(CHAT, body)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert_clear_grpc_error(code, error)


def test_grpc_thousands_of_messages_and_enormous_strings(fuzzed: Fuzzed) -> None:
    many = chat_pb2.ChatCompletionRequest(model="demo", max_tokens=1, messages=[
        chat_pb2.ChatMessage(role="user", content=f"m{i}") for i in range(5000)])
    code, _, error = fuzzed.raw(CHAT, many.SerializeToString())
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "at most 2048 messages" in error.details()  # type: ignore[union-attr]
    del many.messages[2000:]
    code, _, error = fuzzed.raw(CHAT, many.SerializeToString())
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "context" in error.details()  # type: ignore[union-attr]
    huge = chat_pb2.ChatCompletionRequest(model="demo", max_tokens=1, messages=[
        chat_pb2.ChatMessage(role="user", content="x" * 3_000_000)])
    code, _, error = fuzzed.raw(CHAT, huge.SerializeToString())
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert_clear_grpc_error(code, error)


def deep_struct(depth: int) -> struct_pb2.Struct:
    inner = struct_pb2.Struct()
    for _ in range(depth):
        outer = struct_pb2.Struct()
        outer.fields["properties"].struct_value.CopyFrom(inner)
        inner = outer
    return inner


def test_grpc_deep_tool_schema(fuzzed: Fuzzed) -> None:
    req = chat_pb2.ChatCompletionRequest.FromString(VALID)
    tool = req.tools.add(type="function")
    tool.function.name = "f"
    tool.function.parameters.CopyFrom(deep_struct(40))  # 120 message levels: past protobuf's recursion limit
    code, _, error = fuzzed.raw(CHAT, req.SerializeToString())
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert_clear_grpc_error(code, error)


# -- REST: bodies that are no JSON, JSON of the wrong shape, and SSE-hostile content ----------------------------

def assert_openai_error(r: httpx.Response, statuses: set[int]) -> None:
    assert r.status_code in statuses, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    assert "Traceback" not in r.text and "File \"" not in r.text


@FUZZ
@given(body=st.binary(max_size=400))
def test_rest_arbitrary_bytes(fuzzed: Fuzzed, body: bytes) -> None:
    r = fuzzed.http.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert_openai_error(r, {400})


scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | texts
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3), max_leaves=12)
FIELDS = ["model", "messages", "temperature", "top_p", "max_tokens", "n", "stop", "seed", "logprobs", "top_logprobs",
          "tools", "tool_choice", "response_format", "stream", "stream_options", "user", "min_p", "top_k"]


@FUZZ
@given(body=st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=8), keep_valid=st.booleans())
def test_rest_json_of_the_wrong_shape(fuzzed: Fuzzed, body: dict[str, Any], keep_valid: bool) -> None:
    if keep_valid:  # mostly-valid requests reach the deeper checks
        body = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], **body, "max_tokens": 4,
                "stream": False}
    r = fuzzed.http.post("/v1/chat/completions", json=body)
    if r.status_code == 200:
        reply = r.json()
        assert reply["object"] == "chat.completion" and reply["usage"]["completion_tokens"] <= 4 * len(
            reply["choices"])
    else:
        assert_openai_error(r, {400, 404})


@FUZZ
@given(cut=st.integers(1, 80))
def test_rest_truncated_json(fuzzed: Fuzzed, cut: int) -> None:
    full = json.dumps({"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    r = fuzzed.http.post("/v1/chat/completions", content=full[:cut], headers={"content-type": "application/json"})
    assert_openai_error(r, {400})


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_rest_non_finite_numbers_name_the_field(fuzzed: Fuzzed, literal: str) -> None:
    body = f'{{"model": "demo", "messages": [{{"role": "user", "content": "hi"}}], "temperature": {literal}}}'
    r = fuzzed.http.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert_openai_error(r, {400})
    assert r.json()["error"]["param"] == "temperature"


def test_rest_deep_json_and_enormous_bodies(fuzzed: Fuzzed) -> None:
    deep = ('{"model": "demo", "messages": [{"role": "user", "content": "hi"}], "tools": '
            + "[" * 100_000 + "]" * 100_000 + "}")
    assert_openai_error(fuzzed.http.post("/v1/chat/completions", content=deep), {400})
    schema: dict[str, Any] = {}
    for _ in range(300):
        schema = {"type": "object", "properties": {"a": schema}}
    nested = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
              "tools": [{"type": "function", "function": {"name": "f", "parameters": schema}}]}
    assert_openai_error(fuzzed.http.post("/v1/chat/completions", json=nested), {400})
    huge = {"model": "demo", "messages": [{"role": "user", "content": "x" * 5_000_000}]}
    assert_openai_error(fuzzed.http.post("/v1/chat/completions", json=huge), {413})


@FUZZ
@given(content=texts, stop=st.lists(st.sampled_from(["\n", "\n\n", "data:", "[DONE]", "\r", "}"]), max_size=4),
       seed=st.integers(0, 2**32))
def test_rest_sse_frames_survive_hostile_content(fuzzed: Fuzzed, content: str, stop: list[str], seed: int) -> None:
    body = {"model": "demo", "messages": [{"role": "user", "content": content or "x"}], "stream": True,
            "max_tokens": 12, "seed": seed, "stop": stop}
    with fuzzed.http.stream("POST", "/v1/chat/completions", json=body) as r:
        raw = r.read()
    assert r.status_code == 200, raw
    frames = raw.split(b"\n\n")
    assert frames[-1] == b"" and frames[-2] == b"data: [DONE]", raw[-200:]
    text = ""
    for frame in frames[:-2]:
        assert frame.startswith(b"data: ") and b"\n" not in frame and b"\r" not in frame, frame
        chunk = json.loads(frame[6:])
        assert chunk["object"] == "chat.completion.chunk"
        text += "".join(choice["delta"].get("content") or "" for choice in chunk["choices"])
    assert not any(s in text for s in stop), (text, stop)
