"""The load generator's clients: one streaming chat request in, one RequestRecord out.

Every OpenAI-compatible server (llmserve's REST shim, vLLM, transformers serve)
is driven by the same httpx SSE client, so their figures differ only by the
server; llmserve's gRPC API by a grpc.aio stub. Each asks for exactly
`output_len` tokens past end-of-sequence, at temperature 1 with a seed: the
contract's and vLLM's `ignore_eos`, or, for transformers serve, which has no
such field, a generation config with min_new_tokens = max_new_tokens.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
import httpx

from service.gen.llmserve.v1 import chat_pb2, chat_pb2_grpc
from service.loadgen.metrics import RequestRecord
from service.loadgen.workload import Messages

KINDS = ("grpc", "openai", "hf")


@dataclass(frozen=True)
class Target:
    """A server to measure. kind: grpc (llmserve), openai (llmserve REST, vLLM), hf (transformers serve)."""

    label: str
    kind: str
    url: str
    model: str = "demo"
    api_key: str = ""
    extra_body: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, spec: str, model: str, api_key: str = "") -> Target:
        """`[LABEL=][KIND+]URL`: grpc://host:port, http://host:port/v1 (openai), hf+http://host:port/v1."""
        label, _, url = spec.rpartition("=")
        kind, plus, rest = url.partition("+")
        if not plus:
            kind, rest = ("grpc" if url.startswith("grpc://") else "openai"), url
        if kind not in KINDS:
            raise ValueError(f"target {spec!r}: kind {kind!r} is not one of {', '.join(KINDS)}")
        return cls(label=label or kind, kind=kind, url=rest, model=model, api_key=api_key)


class Client(Protocol):
    async def send(self, messages: Messages, seed: int, record: RequestRecord) -> None: ...

    async def close(self) -> None: ...


class OpenAIClient:
    """POST /chat/completions with stream=true, reading the SSE lines as they arrive."""

    def __init__(self, target: Target, output_len: int, max_connections: int, timeout: float) -> None:
        self.target, self.output_len = target, output_len
        headers = {"Authorization": f"Bearer {target.api_key}"} if target.api_key else {}
        self._http = httpx.AsyncClient(
            base_url=target.url.rstrip("/"), headers=headers, timeout=httpx.Timeout(timeout),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections))

    def body(self, messages: Messages, seed: int) -> dict[str, Any]:
        body: dict[str, Any] = {"messages": messages, "stream": True, "max_tokens": self.output_len,
                                "temperature": 1.0, "seed": seed}
        if self.target.kind == "hf":
            # The server pins its one model, and reports usage on its last chunk unasked.
            body["generation_config"] = json.dumps({"max_new_tokens": self.output_len,
                                                    "min_new_tokens": self.output_len,
                                                    "do_sample": True, "temperature": 1.0})
        else:
            body.update(model=self.target.model, ignore_eos=True, stream_options={"include_usage": True})
        body.update(self.target.extra_body)
        return body

    async def send(self, messages: Messages, seed: int, record: RequestRecord) -> None:
        body = self.body(messages, seed)
        record.start = time.perf_counter()
        try:
            async with self._http.stream("POST", "/chat/completions", json=body) as reply:
                if reply.status_code != 200:
                    text = (await reply.aread()).decode(errors="replace")
                    record.error = f"HTTP {reply.status_code}: {text[:200]}"
                    return
                async for line in reply.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    now = time.perf_counter()
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    self._read_chunk(json.loads(data), now, record)
        except httpx.HTTPError as e:
            record.error = f"{type(e).__name__}: {e}"
        finally:
            record.end = time.perf_counter()
            if not record.usage_reported:
                record.output_tokens = len(record.chunk_times)

    @staticmethod
    def _read_chunk(chunk: dict[str, Any], now: float, record: RequestRecord) -> None:
        if "error" in chunk:
            record.error = str(chunk["error"])[:200]
            return
        choices = chunk.get("choices")
        if choices and (choices[0].get("delta") or {}).get("content"):
            record.chunk_times.append(now)
        usage = chunk.get("usage")
        if usage:
            record.prompt_tokens = usage.get("prompt_tokens", 0)
            record.output_tokens = usage.get("completion_tokens", 0)
            record.usage_reported = True

    async def close(self) -> None:
        await self._http.aclose()


class GrpcClient:
    """StreamChatCompletion over one shared HTTP/2 channel, as a real client would."""

    def __init__(self, target: Target, output_len: int, timeout: float) -> None:
        self.target, self.output_len, self.timeout = target, output_len, timeout
        self._channel = grpc.aio.insecure_channel(target.url.removeprefix("grpc://"))
        self._stub = chat_pb2_grpc.ChatServiceStub(self._channel)
        self._metadata = (("authorization", f"Bearer {target.api_key}"),) if target.api_key else None

    def request(self, messages: Messages, seed: int) -> chat_pb2.ChatCompletionRequest:
        return chat_pb2.ChatCompletionRequest(
            model=self.target.model, messages=[chat_pb2.ChatMessage(**m) for m in messages],
            max_tokens=self.output_len, temperature=1.0, seed=seed, ignore_eos=True,
            stream_options=chat_pb2.StreamOptions(include_usage=True))

    async def send(self, messages: Messages, seed: int, record: RequestRecord) -> None:
        request = self.request(messages, seed)
        record.start = time.perf_counter()
        try:
            async for chunk in self._stub.StreamChatCompletion(request, timeout=self.timeout,
                                                               metadata=self._metadata):
                now = time.perf_counter()
                if chunk.choices and chunk.choices[0].delta.content:
                    record.chunk_times.append(now)
                if chunk.HasField("usage"):
                    record.prompt_tokens = chunk.usage.prompt_tokens
                    record.output_tokens = chunk.usage.completion_tokens
                    record.usage_reported = True
        except grpc.aio.AioRpcError as e:
            record.error = f"{e.code().name}: {e.details()}"
        finally:
            record.end = time.perf_counter()
            if not record.usage_reported:
                record.output_tokens = len(record.chunk_times)

    async def close(self) -> None:
        await self._channel.close()


def make_client(target: Target, output_len: int, max_connections: int, timeout: float) -> Client:
    if target.kind == "grpc":
        return GrpcClient(target, output_len, timeout)
    return OpenAIClient(target, output_len, max_connections, timeout)
