"""structured_outputs (vLLM's extension): a regex, a choice or an EBNF grammar, enforced by xgrammar over 20 seeds
of the random demo model, unary and streamed, gRPC and REST; regex and choice outputs end valid within any
max_tokens; a bad regex or grammar, or not exactly one form, names its field."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import grpc
import httpx
import pytest

from service.gen.llmserve.v1 import chat_pb2, chat_pb2_grpc
from tests.helpers import chat, field_violations

FR = chat_pb2.FinishReason
SEEDS = range(20)
REGEX = r"[a-z]{2,8}@[a-z]{2,6}\.(com|org|net)"
CHOICES = ["positive", "negative", "neutral"]
GRAMMAR = 'root ::= item ("," item)*\nitem ::= [a-z]+ | "(" [0-9]+ ")"'
GRAMMAR_REGEX = r"([a-z]+|\([0-9]+\))(,([a-z]+|\([0-9]+\)))*"


def outputs(**given: Any) -> chat_pb2.StructuredOutputs:
    out = chat_pb2.StructuredOutputs(**{k: v for k, v in given.items() if k != "choice"})
    out.choice.extend(given.get("choice", []))
    return out


async def answers(stub: chat_pb2_grpc.ChatServiceStub,
                  reqs: list[chat_pb2.ChatCompletionRequest]) -> list[tuple[str, int]]:
    """Each request unary, then streamed: (text, finish_reason), the streamed deltas concatenated."""
    async def streamed(req: chat_pb2.ChatCompletionRequest) -> tuple[str, int]:
        text, finish = [], FR.FINISH_REASON_UNSPECIFIED
        async for chunk in stub.StreamChatCompletion(req):
            for c in chunk.choices:
                text.append(c.delta.content)
                finish = c.finish_reason or finish
        return "".join(text), finish

    unary, streams = await asyncio.gather(asyncio.gather(*(stub.CreateChatCompletion(r) for r in reqs)),
                                          asyncio.gather(*(streamed(r) for r in reqs)))
    return [(r.choices[0].message.content, r.choices[0].finish_reason) for r in unary] + list(streams)


async def test_regex_outputs_match_whatever_max_tokens(stub: chat_pb2_grpc.ChatServiceStub) -> None:
    reqs = [chat("An address?", structured_outputs=outputs(regex=REGEX), seed=seed, max_tokens=8 + 2 * seed)
            for seed in SEEDS]
    got = await answers(stub, reqs)
    for text, finish in got:
        assert re.fullmatch(REGEX, text) and finish in (FR.FINISH_REASON_STOP, FR.FINISH_REASON_LENGTH), text
    assert len({text for text, _ in got}) > 1


async def test_choice_outputs_are_one_of_the_choices(stub: chat_pb2_grpc.ChatServiceStub) -> None:
    got = await answers(stub, [chat("Sentiment?", structured_outputs=outputs(choice=CHOICES), seed=seed,
                                    max_tokens=32) for seed in SEEDS])
    assert all(text in CHOICES and finish == FR.FINISH_REASON_STOP for text, finish in got), got
    assert len({text for text, _ in got}) > 1
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.CreateChatCompletion(chat(structured_outputs=outputs(choice=CHOICES), max_tokens=0))
    assert field_violations(e.value) == ["max_tokens"]


async def test_grammar_outputs_follow_the_grammar(stub: chat_pb2_grpc.ChatServiceStub) -> None:
    """A grammar is enforced but not closed within max_tokens (documented): answers that end match it whole."""
    got = await answers(stub, [chat("A list?", structured_outputs=outputs(grammar=GRAMMAR), seed=seed,
                                    max_tokens=64) for seed in SEEDS])
    ended = [text for text, finish in got if finish == FR.FINISH_REASON_STOP]
    assert ended and all(re.fullmatch(GRAMMAR_REGEX, text) for text in ended), got
    assert all(re.match(r"[a-z(]", text) for text, _ in got)


@pytest.mark.parametrize(("given", "fields", "field"), [
    ({"regex": "(ab"}, {}, "structured_outputs.regex"),
    ({"regex": "(?=a)b"}, {}, "structured_outputs.regex"),
    ({"grammar": 'root ::= "a" | missing'}, {}, "structured_outputs.grammar"),
    ({"grammar": 'start ::= "a"'}, {}, "structured_outputs.grammar"),
    ({}, {}, "structured_outputs"),
    ({"regex": "a", "grammar": 'root ::= "a"'}, {}, "structured_outputs"),
    ({"choice": ["a", ""]}, {}, "structured_outputs.choice[1]"),
    ({"regex": "a"}, {"response_format": chat_pb2.ResponseFormat(type="json_object")}, "structured_outputs"),
], ids=["unbalanced", "lookahead", "undefined-rule", "no-root", "none", "two", "empty-choice", "with-json"])
async def test_bad_structured_outputs_name_the_field(stub: chat_pb2_grpc.ChatServiceStub, given: dict[str, Any],
                                                     fields: dict[str, Any], field: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.CreateChatCompletion(chat(structured_outputs=outputs(**given), max_tokens=8, **fields))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(e.value) == [field], e.value.details()


async def test_rest_takes_vllms_structured_outputs(server: Any) -> None:
    base = {"model": "demo", "messages": [{"role": "user", "content": "Sentiment?"}], "max_tokens": 16}
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.config.server.http_port}", timeout=60) as c:
        replies = await asyncio.gather(*(c.post("/v1/chat/completions", json={
            **base, "seed": seed, "structured_outputs": {"choice": CHOICES}}) for seed in range(5)))
        bad = await c.post("/v1/chat/completions", json={**base, "structured_outputs": {"regex": "(ab"}})
    for r in replies:
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] in CHOICES, r.text
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "structured_outputs.regex", bad.text
