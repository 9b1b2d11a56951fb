"""response_format json_object and json_schema: whatever the (random) demo model wants, the answer parses and
validates, over 20 seeds, unary and streamed, through gRPC and the REST shim, even when max_tokens ends it (the
engine closes the document in time); a max_tokens below the shortest document and bad schemas name their field."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import grpc
import httpx
import jsonschema
import pytest
import torch
from transformers import AutoTokenizer

from service.backends import grammar
from service.backends.base import GuidedDecoding
from service.gen.llmserve.v1 import chat_pb2, chat_pb2_grpc
from tests.helpers import chat, field_violations, struct

FR = chat_pb2.FinishReason
SEEDS = range(20)
FIELD = "response_format.json_schema.schema"

# Bounded (string lengths, array sizes, number ranges), so that a random model's answers end within max_tokens.
SCHEMAS: dict[str, dict[str, Any]] = {
    "nested": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 130},
            "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                         "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                        "required": ["city", "zip"]},
        },
        "required": ["name", "age", "address"],
    },
    "arrays_and_enums": {
        "type": "object",
        "properties": {
            "status": {"enum": ["ok", "error", "pending"]},
            "items": {"type": "array", "minItems": 1, "maxItems": 3,
                      "items": {"type": "object", "properties": {"sku": {"enum": ["A1", "B2", "C3"]},
                                                                 "qty": {"type": "integer", "minimum": 1,
                                                                         "maximum": 9}},
                                "required": ["sku", "qty"]}},
            "flags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 4},
        },
        "required": ["status", "items", "flags"],
    },
    "numbers_and_nulls": {
        "type": "object",
        "properties": {
            "price": {"type": "number", "minimum": 0, "maximum": 100},
            "discount": {"anyOf": [{"type": "number", "minimum": 0, "maximum": 1}, {"type": "null"}]},
            "in_stock": {"type": "boolean"},
            "tag": {"type": ["string", "null"], "maxLength": 8},
        },
        "required": ["price", "discount", "in_stock", "tag"],
    },
}


def schema_format(schema: dict[str, Any]) -> chat_pb2.ResponseFormat:
    return chat_pb2.ResponseFormat(type="json_schema",
                                   json_schema=chat_pb2.JsonSchema(name="answer", schema=struct(schema)))


async def streamed(stub: chat_pb2_grpc.ChatServiceStub, req: chat_pb2.ChatCompletionRequest) -> tuple[str, int]:
    text, finish = [], FR.FINISH_REASON_UNSPECIFIED
    async for chunk in stub.StreamChatCompletion(req):
        for c in chunk.choices:
            text.append(c.delta.content)
            finish = c.finish_reason or finish
    return "".join(text), finish


@pytest.mark.parametrize("name", sorted(SCHEMAS))
async def test_json_schema_answers_always_validate(stub: chat_pb2_grpc.ChatServiceStub, name: str) -> None:
    """Unary for every schema; streamed (the concatenated deltas) for one, since both share one engine path."""
    schema = SCHEMAS[name]
    reqs = [chat("Describe it as JSON.", response_format=schema_format(schema), seed=seed, max_tokens=160)
            for seed in SEEDS]
    unary, streams = await asyncio.gather(
        asyncio.gather(*(stub.CreateChatCompletion(r) for r in reqs)),
        asyncio.gather(*(streamed(stub, r) for r in reqs if name == "nested")))
    answers = [(r.choices[0].message.content, r.choices[0].finish_reason) for r in unary] + list(streams)
    for text, finish in answers:
        assert finish == FR.FINISH_REASON_STOP, text
        jsonschema.validate(json.loads(text), schema)
    assert len({text for text, _ in answers}) > 1, "different seeds should give different answers"


# Nested objects, arrays, enums and required fields, with strings and arrays unbounded: a random model rambles in
# them until max_tokens, so the engine must close the document itself.
UNBOUNDED: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "status": {"enum": ["active", "inactive", "pending"]},
        "address": {"type": "object", "properties": {"street": {"type": "string"},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["street", "zip"]},
        "items": {"type": "array", "minItems": 1,
                  "items": {"type": "object", "properties": {"sku": {"type": "string"},
                                                             "qty": {"type": "integer", "minimum": 1}},
                            "required": ["sku", "qty"]}},
        "note": {"type": "string"},
    },
    "required": ["name", "status", "address", "items"],
}
FORMATS = {"json_object": (chat_pb2.ResponseFormat(type="json_object"), {"type": "object"}),
           "json_schema": (schema_format(UNBOUNDED), UNBOUNDED)}


async def minimum_tokens(stub: chat_pb2_grpc.ChatServiceStub, req: chat_pb2.ChatCompletionRequest) -> int:
    """The fewest max_tokens the request's format allows, as the INVALID_ARGUMENT for max_tokens 0 names it."""
    probe = chat_pb2.ChatCompletionRequest()
    probe.CopyFrom(req)
    probe.max_tokens = 0
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.CreateChatCompletion(probe)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field_violations(e.value) == ["max_tokens"]
    found = re.search(r"shortest output .* allows, (\d+) tokens", e.value.details())
    assert found, e.value.details()
    return int(found.group(1))


@pytest.mark.parametrize("form", sorted(FORMATS))
async def test_answers_parse_and_validate_whatever_max_tokens(stub: chat_pb2_grpc.ChatServiceStub, form: str) -> None:
    """20 seeds at temperature 1, max_tokens spread from the minimum to 300, unary and streamed: every answer is a
    whole valid document within max_tokens; "length" when the budget closed it, "stop" when the model did."""
    fmt, schema = FORMATS[form]
    least = await minimum_tokens(stub, chat("Describe it as JSON.", response_format=fmt))
    budgets = [least + (300 - least) * i // (len(SEEDS) - 1) for i in range(len(SEEDS))]
    reqs = [chat("Describe it as JSON.", response_format=fmt, seed=seed, max_tokens=budget, temperature=1.0)
            for seed, budget in zip(SEEDS, budgets, strict=True)]
    unary, streams = await asyncio.gather(asyncio.gather(*(stub.CreateChatCompletion(r) for r in reqs)),
                                          asyncio.gather(*(streamed(stub, r) for r in reqs)))
    for reply, (text, finish), budget in zip(unary, streams, budgets, strict=True):
        c = reply.choices[0]
        assert reply.usage.completion_tokens <= budget
        assert (text, finish) == (c.message.content, c.finish_reason), "streamed as answered"
        assert finish in (FR.FINISH_REASON_STOP, FR.FINISH_REASON_LENGTH)
        jsonschema.validate(json.loads(text), schema)
    reasons = [r.choices[0].finish_reason for r in unary]
    # Not vacuous: many budgets were too small for the model, so closing within max_tokens was exercised.
    assert reasons.count(FR.FINISH_REASON_LENGTH) >= len(SEEDS) // 3, "few budgets were too small for the model"
    exact = await stub.CreateChatCompletion(chat("Describe it as JSON.", response_format=fmt, seed=1, max_tokens=least))
    jsonschema.validate(json.loads(exact.choices[0].message.content), schema)


async def test_with_enough_budget_the_answer_is_the_models_own(stub: chat_pb2_grpc.ChatServiceStub) -> None:
    """Against a run whose budget never binds: the same answer once max_tokens covers it; with less, the model's own
    tokens up to where closing began, then only the closing."""
    fmt = schema_format(SCHEMAS["nested"])
    least = await minimum_tokens(stub, chat(response_format=fmt))
    own = await asyncio.gather(*(stub.CreateChatCompletion(chat(response_format=fmt, seed=seed, max_tokens=1000,
                                                                logprobs=True)) for seed in SEEDS))
    compared = 0
    for seed, reply in zip(SEEDS, own, strict=True):
        tokens = [t.token for t in reply.choices[0].logprobs.content]
        if reply.choices[0].finish_reason != FR.FINISH_REASON_STOP or len(tokens) < least + 12:
            continue
        whole, cut = await asyncio.gather(
            stub.CreateChatCompletion(chat(response_format=fmt, seed=seed, max_tokens=len(tokens) + 1)),
            stub.CreateChatCompletion(chat(response_format=fmt, seed=seed, max_tokens=len(tokens) - 8,
                                           logprobs=True)))
        assert whole.choices[0].message.content == reply.choices[0].message.content
        assert whole.choices[0].finish_reason == FR.FINISH_REASON_STOP
        closed = [t.token for t in cut.choices[0].logprobs.content]
        same = next((i for i, (a, b) in enumerate(zip(tokens, closed, strict=False)) if a != b), len(closed))
        assert same >= len(closed) - least - 4, "the budget steered only at the end"
        assert cut.choices[0].finish_reason == FR.FINISH_REASON_LENGTH
        jsonschema.validate(json.loads(cut.choices[0].message.content), SCHEMAS["nested"])
        compared += 1
    assert compared >= 3


async def test_max_tokens_below_the_shortest_document_names_max_tokens(stub: chat_pb2_grpc.ChatServiceStub,
                                                                       server: Any) -> None:
    fmt = schema_format(UNBOUNDED)
    least = await minimum_tokens(stub, chat(response_format=fmt))
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.CreateChatCompletion(chat(response_format=fmt, max_tokens=least - 1))
    assert field_violations(e.value) == ["max_tokens"] and f"{least} tokens" in e.value.details()
    body = {"model": "demo", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": least - 1,
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": UNBOUNDED}}}
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.config.server.http_port}", timeout=60) as c:
        r = await c.post("/v1/chat/completions", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens", r.text
        newer = {**body, "max_completion_tokens": body.pop("max_tokens")}  # OpenAI's newer name is named back
        r = await c.post("/v1/chat/completions", json=newer)
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_completion_tokens", r.text
        body["max_tokens"] = least
        r = await c.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    jsonschema.validate(json.loads(r.json()["choices"][0]["message"]["content"]), UNBOUNDED)


async def test_grammar_ends_the_answer_despite_ignore_eos(stub: chat_pb2_grpc.ChatServiceStub) -> None:
    schema = SCHEMAS["arrays_and_enums"]
    replies = await asyncio.gather(*(stub.CreateChatCompletion(
        chat(response_format=schema_format(schema), seed=seed, max_tokens=160, ignore_eos=True))
        for seed in range(5)))
    for r in replies:
        assert r.choices[0].finish_reason == FR.FINISH_REASON_STOP
        jsonschema.validate(json.loads(r.choices[0].message.content), schema)


async def test_n_choices_each_follow_the_schema(stub: chat_pb2_grpc.ChatServiceStub) -> None:
    schema = SCHEMAS["nested"]
    reply = await stub.CreateChatCompletion(chat(response_format=schema_format(schema), n=4, seed=1,
                                                 max_tokens=160))
    assert len(reply.choices) == 4
    for c in reply.choices:
        jsonschema.validate(json.loads(c.message.content), schema)


BAD_SCHEMAS = [
    {"type": "strnig"},                                                        # not a JSON schema
    {"type": "object", "required": "name"},                                    # not a JSON schema
    {"$schema": 5, "type": "object"},                                          # not a JSON schema
    {"type": "string", "pattern": "("},                                        # a broken regex
    {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}},      # a dangling reference
    {"type": "integer", "minimum": 5, "maximum": 1},                           # an empty range
    {"type": "array", "items": {"type": "integer"}, "uniqueItems": True},      # not enforceable while decoding
    {"type": "string", "pattern": "^a+$", "maxLength": 3},                     # xgrammar drops the length
    {"allOf": [{"type": "integer"}, {"minimum": 2}]},                          # xgrammar drops such an allOf
]


@pytest.mark.parametrize("schema", BAD_SCHEMAS, ids=lambda s: json.dumps(s)[:40])
async def test_bad_schema_is_invalid_argument_naming_the_field(stub: chat_pb2_grpc.ChatServiceStub,
                                                               schema: dict[str, Any]) -> None:
    for rpc in (stub.CreateChatCompletion, lambda r: stub.StreamChatCompletion(r).read()):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await rpc(chat(response_format=schema_format(schema), max_tokens=8))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field_violations(e.value) == [FIELD], e.value.details()


async def test_bad_schema_is_a_400_naming_the_param(server: Any) -> None:
    body = {"model": "demo", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8,
            "response_format": {"type": "json_schema",
                                "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "("}}}}
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.config.server.http_port}", timeout=60) as c:
        r = await c.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == FIELD and "regex" in r.json()["error"]["message"]


async def test_rest_json_schema_answers_validate(server: Any) -> None:
    schema = SCHEMAS["nested"]
    bodies = [{"model": "demo", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 160, "seed": seed,
               "response_format": {"type": "json_schema",
                                   "json_schema": {"name": "person", "schema": schema, "strict": True}}}
              for seed in range(5)]
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.config.server.http_port}", timeout=60) as c:
        replies = await asyncio.gather(*(c.post("/v1/chat/completions", json=b) for b in bodies))
    for r in replies:
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "stop"
        jsonschema.validate(json.loads(choice["message"]["content"]), schema)


def test_a_schema_is_compiled_once(engines_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(engines_dir / "demo" / "checkpoint")
    cache = grammar.GrammarCache(tokenizer, len(tokenizer), {tokenizer.eos_token_id})
    text = json.dumps(SCHEMAS["nested"])
    first = cache.get(GuidedDecoding(json_schema=text))
    assert cache.get(GuidedDecoding(json_schema=text)) is first  # an equal request, not the same object
    assert cache.compiles == 1
    cache.get(GuidedDecoding(json_object=True))
    assert cache.compiles == 2


def test_compiled_grammars_are_evicted_least_recently_used_first(monkeypatch: pytest.MonkeyPatch,
                                                                   engines_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(engines_dir / "demo" / "checkpoint")
    cache = grammar.GrammarCache(tokenizer, len(tokenizer), {tokenizer.eos_token_id})
    guides = [GuidedDecoding(json_schema=json.dumps(SCHEMAS[name])) for name in sorted(SCHEMAS)]
    measuring = grammar.GrammarCache(tokenizer, len(tokenizer), {tokenizer.eos_token_id})
    sizes = [measuring.get(g).memory_size_bytes for g in guides]
    # Room for guides[0] with either of the others, never for all three, whatever sizes this xgrammar gives them.
    monkeypatch.setattr(grammar, "COMPILE_CACHE_BYTES", sizes[0] + max(sizes[1], sizes[2]))
    cache.get(guides[0])
    cache.get(guides[1])
    assert cache.compiles == 2
    cache.get(guides[0])                      # a hit, and now the most recently used
    cache.get(guides[2])                      # over the budget: guides[1] goes
    assert cache.compiles == 3
    cache.get(guides[0])
    assert cache.compiles == 3
    cache.get(guides[1])
    assert cache.compiles == 4


def test_eos_is_allowed_only_where_the_document_may_end(engines_dir: Path) -> None:
    from service.backends.reference.guided import Guides
    from service.backends.vocab import token_byte_table

    tokenizer = AutoTokenizer.from_pretrained(engines_dir / "demo" / "checkpoint")
    eos = tokenizer.eos_token_id
    guides = Guides(tokenizer, len(tokenizer), {eos}, token_byte_table(tokenizer), torch.device("cpu"))
    guided = GuidedDecoding(json_schema=json.dumps(
        {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}))
    processor = guides.processor(guided, guides.grammars.get(guided), budget=100)
    newline = tokenizer.convert_tokens_to_ids(tokenizer.tokenize("\n"))[0]
    for token in tokenizer.encode('{"ok": true}', add_special_tokens=False):
        logits = torch.zeros(len(tokenizer))
        processor.apply(logits)
        assert logits[eos] == float("-inf") and logits[newline] == float("-inf") and logits[token] == 0
        assert not processor.accept(token)
    logits = torch.zeros(len(tokenizer))
    processor.apply(logits)
    assert torch.isfinite(logits).nonzero().flatten().tolist() == [eos]
    assert processor.accept(eos)
