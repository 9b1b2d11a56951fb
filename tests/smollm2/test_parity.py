"""llmserve computes what transformers computes, on a real trained model (SmolLM2-135M-Instruct).

For varied chats, the greedy answer (temperature 0, 48 tokens) over gRPC and REST, unary and streamed,
is transformers' `generate(do_sample=False)` on the same checkpoint and the same rendered prompt: token
for token (compared by the tokens' bytes in the logprobs), with the same finish reason and token
counts, and the logprob of every token within 1e-3 of transformers' log_softmax. A seeded sampled
request gives the same text alone and among 16 concurrent mixed requests.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerBase
from transformers.convert_slow_tokenizer import bytes_to_unicode

from service.gen.llmserve.v1 import chat_pb2, chat_pb2_grpc
from tests.helpers import SMOLLM2 as NAME
from tests.helpers import sse_events

MAX_TOKENS = 48
CHATS: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a pirate. Answer in one sentence."},
     {"role": "user", "content": "What do you think of the sea?"}],
    [{"role": "user", "content": "Write a haiku about autumn leaves."}],
    [{"role": "user", "content": "What is 12 + 30? Then list three prime numbers above 100."}],
    [{"role": "user", "content": "My name is Ada."}, {"role": "assistant", "content": "Nice to meet you, Ada!"},
     {"role": "user", "content": "What is my name?"}],
    [{"role": "user", "content": "Write a Python function that reverses a string."}],
]
_BYTE = {c: b for b, c in bytes_to_unicode().items()}
FINISH = {"stop": chat_pb2.FINISH_REASON_STOP, "length": chat_pb2.FINISH_REASON_LENGTH}


@dataclass
class Answer:
    """One way of asking, reduced to what must agree."""

    text: str
    token_bytes: list[bytes]
    logprobs: list[float]
    finish_reason: int
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Reference:
    prompt_ids: list[int]
    token_bytes: list[bytes]
    logprobs: list[float]
    finish_reason: int


def reference(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> Reference:
    """transformers' greedy answer, and the log_softmax of each of its tokens from one forward pass over it all."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.inference_mode():
        full = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=MAX_TOKENS,
                              do_sample=False, pad_token_id=tokenizer.pad_token_id)[0]
        logits = model(full[None]).logits[0, prompt.shape[1] - 1:-1]
    generated = full[prompt.shape[1]:].tolist()
    logprobs = torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(generated)[:, None])[:, 0].tolist()
    special = set(tokenizer.all_special_ids)
    token_bytes = [tokenizer.convert_ids_to_tokens(t).encode() if t in special
                   else bytes(_BYTE[c] for c in tokenizer.convert_ids_to_tokens(t)) for t in generated]
    stopped = generated[-1] == tokenizer.eos_token_id
    return Reference(prompt[0].tolist(), token_bytes, logprobs, FINISH["stop" if stopped else "length"])


def grpc_request(messages: list[dict[str, str]]) -> chat_pb2.ChatCompletionRequest:
    return chat_pb2.ChatCompletionRequest(
        model=NAME, messages=[chat_pb2.ChatMessage(**m) for m in messages], temperature=0, max_tokens=MAX_TOKENS,
        logprobs=True, stream_options=chat_pb2.StreamOptions(include_usage=True))


async def grpc_unary(stub: chat_pb2_grpc.ChatServiceStub, messages: list[dict[str, str]]) -> Answer:
    reply = await stub.CreateChatCompletion(grpc_request(messages))
    choice = reply.choices[0]
    return Answer(choice.message.content, [bytes(e.bytes) for e in choice.logprobs.content],
                  [e.logprob for e in choice.logprobs.content], choice.finish_reason, reply.usage.prompt_tokens,
                  reply.usage.completion_tokens)


async def grpc_stream(stub: chat_pb2_grpc.ChatServiceStub, messages: list[dict[str, str]]) -> Answer:
    text, entries, finish, usage = [], [], 0, None
    async for chunk in stub.StreamChatCompletion(grpc_request(messages)):
        for choice in chunk.choices:
            text.append(choice.delta.content)
            entries += choice.logprobs.content
            finish = choice.finish_reason or finish
        if chunk.HasField("usage"):
            usage = chunk.usage
    assert usage is not None
    return Answer("".join(text), [bytes(e.bytes) for e in entries], [e.logprob for e in entries], finish,
                  usage.prompt_tokens, usage.completion_tokens)


def _rest_body(messages: list[dict[str, str]], stream: bool) -> dict[str, Any]:
    body = {"model": NAME, "messages": messages, "temperature": 0, "max_tokens": MAX_TOKENS, "logprobs": True}
    return body | ({"stream": True, "stream_options": {"include_usage": True}} if stream else {})


async def rest_unary(http: httpx.AsyncClient, messages: list[dict[str, str]]) -> Answer:
    reply = (await http.post("/v1/chat/completions", json=_rest_body(messages, False))).raise_for_status().json()
    choice, entries = reply["choices"][0], reply["choices"][0]["logprobs"]["content"]
    return Answer(choice["message"]["content"], [bytes(e["bytes"]) for e in entries], [e["logprob"] for e in entries],
                  FINISH[choice["finish_reason"]], reply["usage"]["prompt_tokens"], reply["usage"]["completion_tokens"])


async def rest_stream(http: httpx.AsyncClient, messages: list[dict[str, str]]) -> Answer:
    reply = await http.post("/v1/chat/completions", json=_rest_body(messages, True))
    events = [e for e in sse_events(reply.raise_for_status().content) if e != "[DONE]"]
    choices = [c for e in events for c in e["choices"]]
    entries = [entry for c in choices if c.get("logprobs") for entry in c["logprobs"]["content"]]
    finish = next(c["finish_reason"] for c in choices if c["finish_reason"])
    usage = events[-1]["usage"]
    return Answer("".join(c["delta"].get("content") or "" for c in choices), [bytes(e["bytes"]) for e in entries],
                  [e["logprob"] for e in entries], FINISH[finish], usage["prompt_tokens"], usage["completion_tokens"])


@pytest.fixture(scope="module")
def references(hf_model: LlamaForCausalLM, hf_tokenizer: PreTrainedTokenizerBase) -> list[Reference]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two threads on this shared two-core machine are slower than one
    try:
        return [reference(hf_model, hf_tokenizer, messages) for messages in CHATS]
    finally:
        torch.set_num_threads(threads)


async def test_greedy_answers_are_transformers_answers_over_grpc_and_rest(
        smollm2: chat_pb2_grpc.ChatServiceStub, smollm2_http: httpx.AsyncClient, references: list[Reference]) -> None:
    asked = await asyncio.gather(*(way(client, messages) for messages in CHATS
                                   for way, client in ((grpc_unary, smollm2), (grpc_stream, smollm2),
                                                       (rest_unary, smollm2_http), (rest_stream, smollm2_http))))
    stops = 0
    for i, expected in enumerate(references):
        tokenized = await smollm2.Tokenize(chat_pb2.TokenizeRequest(
            model=NAME, messages=[chat_pb2.ChatMessage(**m) for m in CHATS[i]]))
        assert list(tokenized.tokens) == expected.prompt_ids, f"chat {i}: not the prompt transformers renders"
        answers = asked[4 * i:4 * i + 4]
        for answer in answers:
            where = f"chat {i} {json.dumps(CHATS[i][-1]['content'])}"
            assert answer.token_bytes == expected.token_bytes, f"{where}: {answer.text!r}"
            assert answer.finish_reason == expected.finish_reason, where
            assert (answer.prompt_tokens, answer.completion_tokens) == (len(expected.prompt_ids),
                                                                        len(expected.token_bytes)), where
            assert max(abs(a - b) for a, b in zip(answer.logprobs, expected.logprobs, strict=True)) < 1e-3, where
            assert answer.text == answers[0].text  # streamed text is the unary text, on both front doors
        stops += expected.finish_reason == chat_pb2.FINISH_REASON_STOP
    assert 0 < stops < len(CHATS), "the chats should end both ways: at the end-of-turn token and at max_tokens"
    assert "Paris" in asked[0].text


async def test_a_seeded_sample_is_the_same_alone_and_among_16_concurrent_requests(
        smollm2: chat_pb2_grpc.ChatServiceStub) -> None:
    target = chat_pb2.ChatCompletionRequest(
        model=NAME, messages=[chat_pb2.ChatMessage(role="user", content="Tell me a short story about a robot.")],
        temperature=0.9, top_p=0.95, seed=1234, max_tokens=40)
    alone = (await smollm2.CreateChatCompletion(target)).choices[0].message.content

    def other(i: int) -> chat_pb2.ChatCompletionRequest:
        req = chat_pb2.ChatCompletionRequest(model=NAME, max_tokens=8 + 7 * i, messages=[chat_pb2.ChatMessage(
            role="user", content=f"Say something about the number {i}." + " Please." * i)])
        if i % 3 == 0:
            req.temperature = 0
        else:
            req.temperature, req.seed, req.top_k = 0.7 + 0.05 * i, i, 20 + i
        if i % 4 == 1:
            req.n = 2
        return req

    async def streamed(req: chat_pb2.ChatCompletionRequest, started: asyncio.Event) -> None:
        async for _ in smollm2.StreamChatCompletion(req):
            started.set()

    started = asyncio.Event()
    first = [asyncio.create_task(streamed(other(i), started)) for i in range(8)]
    await asyncio.wait_for(started.wait(), 120)  # the target joins a batch already decoding
    together, *_ = await asyncio.gather(smollm2.CreateChatCompletion(target),
                                        *(smollm2.CreateChatCompletion(other(i)) for i in range(8, 16)), *first)
    assert together.choices[0].message.content == alone
