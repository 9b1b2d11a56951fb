"""vLLM's gRPC worker (`vllm.grpc.engine.VllmEngine`, smg-grpc-proto's vllm_engine.proto).

What the worker does, observed on vLLM 0.32 with smg-grpc-servicer 0.14:
it returns token ids only, end-of-sequence and stop-string tokens included;
with `stream` set, a choice's last chunk is followed by a `complete` that
repeats that chunk's tokens (so tokens are taken from chunks, and from a
`complete` only when no chunk came for its choice); `n > 1` is refused under
greedy sampling (the engine sends those as one choice, see engine.py); the
seed is an int32; the alternatives of `logprobs = k` are the sampled token
followed by the best ones, so k + 1 are asked when sampling
(protocol.top_logprobs_wanted).
"""

from __future__ import annotations

from typing import Any

import grpc
from smg_grpc_proto import vllm_engine_pb2 as pb
from smg_grpc_proto import vllm_engine_pb2_grpc as pb_grpc

from service.backends.workers.address import WorkerAddress
from service.backends.workers.protocol import (
    Load,
    ModelInfo,
    Output,
    StreamReader,
    TokenLogprobs,
    WorkerClient,
    WorkerRequest,
    constraint,
    logit_bias,
    scheduler_load,
    top_logprobs_wanted,
)

INT32_MAX = 2**31 - 1


def worker_seed(seed: int) -> int:
    """The contract's seeds run to 2**63 - 1, vLLM's to 2**31 - 1: larger ones are folded, so a seed still
    always gives the same tokens (two large seeds may then give the same tokens too)."""
    return seed if seed <= INT32_MAX else (seed ^ (seed >> 31)) & INT32_MAX


def generate_request(w: WorkerRequest) -> pb.GenerateRequest:
    request, s = w.request, w.request.sampling
    params = pb.SamplingParams(
        temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, min_p=s.min_p,
        frequency_penalty=s.frequency_penalty, presence_penalty=s.presence_penalty,
        repetition_penalty=s.repetition_penalty, max_tokens=s.max_tokens, stop=list(s.stop),
        ignore_eos=s.ignore_eos, n=w.n, stop_token_ids=w.stop_token_ids,
        logit_bias=logit_bias(w),
    )
    if s.seed is not None:
        params.seed = worker_seed(s.seed)
    if s.logprobs:
        params.logprobs = top_logprobs_wanted(request)
    if request.guided is not None:
        form, value = constraint(request.guided, choice=True)
        if form == "choice":
            params.choice.choices.extend(value)
        else:
            setattr(params, form, value)
    return pb.GenerateRequest(request_id=w.request_id, stream=True, sampling_params=params,
                              tokenized=pb.TokenizedInput(input_ids=request.prompt_token_ids))


def output_logprobs(lp: Any, count: int) -> list[TokenLogprobs]:
    """vLLM's and SGLang's OutputLogProbs: parallel lists, one entry per token."""
    tops = list(lp.top_logprobs)
    return [TokenLogprobs(lp.token_logprobs[i],
                          list(zip(tops[i].token_ids, tops[i].values, strict=False)) if i < len(tops) else [])
            for i in range(min(count, len(lp.token_logprobs)))]


class DeltaReader(StreamReader):
    """vLLM's and SGLang's streams: chunks carry new tokens per `index`; a `complete` repeats the last chunk."""

    def __init__(self, logprobs: bool) -> None:
        self._logprobs = logprobs
        self._chunked: set[int] = set()

    def outputs(self, response: Any) -> list[Output]:
        if response.HasField("chunk"):
            c = response.chunk
            self._chunked.add(c.index)
            ids = list(c.token_ids)
            return [Output(c.index, ids, output_logprobs(c.output_logprobs, len(ids)) if self._logprobs else None)]
        if response.HasField("complete"):
            c = response.complete
            ids = [] if c.index in self._chunked else list(c.output_ids)
            logprobs = output_logprobs(c.output_logprobs, len(ids)) if self._logprobs and ids else None
            return [Output(c.index, ids, logprobs, c.finish_reason or "stop")]
        return []


class VllmClient(WorkerClient):
    kind = "vllm"

    def __init__(self, address: WorkerAddress, channel: grpc.aio.Channel) -> None:
        super().__init__(address, channel)
        self.stub = pb_grpc.VllmEngineStub(channel)

    def generate(self, request: WorkerRequest) -> grpc.aio.UnaryStreamCall:
        return self.stub.Generate(generate_request(request))

    def reader(self, logprobs: bool) -> StreamReader:
        return DeltaReader(logprobs)

    async def abort(self, request_id: str, timeout: float) -> None:
        await self.stub.Abort(pb.AbortRequest(request_ids=[request_id]), timeout=timeout)

    async def health(self, timeout: float) -> tuple[bool, str]:
        reply = await self.stub.HealthCheck(pb.HealthCheckRequest(), timeout=timeout)
        return reply.healthy, reply.message

    async def loads(self, timeout: float) -> Load | None:
        return scheduler_load((await self.stub.GetLoads(pb.GetLoadsRequest(), timeout=timeout)).loads)

    async def model_info(self, timeout: float) -> ModelInfo:
        info = await self.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=timeout)
        return ModelInfo(info.max_context_length, info.vocab_size, frozenset(info.eos_token_ids),
                         info.served_model_name)
