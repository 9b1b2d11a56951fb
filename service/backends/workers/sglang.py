"""SGLang's gRPC scheduler (`sglang.grpc.scheduler.SglangScheduler`, smg-grpc-proto's sglang_scheduler.proto).

As its servicer (smg-grpc-servicer's sglang/) answers: there is no seed field,
so a seed is refused by name; `temperature` has no presence (0 would be
greedy), so it is always sent; `logprob_start_len` 0 would ask for the
prompt's logprobs, so -1 is sent; `no_stop_trim` keeps a stop string's tokens
in the ids, since llmserve cuts the text itself; `n > 1` becomes sub-requests
inside the worker, and an Abort names only the parent, so the call is also
cancelled (engine.py always does both). Streams read like vLLM's: new tokens
per `index`, and a `complete` that repeats the last chunk.
"""

from __future__ import annotations

from typing import ClassVar

import grpc
from smg_grpc_proto import sglang_scheduler_pb2 as pb
from smg_grpc_proto import sglang_scheduler_pb2_grpc as pb_grpc

from service.backends.workers.address import WorkerAddress
from service.backends.workers.protocol import (
    Load,
    ModelInfo,
    StreamReader,
    WorkerClient,
    WorkerRequest,
    constraint,
    logit_bias,
    scheduler_load,
)
from service.backends.workers.vllm import DeltaReader


def generate_request(w: WorkerRequest) -> pb.GenerateRequest:
    request, s = w.request, w.request.sampling
    params = pb.SamplingParams(
        temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, min_p=s.min_p,
        frequency_penalty=s.frequency_penalty, presence_penalty=s.presence_penalty,
        repetition_penalty=s.repetition_penalty, max_new_tokens=s.max_tokens, stop=list(s.stop),
        ignore_eos=s.ignore_eos, n=w.n, no_stop_trim=True, stop_token_ids=w.stop_token_ids,
        logit_bias={str(t): b for t, b in logit_bias(w).items()},   # keys are token ids written as text
    )
    if request.guided is not None:
        form, value = constraint(request.guided, choice=False)
        setattr(params, "ebnf_grammar" if form == "grammar" else form, value)
    return pb.GenerateRequest(
        request_id=w.request_id, tokenized=pb.TokenizedInput(input_ids=request.prompt_token_ids),
        sampling_params=params, stream=True, logprob_start_len=-1,
        return_logprob=s.logprobs, top_logprobs_num=s.top_logprobs if s.logprobs else 0,
    )


class SglangClient(WorkerClient):
    kind = "sglang"
    refused: ClassVar[dict[str, str]] = {
        "seed": "sglang workers take no seed (sglang_scheduler.proto has no seed field)"}

    def __init__(self, address: WorkerAddress, channel: grpc.aio.Channel) -> None:
        super().__init__(address, channel)
        self.stub = pb_grpc.SglangSchedulerStub(channel)

    def generate(self, request: WorkerRequest) -> grpc.aio.UnaryStreamCall:
        return self.stub.Generate(generate_request(request))

    def reader(self, logprobs: bool) -> StreamReader:
        return DeltaReader(logprobs)

    async def abort(self, request_id: str, timeout: float) -> None:
        await self.stub.Abort(pb.AbortRequest(request_id=request_id, reason="cancelled by llmserve"),
                              timeout=timeout)

    async def health(self, timeout: float) -> tuple[bool, str]:
        reply = await self.stub.HealthCheck(pb.HealthCheckRequest(), timeout=timeout)
        return reply.healthy, reply.message

    async def loads(self, timeout: float) -> Load | None:
        reply = await self.stub.GetLoads(pb.GetLoadsRequest(include=["core"]), timeout=timeout)
        return scheduler_load(reply.loads)

    async def model_info(self, timeout: float) -> ModelInfo:
        info = await self.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=timeout)
        return ModelInfo(info.max_context_length, info.vocab_size, frozenset(info.eos_token_ids),
                         info.served_model_name)
