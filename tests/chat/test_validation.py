"""Validation: the contract's documented ranges (boundaries pass, the nearest values outside fail naming the field),
the rules between fields, and one pass that reports every violation at once, the model's context included."""

from __future__ import annotations

import math
from typing import Any

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.chat.validation import request_violations, validate_chat, validate_tokenize
from service.config import ServerConfig
from service.errors import ServiceError
from service.gen.llmserve.v1 import chat_pb2
from tests.helpers import chat, struct

LIMITS = ServerConfig(max_messages=8, max_content_chars=100)
INT64_MAX = 2**63 - 1


def request(**fields: object) -> chat_pb2.ChatCompletionRequest:
    return chat("hi", **fields)


def violated_fields(req: chat_pb2.ChatCompletionRequest) -> list[str]:
    return [v.field for v in request_violations(req, LIMITS)]


# (field, values inside the range (boundaries), nearest values outside)
RANGES = [
    ("temperature", [0.0, 2.0, 1.0], [-1e-9, 2.000001, math.nan, math.inf]),
    ("top_p", [1e-9, 1.0], [0.0, 1.0000001, -0.5, math.nan]),
    ("min_p", [0.0, 1.0], [-1e-9, 1.0000001]),
    ("top_k", [0, 999], [-1, 1000]),
    ("max_tokens", [0, 1_000_000], [-1, 1_000_001]),
    ("n", [1, 4], [0, 5]),
    ("presence_penalty", [-2.0, 2.0], [-2.0000001, 2.0000001]),
    ("frequency_penalty", [-2.0, 2.0], [-2.0000001, 2.0000001]),
    ("repetition_penalty", [0.01, 5.0], [0.0099999, 5.0000001, 0.0]),
    ("seed", [0, INT64_MAX], [-1]),
    ("top_logprobs", [0, 20], [-1, 21]),
    ("user", ["", "u" * 256], ["u" * 257]),
]


@pytest.mark.parametrize(("field", "inside", "outside"), RANGES, ids=[r[0] for r in RANGES])
def test_ranges(field: str, inside: list[object], outside: list[object]) -> None:
    extra = {"logprobs": True} if field == "top_logprobs" else {}
    for value in inside:
        assert violated_fields(request(**{field: value}, **extra)) == [], (field, value)
    for value in outside:
        assert violated_fields(request(**{field: value}, **extra)) == [field], (field, value)


def test_model_is_required() -> None:
    assert violated_fields(request(model="")) == ["model"]


def test_messages_roles_and_count() -> None:
    assert violated_fields(chat_pb2.ChatCompletionRequest(model="demo")) == ["messages"]
    for role in ("system", "user", "assistant", "tool"):
        msg = chat_pb2.ChatMessage(role=role, content="x", tool_call_id="c1" if role == "tool" else "")
        assert violated_fields(request(messages=[msg])) == [], role
    assert violated_fields(request(messages=[chat_pb2.ChatMessage(role="bot", content="x")])) == ["messages[1].role"]
    many = [chat_pb2.ChatMessage(role="user", content="x")] * LIMITS.max_messages
    assert violated_fields(request(messages=many)) == ["messages"]  # one already there: 9 > 8


def test_every_violation_is_reported_not_only_the_first() -> None:
    req = request(temperature=3.0, top_k=-1, n=9, messages=[chat_pb2.ChatMessage(role="robot", content="x")])
    req.model = ""
    assert sorted(violated_fields(req)) == sorted(["model", "temperature", "top_k", "n", "messages[1].role"])


def test_stop_strings() -> None:
    assert violated_fields(request(stop=["a"] * 16)) == []
    assert violated_fields(request(stop=["a"] * 17)) == ["stop"]
    assert violated_fields(request(stop=["ok", ""])) == ["stop[1]"]


def test_message_content_limit_and_role_rules() -> None:
    assert violated_fields(request(messages=[chat_pb2.ChatMessage(role="user", content="x" * 100)])) == []
    assert violated_fields(request(messages=[chat_pb2.ChatMessage(role="user", content="x" * 101)])) == [
        "messages[1].content"]
    assert violated_fields(request(messages=[chat_pb2.ChatMessage(role="tool", content="42")])) == [
        "messages[1].tool_call_id"]
    assert violated_fields(request(messages=[chat_pb2.ChatMessage(role="user")])) == ["messages[1].content"]


def tool(name: str) -> chat_pb2.Tool:
    return chat_pb2.Tool(type="function", function=chat_pb2.FunctionDefinition(name=name))


def test_cross_field_rules() -> None:
    assert violated_fields(request(top_logprobs=3)) == ["top_logprobs"]
    assert violated_fields(request(top_logprobs=3, logprobs=True)) == []
    named = chat_pb2.ToolChoice(function=chat_pb2.NamedFunction(name="get_weather"))
    assert violated_fields(request(tools=[tool("get_time")], tool_choice=named)) == ["tool_choice.function.name"]
    assert violated_fields(request(tools=[tool("get_weather")], tool_choice=named)) == []
    assert violated_fields(request(tool_choice=chat_pb2.ToolChoice(mode="required"))) == ["tool_choice"]
    assert violated_fields(request(tool_choice=chat_pb2.ToolChoice(mode="sometimes"))) == ["tool_choice.mode"]
    assert violated_fields(request(tools=[tool("bad name!")])) == ["tools[0].function.name"]
    assert violated_fields(request(tools=[tool("a"), tool("a")])) == ["tools"]
    fmt = chat_pb2.ResponseFormat(type="json_schema")
    assert violated_fields(request(response_format=fmt)) == ["response_format.json_schema.schema"]
    assert violated_fields(request(response_format=chat_pb2.ResponseFormat(type="yaml"))) == ["response_format.type"]


def test_tokenize_needs_exactly_one_input(server: Any) -> None:
    with pytest.raises(ServiceError) as e:
        validate_tokenize(chat_pb2.TokenizeRequest(model="demo"), server.registry, LIMITS)
    assert [v.field for v in e.value.violations] == ["text"]
    both = chat_pb2.TokenizeRequest(model="demo", text="x", messages=[chat_pb2.ChatMessage(role="user", content="x")])
    with pytest.raises(ServiceError):
        validate_tokenize(both, server.registry, LIMITS)
    _, tokens = validate_tokenize(chat_pb2.TokenizeRequest(model="demo", text="x"), server.registry, LIMITS)
    assert tokens
    tools = [chat_pb2.Tool(type="function", function=chat_pb2.FunctionDefinition(name="ping"))]
    with pytest.raises(ServiceError) as e:
        validate_tokenize(chat_pb2.TokenizeRequest(model="demo", text="x", tools=tools), server.registry, LIMITS)
    assert [v.field for v in e.value.violations] == ["tools"], "tools are rendered with messages only"
    chat_only = chat_pb2.TokenizeRequest(model="demo", messages=[chat_pb2.ChatMessage(role="user", content="x")])
    _, plain = validate_tokenize(chat_only, server.registry, LIMITS)
    chat_only.tools.extend(tools)
    _, with_tools = validate_tokenize(chat_only, server.registry, LIMITS)
    assert len(with_tools) > len(plain), "the tools reach the prompt"


def test_defaults_when_unset(server: Any) -> None:
    valid = validate_chat(request(), server.registry, LIMITS)
    params = valid.sampling
    assert (params.temperature, params.top_p, params.top_k, params.min_p) == (1.0, 1.0, 0, 0.0)
    assert (params.presence_penalty, params.frequency_penalty, params.repetition_penalty) == (0.0, 0.0, 1.0)
    assert params.seed is None and not params.logprobs and not params.ignore_eos
    assert valid.n == 1 and valid.guided is None and valid.tool_names == []
    assert params.max_tokens == server.registry.get("demo").manifest.context_length - len(valid.prompt)
    # An explicit zero is not "unset": temperature 0 means greedy.
    assert validate_chat(request(temperature=0.0), server.registry, LIMITS).sampling.temperature == 0.0


def test_one_answer_names_a_bad_temperature_a_bad_schema_and_a_context_overflow(server: Any) -> None:
    context = server.registry.get("demo").manifest.context_length
    bad_schema = struct({"type": "object", "properties": {"a": {"type": "no-such-type"}}})
    req = request(temperature=7.0, max_tokens=context, response_format=chat_pb2.ResponseFormat(
        type="json_schema", json_schema=chat_pb2.JsonSchema(name="x", schema=bad_schema)))
    with pytest.raises(ServiceError) as e:
        validate_chat(req, server.registry, LIMITS)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in e.value.violations] == [
        "temperature", "response_format.json_schema.schema", "max_tokens"]
    too_long = request(messages=[chat_pb2.ChatMessage(role="user", content="word " * context)], top_k=-1)
    with pytest.raises(ServiceError) as e:
        validate_chat(too_long, server.registry, ServerConfig(max_content_chars=10 * context))
    assert [v.field for v in e.value.violations] == ["top_k", "messages"]


def test_an_unknown_model_is_not_found_unless_the_request_is_also_invalid(server: Any) -> None:
    with pytest.raises(ServiceError) as e:
        validate_chat(request(model="nope"), server.registry, LIMITS)
    assert e.value.code == grpc.StatusCode.NOT_FOUND
    with pytest.raises(ServiceError) as e:
        validate_chat(request(model="nope", temperature=-1.0), server.registry, LIMITS)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and [v.field for v in e.value.violations] == [
        "temperature"]


def _maybe(strategy: st.SearchStrategy) -> st.SearchStrategy:
    """Unset half the time, so that fully valid requests are common enough to check the mapping."""
    return st.one_of(st.none(), strategy)


def _around(lo: float, hi: float) -> st.SearchStrategy:
    return _maybe(st.one_of(st.floats(lo - 0.5, hi + 0.5), st.sampled_from([lo, hi, math.nan, math.inf])))


def _ints_around(lo: int, hi: int) -> st.SearchStrategy:
    return _maybe(st.integers(lo - 2, hi + 2))


def test_valid_requests_map_to_in_range_engine_parameters(server: Any) -> None:
    checked: list[int] = []
    clamping = ServerConfig(max_messages=8, max_content_chars=100, clamp_max_tokens=True)

    @settings(max_examples=800, deadline=None, derandomize=True)
    @given(temperature=_around(0, 2), top_p=_around(0, 1), min_p=_around(0, 1), top_k=_ints_around(0, 999),
           max_tokens=_ints_around(0, 1_000_000), n=_ints_around(1, 4), presence_penalty=_around(-2, 2),
           frequency_penalty=_around(-2, 2), repetition_penalty=_around(0.01, 5),
           seed=_maybe(st.integers(-(2**63), 2**63 - 1)), top_logprobs=_ints_around(0, 20),
           logprobs=_maybe(st.booleans()), stop=st.lists(st.text(min_size=1, max_size=4), max_size=17))
    def check(**fields: object) -> None:
        req = request(**{k: v for k, v in fields.items() if v is not None})
        try:
            valid = validate_chat(req, server.registry, clamping)
        except ServiceError:
            return
        p = valid.sampling
        assert 0 <= p.temperature <= 2 and 0 < p.top_p <= 1 and 0 <= p.min_p <= 1 and 0 <= p.top_k <= 999
        assert -2 <= p.presence_penalty <= 2 and -2 <= p.frequency_penalty <= 2
        assert 0.01 <= p.repetition_penalty <= 5
        assert 0 <= p.max_tokens <= 1_000_000 and 0 <= req.n <= 4 and 0 <= p.top_logprobs <= 20
        assert p.seed is None or 0 <= p.seed < 2**63
        assert len(p.stop) <= 16 and all(p.stop)
        assert p.top_logprobs == 0 or p.logprobs
        checked.append(1)

    check()
    assert len(checked) >= 20, f"only {len(checked)} valid requests were generated"
