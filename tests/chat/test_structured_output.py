"""response_format json_object and json_schema: whatever the (random) demo model wants, the answer parses and
validates, over 20 seeds, unary and streamed, through gRPC and the REST shim; bad schemas name their field."""

from __future__ import annotations

import asyncio
import json
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


async def test_json_object_answers_are_objects(stub: chat_pb2_grpc.ChatServiceStub) -> None:
    """Any object: its strings are unbounded, so a random model may run out of max_tokens inside one
    (finish_reason length, the JSON cut short, as OpenAI documents); every answer that ends is an object."""
    fmt = chat_pb2.ResponseFormat(type="json_object")
    reqs = [chat("JSON please", response_format=fmt, seed=seed, max_tokens=64) for seed in SEEDS]
    unary, streams = await asyncio.gather(
        asyncio.gather(*(stub.CreateChatCompletion(r) for r in reqs)),
        asyncio.gather(*(streamed(stub, r) for r in reqs)))
    answers = [(r.choices[0].message.content, r.choices[0].finish_reason) for r in unary] + list(streams)
    ended = [text for text, finish in answers if finish == FR.FINISH_REASON_STOP]
    assert len(ended) >= len(answers) // 4, answers
    for text in ended:
        assert isinstance(json.loads(text), dict), text
    for text, finish in answers:
        assert finish in (FR.FINISH_REASON_STOP, FR.FINISH_REASON_LENGTH) and text.startswith("{"), text


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
    processor = guides.processor(GuidedDecoding(json_schema=json.dumps(
        {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]})))
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
