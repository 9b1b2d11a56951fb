"""Llama 3.1 answers by real ids, on demo-llama-3.1 (Meta's own tokenizer): each of the three end-of-turn ids ends a
choice without its text reaching the content, and with ignore_eos is generated but never text; a forced tool call's
tokens are the call Meta's ChatFormat reads, and its text comes back byte for byte in the next turn's prompt; the
Llama 3.1 JSON tool-call parser reads what Meta's ChatFormat.decode_assistant_message reads from the same tokens."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from service.backends.detokenizer import IncrementalDetokenizer
from service.backends.vocab import special_token_ids, token_byte_table
from service.chat.tools import Arguments, CallStart, Content, call_parser
from service.gen.llmserve.v1 import chat_pb2, chat_pb2_grpc
from service.models.template import LLAMA_JSON
from tests.chat import meta_oracle as meta
from tests.helpers import LLAMA31, struct

FR = chat_pb2.FinishReason
END_OF_TURN_BYTES = {b"<|eot_id|>": meta.EOT, b"<|eom_id|>": meta.EOM, b"<|end_of_text|>": meta.END_OF_TEXT}
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"]}
NAMES = ["get_weather", "book_table"]
SPECIAL_IDS_START = 128_000  # Meta's 256 special tokens follow the BPE tokens


@pytest.fixture(scope="module")
def table(llama31_engines_dir: Path) -> list[bytes]:
    return token_byte_table(AutoTokenizer.from_pretrained(llama31_engines_dir / LLAMA31 / "checkpoint"))


def token_ids(logprobs: chat_pb2.ChoiceLogprobs, table: list[bytes]) -> list[int]:
    """The generated ids, from each token's bytes (unique in Meta's vocabulary)."""
    by_bytes = {b: i for i, b in enumerate(table)}
    assert len(by_bytes) == len(table)
    return [by_bytes[bytes(entry.bytes)] for entry in logprobs.content]


def text_of(ids: list[int], table: list[bytes]) -> str:
    """What a client reads of these ids: special tokens add no text (skip_special_tokens, the default)."""
    return b"".join(table[i] for i in ids if i < SPECIAL_IDS_START).decode("utf-8", errors="replace")


def chat(**fields: Any) -> chat_pb2.ChatCompletionRequest:
    return chat_pb2.ChatCompletionRequest(model=LLAMA31, messages=[chat_pb2.ChatMessage(role="user", content="Hi")],
                                          logprobs=True, **fields)


async def test_each_end_of_turn_id_ends_a_choice_without_text(llama31_stub: chat_pb2_grpc.ChatServiceStub,
                                                             table: list[bytes]) -> None:
    ended_by: set[int] = set()
    replies = await asyncio.gather(*(llama31_stub.CreateChatCompletion(chat(n=4, seed=seed, max_tokens=400))
                                     for seed in range(6)))
    for reply in replies:
        for choice in reply.choices:
            ids = token_ids(choice.logprobs, table)
            assert choice.finish_reason == FR.FINISH_REASON_STOP and ids[-1] in meta.END_OF_TURN
            assert not meta.END_OF_TURN & set(ids[:-1])
            assert choice.message.content == text_of(ids, table), "the end of turn is not text"
            ended_by.add(ids[-1])
    assert ended_by == meta.END_OF_TURN
    streamed = [c.delta.content async for chunk in llama31_stub.StreamChatCompletion(chat(seed=0, max_tokens=400))
                for c in chunk.choices]
    assert "".join(streamed) == (await llama31_stub.CreateChatCompletion(chat(seed=0, max_tokens=400))
                                 ).choices[0].message.content


async def test_with_ignore_eos_end_of_turn_ids_are_generated_but_never_text(
        llama31_stub: chat_pb2_grpc.ChatServiceStub, table: list[bytes]) -> None:
    async def streamed(req: chat_pb2.ChatCompletionRequest) -> list[str]:
        texts = [""] * req.n
        async for chunk in llama31_stub.StreamChatCompletion(req):
            for c in chunk.choices:
                texts[c.index] += c.delta.content
        return texts

    generated: set[int] = set()
    reqs = [chat(n=4, seed=seed, max_tokens=80, ignore_eos=True) for seed in range(3)]
    replies, streams = await asyncio.gather(asyncio.gather(*map(llama31_stub.CreateChatCompletion, reqs)),
                                            asyncio.gather(*map(streamed, reqs)))
    for reply, texts in zip(replies, streams, strict=True):
        for choice in reply.choices:
            ids = token_ids(choice.logprobs, table)
            assert choice.finish_reason == FR.FINISH_REASON_LENGTH and len(ids) == 80
            generated |= meta.END_OF_TURN & set(ids)
            assert choice.message.content == texts[choice.index] == text_of(ids, table)
        assert reply.usage.completion_tokens == 4 * 80
    assert generated == meta.END_OF_TURN


async def test_a_forced_call_round_trips_through_metas_reader_and_the_next_prompt(
        llama31_stub: chat_pb2_grpc.ChatServiceStub, table: list[bytes]) -> None:
    tools = [chat_pb2.Tool(type="function", function=chat_pb2.FunctionDefinition(
        name="get_weather", description="Current weather", parameters=struct(WEATHER)))]
    for seed in range(3):
        question = chat_pb2.ChatMessage(role="user", content="Weather in Oslo?")
        reply = await llama31_stub.CreateChatCompletion(chat_pb2.ChatCompletionRequest(
            model=LLAMA31, messages=[question], tools=tools, logprobs=True, seed=seed, max_tokens=120,
            tool_choice=chat_pb2.ToolChoice(function=chat_pb2.NamedFunction(name="get_weather"))))
        choice = reply.choices[0]
        assert choice.finish_reason == FR.FINISH_REASON_TOOL_CALLS
        call = choice.message.tool_calls[0]
        ids = token_ids(choice.logprobs, table)
        assert ids[-1] in meta.END_OF_TURN
        ids = ids[:-1]
        text = meta.tokenizer().decode(ids)
        assert text == f'{{"name": "get_weather", "parameters": {call.function.arguments}}}'
        assert meta.reading(ids) == ("", [("get_weather", json.loads(call.function.arguments))])
        turn = [question, choice.message,
                chat_pb2.ChatMessage(role="tool", tool_call_id=call.id, content='{"temperature": 3}')]
        prompt = list((await llama31_stub.Tokenize(chat_pb2.TokenizeRequest(
            model=LLAMA31, messages=turn, tools=tools))).tokens)
        rendered = meta.tokenizer().decode(prompt)
        assert f"<|start_header_id|>assistant<|end_header_id|>\n\n{text}<|eot_id|>" in rendered
        assert prompt == meta.encode(rendered)


# --- the parser against Meta's reader, on hand-written answers ---------------------------------------------

CALL = '{"name": "get_weather", "parameters": {"city": "Paris"}}'
AGREED = {
    "prose": "The weather in Paris is sunny.",
    "a call": CALL,
    "after <|python_tag|>": f"<|python_tag|>{CALL}",
    "Meta's own encoding (type first)": '{"type": "function", "name": "get_weather", "parameters": {"city": "Paris"}}',
    "parameters before name, other keys": '{"parameters": {"city": "Paris"}, "id": 7, "name": "get_weather"}',
    "nested, braces and quotes in strings":
        '{"name": "book_table", "parameters": {"note": "a } \\" {", "dishes": ["x", "y"], "at": {"h": 19}}}',
    "newlines around": f"\n{CALL}\n",
    "prose, then a call": f"Let me check. {CALL}",
    "a call, then prose": f"{CALL} Done.",
    "two calls, ';'": f'{CALL}; {{"name": "get_weather", "parameters": {{"city": "Rome"}}}}',
    "two calls, two lines": f'{CALL}\n{{"name": "book_table", "parameters": {{}}}}',
    "a JSON answer": '{"answer": 42, "unit": "K"}',
    "a JSON array": "[1, 2, 3]",
    "a call cut short": '{"name": "get_weather", "parameters": {"city": "Pa',
    "nothing": "",
}
# Where llmserve reads otherwise, on purpose (docs/tools-and-structured-output.md): (Meta's reading, llmserve's).
DIFFERENT: dict[str, tuple[str, Any, Any]] = {
    "a tool not offered": ('{"name": "get_time", "parameters": {"zone": "CET"}}',
                           ("", [("get_time", {"zone": "CET"})]), "content"),
    "'arguments' for 'parameters'": ('{"name": "get_weather", "arguments": {"city": "Paris"}}',
                                     "raises KeyError", [("get_weather", {"city": "Paris"})]),
    "a JSON answer with a name": ('{"name": "Alice", "age": 3}', "raises KeyError", "content"),
    "parameters not an object": ('{"name": "get_weather", "parameters": "Paris"}',
                                 ("", [("get_weather", "Paris")]), "content"),
    "function tag": ('<function=get_weather>{"city": "Paris"}</function>',
                     ("", [("get_weather", {"city": "Paris"})]), "content"),
    "a Python list": ('[get_weather(city="Paris")]', ("", [("get_weather", {"city": "Paris"})]), "content"),
    "built-in tool": ('<|python_tag|>brave_search.call(query="weather in Paris")',
                      ("", [("brave_search", {"query": "weather in Paris"})]), "content"),
    "code interpreter": ("<|python_tag|>print(1 + 1)", ("", [("code_interpreter", {"code": "print(1 + 1)"})]),
                         "content"),
    "nesting deeper than Meta's ToolCall holds": ('{"name": "book_table", "parameters": {"dishes": [{"x": 1}]}}',
                                                  "raises ValidationError", [("book_table", {"dishes": [{"x": 1}]})]),
    "prose that mentions .call(query=...)": ('In Python you write search.call(query="cats") to search.',
                                             ("", [("search", {"query": "cats"})]), "content"),
}


def llmserve_reading(tokens: list[int], table: list[bytes], silent: frozenset[int],
                     whole: bool) -> tuple[str, list[tuple[str, Any]]]:
    """What llmserve makes of the answer's tokens: the shared detokenizer's text (the `silent` special tokens add
    none), fed to the parser token by token (as streamed) or at once (as answered)."""
    detokenizer, parser = IncrementalDetokenizer(table, (), silent), call_parser(NAMES, LLAMA_JSON)
    texts = [detokenizer.add(t)[0] for t in tokens] + [detokenizer.flush()]
    pieces = [p for text in (["".join(texts)] if whole else texts) for p in parser.feed(text)] + parser.finish()
    content = "".join(p.text for p in pieces if isinstance(p, Content))
    arguments = "".join(p.text for p in pieces if isinstance(p, Arguments))
    return content, [(p.name, json.loads(arguments)) for p in pieces if isinstance(p, CallStart)]


@pytest.fixture(scope="module", params=[True, False], ids=["skip_special_tokens", "with special tokens' text"])
def silent(request: pytest.FixtureRequest, llama31_engines_dir: Path) -> frozenset[int]:
    """Both ways a request may ask for the text: special tokens (<|python_tag|>) left out, or let through."""
    tokenizer = AutoTokenizer.from_pretrained(llama31_engines_dir / LLAMA31 / "checkpoint")
    return special_token_ids(tokenizer) if request.param else frozenset()


@pytest.mark.parametrize("name", AGREED)
def test_the_parser_reads_what_metas_reader_reads(table: list[bytes], silent: frozenset[int], name: str) -> None:
    tokens = meta.encode(AGREED[name])
    expected = meta.reading(tokens)
    if silent and isinstance(expected, tuple):  # then <|python_tag|> is not in the content either
        expected = (expected[0].replace("<|python_tag|>", ""), expected[1])
    assert llmserve_reading(tokens, table, silent, whole=False) == llmserve_reading(tokens, table, silent, whole=True) \
        == expected


@pytest.mark.parametrize("name", DIFFERENT)
def test_where_the_parser_reads_otherwise_on_purpose(table: list[bytes], silent: frozenset[int], name: str) -> None:
    text, metas, ours = DIFFERENT[name]
    tokens = meta.encode(text)
    assert meta.reading(tokens) == metas
    shown = text.replace("<|python_tag|>", "") if silent else text
    expected = (shown, []) if ours == "content" else ("", ours)
    assert llmserve_reading(tokens, table, silent, whole=False) == llmserve_reading(tokens, table, silent, whole=True) \
        == expected
