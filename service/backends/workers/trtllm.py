"""TensorRT-LLM's gRPC worker (`trtllm.TrtllmService`, smg-grpc-proto's trtllm_service.proto).

As its servicer (tensorrt_llm/grpc) answers: `max_tokens` must always be
sent; greedy is `top_k = 1` with no temperature (the LLM API's own reading of
greedy); without a seed every request would get the runtime's default one, so
a random seed is drawn; a stream's chunks carry new tokens per
`sequence_index` and its `complete` carries all of them (cumulative, also when
streaming); the alternatives of `logprobs = k` are every entry of the
runtime's dict, the sampled token among them; an empty `guide` is dropped
silently, so json_object goes as the schema {"type": "object"}. There is no
GetLoads (routing counts llmserve's own requests), GetModelInfo has no EOS ids
(they come from the model folder's generation_config.json) and GetTokenizer is
not implemented (a trtllm model needs a model folder with its tokenizer).
"""

from __future__ import annotations

import random
from typing import Any

import grpc
from smg_grpc_proto import trtllm_service_pb2 as pb
from smg_grpc_proto import trtllm_service_pb2_grpc as pb_grpc

from service.backends.workers.address import WorkerAddress
from service.backends.workers.protocol import (
    ModelInfo,
    Output,
    StreamReader,
    TokenLogprobs,
    WorkerClient,
    WorkerRequest,
    constraint,
)

_GUIDE = pb.GuidedDecodingParams
_GUIDE_TYPES = {"json_schema": _GUIDE.GUIDE_TYPE_JSON_SCHEMA, "regex": _GUIDE.GUIDE_TYPE_REGEX,
                "grammar": _GUIDE.GUIDE_TYPE_EBNF_GRAMMAR}


def generate_request(w: WorkerRequest) -> pb.GenerateRequest:
    request, s = w.request, w.request.sampling
    sampling = pb.SamplingConfig(
        beam_width=1, num_return_sequences=w.n, repetition_penalty=s.repetition_penalty,
        presence_penalty=s.presence_penalty, frequency_penalty=s.frequency_penalty,
        seed=s.seed if s.seed is not None else random.getrandbits(63),
    )
    if s.temperature == 0:
        sampling.top_k = 1
    else:
        sampling.temperature, sampling.top_p, sampling.top_k = s.temperature, s.top_p, s.top_k
        if s.min_p > 0:
            sampling.min_p = s.min_p
    out = pb.GenerateRequest(
        request_id=w.request_id, tokenized=pb.TokenizedInput(input_token_ids=request.prompt_token_ids),
        sampling_config=sampling, max_tokens=s.max_tokens, streaming=True, stop=list(s.stop),
        ignore_eos=s.ignore_eos, stop_token_ids=w.stop_token_ids, bad_token_ids=w.banned_token_ids,
        # Stop strings are also matched here, on the text; trimmed by the runtime, their tokens would be lost.
        include_stop_token_in_output=True,
    )
    if s.logprobs:
        out.output_config.logprobs = max(1, s.top_logprobs)
    if s.logit_bias:   # the runtime adds embedding_bias to the logits, as the reference engine adds logit_bias
        bias = [0.0] * w.vocab_size
        for token, value in s.logit_bias:
            bias[token] = value
        out.embedding_bias.extend(bias)
    if request.guided is not None:
        form, guide = constraint(request.guided, choice=False)
        assert isinstance(guide, str)
        out.guided_decoding.CopyFrom(_GUIDE(guide_type=_GUIDE_TYPES[form], guide=guide))
    return out


def _logprobs(entries: Any) -> list[TokenLogprobs]:
    return [TokenLogprobs(e.logprob, [(t.token_id, t.logprob) for t in e.top_logprobs]) for e in entries]


class CumulativeReader(StreamReader):
    """Chunks carry new tokens per sequence_index; the complete carries all of a choice's tokens."""

    def __init__(self, logprobs: bool) -> None:
        self._logprobs = logprobs
        self._delivered: dict[int, int] = {}

    def outputs(self, response: Any) -> list[Output]:
        if response.HasField("chunk"):
            c = response.chunk
            ids = list(c.token_ids)
            self._delivered[c.sequence_index] = self._delivered.get(c.sequence_index, 0) + len(ids)
            return [Output(c.sequence_index, ids, _logprobs(c.logprobs) if self._logprobs else None)]
        if response.HasField("complete"):
            c = response.complete
            start = self._delivered.get(c.sequence_index, 0)
            ids = list(c.output_token_ids[start:])
            logprobs = _logprobs(c.logprobs[start:]) if self._logprobs else None
            return [Output(c.sequence_index, ids, logprobs, c.finish_reason or "error")]
        return []


class TrtllmClient(WorkerClient):
    kind = "trtllm"
    has_loads = False

    def __init__(self, address: WorkerAddress, channel: grpc.aio.Channel) -> None:
        super().__init__(address, channel)
        self.stub = pb_grpc.TrtllmServiceStub(channel)

    def generate(self, request: WorkerRequest) -> grpc.aio.UnaryStreamCall:
        return self.stub.Generate(generate_request(request))

    def reader(self, logprobs: bool) -> StreamReader:
        return CumulativeReader(logprobs)

    async def abort(self, request_id: str, timeout: float) -> None:
        await self.stub.Abort(pb.AbortRequest(request_id=request_id), timeout=timeout)

    async def health(self, timeout: float) -> tuple[bool, str]:
        status = (await self.stub.HealthCheck(pb.HealthCheckRequest(), timeout=timeout)).status
        return status == "OK", status

    async def model_info(self, timeout: float) -> ModelInfo:
        info = await self.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=timeout)
        return ModelInfo(info.max_seq_len or info.max_input_len, info.vocab_size, frozenset(), info.model_id)
