"""What llmserve needs of a worker, in one shape whatever protocol it speaks; one module per kind implements it.

A kind maps a GenerationRequest onto its proto's GenerateRequest (every field
is mapped, or named in `refused` so that validation turns it down before a
request gets here), reads its stream back into Outputs (the new token ids of
a choice, their logprobs, the worker's finish reason), and answers the
management calls (health, loads, model info, the tokenizer bundle). The three
protos differ in small ways that matter (which message repeats which tokens,
whether a count is a delta or a total); each kind's reader hides them.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import grpc
from smg_grpc_proto.generated import common_pb2

from service.backends.base import GenerationRequest, GuidedDecoding
from service.backends.grammar import grammar_text, schema_text
from service.backends.workers.address import WorkerAddress

# Worker finish reasons that end a choice as asked. Any other ("abort", "error", TensorRT-LLM's "cancelled" or
# "timeout") is the worker giving up on a choice llmserve did not abort: the call fails as UNAVAILABLE.
STOP_REASONS = frozenset({"stop", "stop_word"})
LENGTH_REASONS = frozenset({"length"})


BAN_BIAS = -100.0   # the strongest logit bias vLLM's OpenAI API allows: a token so biased is never sampled


@dataclass(frozen=True, slots=True)
class WorkerRequest:
    """A GenerationRequest as one worker call sends it."""

    request: GenerationRequest
    request_id: str                      # the worker's: unique per attempt, so an Abort names one call
    n: int                               # choices asked of the worker
    stop_token_ids: tuple[int, ...]      # end-of-turn tokens (none when the request ignores EOS)
    banned_token_ids: tuple[int, ...]    # never to be sampled (raw control characters in a JSON document)
    vocab_size: int                      # the worker's (GetModelInfo), for a dense bias


@dataclass(frozen=True, slots=True)
class TokenLogprobs:
    logprob: float
    alternatives: list[tuple[int, float]]   # (token id, logprob), in the worker's order


@dataclass(frozen=True, slots=True)
class Output:
    """New tokens of one choice, as one stream message carried them."""

    index: int
    token_ids: list[int]
    logprobs: list[TokenLogprobs] | None = None
    finish: str | None = None      # the worker's finish reason, on the choice's last message


@dataclass(frozen=True, slots=True)
class ModelInfo:
    context_length: int            # prompt and output together
    vocab_size: int
    eos_token_ids: frozenset[int]  # empty where the protocol does not say (TensorRT-LLM)
    served_name: str


@dataclass(frozen=True, slots=True)
class Load:
    """A worker's own account of its work (GetLoads), summed over its data-parallel ranks."""

    running: int
    waiting: int
    kv_usage: float    # 0..1


class StreamReader(abc.ABC):
    """One Generate call's responses -> Outputs. Stateful: a kind's final message may repeat tokens."""

    @abc.abstractmethod
    def outputs(self, response: Any) -> list[Output]: ...


class WorkerClient(abc.ABC):
    """One worker: its stub on a channel, and the mapping of requests and answers for its kind."""

    kind: ClassVar[str]
    # Contract fields this kind cannot honour, with why; validation refuses them by name (service/chat/validation.py).
    refused: ClassVar[dict[str, str]] = {}
    has_loads: ClassVar[bool] = True

    def __init__(self, address: WorkerAddress, channel: grpc.aio.Channel) -> None:
        self.address = address
        self.channel = channel

    @abc.abstractmethod
    def generate(self, request: WorkerRequest) -> grpc.aio.UnaryStreamCall:
        """Starts a streaming Generate."""

    @abc.abstractmethod
    def reader(self, logprobs: bool) -> StreamReader:
        """A reader for one call's responses; `logprobs`: whether the request asked for them."""

    @abc.abstractmethod
    async def abort(self, request_id: str, timeout: float) -> None: ...

    @abc.abstractmethod
    async def health(self, timeout: float) -> tuple[bool, str]:
        """Whether the worker can generate, and its own words for it."""

    async def loads(self, timeout: float) -> Load | None:
        """None for a kind without GetLoads (TensorRT-LLM)."""
        return None

    @abc.abstractmethod
    async def model_info(self, timeout: float) -> ModelInfo: ...

    async def tokenizer_bundle(self, timeout: float) -> list[common_pb2.GetTokenizerChunk]:
        """The worker's tokenizer files as GetTokenizer streams them (service/backends/workers/tokenizer.py reads
        them); the stub's GetTokenizer is the same common.proto RPC for every kind that has one."""
        call = self.stub.GetTokenizer(common_pb2.GetTokenizerRequest(), timeout=timeout)  # type: ignore[attr-defined]
        return [chunk async for chunk in call]


def constraint(guided: GuidedDecoding, choice: bool) -> tuple[str, str | tuple[str, ...]]:
    """The one form a worker is sent for `guided`: ("json_schema", schema text), ("regex", pattern), ("choice",
    strings) where the kind takes a choice as it is (`choice`), else ("grammar", xgrammar EBNF): an EBNF grammar,
    a choice written as one, or a schema between tags (a Hermes-style forced call). json_object goes as the schema
    {"type": "object"}, as the reference engine compiles it (a JSON-object form would admit a top-level array)."""
    schema = schema_text(guided)
    if schema is not None:
        return "json_schema", schema
    if guided.regex is not None:
        return "regex", guided.regex
    if choice and guided.choice is not None:
        return "choice", guided.choice
    grammar = grammar_text(guided)
    assert grammar is not None, guided
    return "grammar", grammar


def logit_bias(w: WorkerRequest) -> dict[int, float]:
    """The request's own logit_bias with the banned tokens at BAN_BIAS over it: a ban is never lifted."""
    bias = dict(w.request.sampling.logit_bias)
    bias.update(dict.fromkeys(w.banned_token_ids, BAN_BIAS))
    return bias


def scheduler_load(loads: Iterable[Any]) -> Load:
    """vLLM's and SGLang's GetLoads: one SchedulerLoad per data-parallel rank."""
    loads = list(loads)
    running = sum(x.num_running_reqs for x in loads)
    waiting = sum(x.num_waiting_reqs for x in loads)
    usage = sum(x.token_usage for x in loads) / len(loads) if loads else 0.0
    return Load(running, waiting, usage)


def top_logprobs_wanted(request: GenerationRequest) -> int:
    """How many alternatives to ask a worker whose list starts with the sampled token (vLLM, TensorRT-LLM): one
    more than the contract's k when sampling, so the k best are in it even when the sampled token is not one of
    them (greedy samples the best, so k is enough)."""
    k = request.sampling.top_logprobs
    return k + 1 if k and request.sampling.temperature > 0 else k
