"""Fakes of TensorRT-LLM's and SGLang's gRPC workers: real grpc.aio servers of smg-grpc-proto's trtllm_service.proto
and sglang_scheduler.proto, for the mappings that cannot meet the real engines here (no GPU, no SGLang build).

Each answers as its servicer does (read from tensorrt_llm/grpc/ and smg-grpc-servicer's sglang/, see
docs/workers.md): TensorRT-LLM's chunks carry new tokens per sequence_index with a cumulative completion count
and its `complete` carries all of a choice's tokens, its HealthCheck is a status string, it has no GetLoads and no
GetTokenizer, and an aborted request finishes "cancelled"; SGLang's chunks carry new tokens per index, its
`complete` repeats the last chunk, its top logprobs are the true top k, it serves its tokenizer as a zip and its
loads through GetLoads, and an aborted stream ends with INTERNAL "Request aborted". Both check what llmserve sends
(what the real servicers require, and what llmserve promises to send, e.g. a non-empty guide) and refuse anything
else with INTERNAL naming it, so a wrong mapping fails the test; every request is kept for the test to read.

The "model" emits a script of token ids per choice, one token a step (`step` seconds apart), up to max_tokens, and
stops at a stop token id (kept in the ids, as both workers do for end-of-sequence).
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
from smg_grpc_proto import sglang_scheduler_pb2 as sg
from smg_grpc_proto import sglang_scheduler_pb2_grpc as sg_grpc
from smg_grpc_proto import trtllm_service_pb2 as trt
from smg_grpc_proto import trtllm_service_pb2_grpc as trt_grpc
from smg_grpc_proto.generated import common_pb2

CHUNK = 64 * 1024   # GetTokenizer's chunk size


class FakeWorkerBase:
    """What both fakes share: the script, the requests seen, running requests and aborts, and a grpc.aio server."""

    def __init__(self, scripts: list[list[int]], vocab_size: int, context: int, step: float = 0.002) -> None:
        self.scripts = scripts
        self.vocab_size = vocab_size
        self.context = context
        self.step = step
        self.requests: list[Any] = []
        self.aborts: list[str] = []
        self.running: dict[str, asyncio.Event] = {}   # request id -> set when aborted
        self.fail_generate: grpc.StatusCode | None = None   # refuse Generate before any answer with this code
        self.server: grpc.aio.Server | None = None
        self.port = 0

    @property
    def address(self) -> str:
        return f"{self.kind}://127.0.0.1:{self.port}"

    async def start(self, port: int = 0) -> None:
        self.server = grpc.aio.server()
        self.add_to(self.server)
        self.port = self.server.add_insecure_port(f"127.0.0.1:{port}")
        await self.server.start()

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(0)

    def tokens(self, index: int, max_tokens: int, stop_ids: set[int]) -> list[int]:
        script = self.scripts[index % len(self.scripts)]
        out = []
        for t in script[:max_tokens]:
            out.append(t)
            if t in stop_ids:
                break
        return out

    @staticmethod
    async def refuse(context: grpc.aio.ServicerContext, problem: str) -> None:
        await context.abort(grpc.StatusCode.INTERNAL, f"fake worker: llmserve sent {problem}")

    @staticmethod
    def alternatives(token: int, k: int, vocab: int) -> list[tuple[int, float]]:
        """k alternatives, best first, that do not include the sampled token: the sampled token was unlikely."""
        return [((token + 1 + i) % vocab, -0.5 - i) for i in range(k)]


class FakeTrtllmWorker(FakeWorkerBase, trt_grpc.TrtllmServiceServicer):
    kind = "trtllm"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.status = "OK"

    def add_to(self, server: grpc.aio.Server) -> None:
        trt_grpc.add_TrtllmServiceServicer_to_server(self, server)

    async def check(self, r: trt.GenerateRequest, context: grpc.aio.ServicerContext) -> bool:
        s = r.sampling_config
        problems = [
            (not r.HasField("tokenized") or not r.tokenized.input_token_ids, "no tokenized input"),
            (r.max_tokens == 0, "no max_tokens (the servicer passes it as is: 0 generates nothing)"),
            (not r.streaming, "a non-streaming request"),
            (s.beam_width != 1 or s.num_return_sequences < 1, f"beam_width {s.beam_width}, n {s.num_return_sequences}"),
            (not s.HasField("seed"), "no seed (the runtime would give every request the same one)"),
            (not r.include_stop_token_in_output, "include_stop_token_in_output off (stop tokens would vanish)"),
            (r.HasField("guided_decoding") and not r.guided_decoding.guide, "an empty guide (silently dropped)"),
            (len(r.embedding_bias) not in (0, self.vocab_size), "an embedding_bias not of vocab_size floats"),
        ]
        for bad, problem in problems:
            if bad:
                await self.refuse(context, problem)
                return False
        return True

    async def Generate(self, request: trt.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[trt.GenerateResponse]:
        self.requests.append(request)
        if self.fail_generate is not None:
            await context.abort(self.fail_generate, "fake worker: refusing as told")
        if not await self.check(request, context):
            return
        aborted = self.running[request.request_id] = asyncio.Event()
        n, k = request.sampling_config.num_return_sequences, request.output_config.logprobs
        want_logprobs = request.output_config.HasField("logprobs")
        outs = [self.tokens(i, request.max_tokens, set(request.stop_token_ids)) for i in range(n)]
        prompt = len(request.tokenized.input_token_ids)

        def logprob(t: int) -> trt.TokenLogprob:
            tops = [trt.TopLogprob(token_id=a, logprob=lp) for a, lp in self.alternatives(t, k, self.vocab_size)]
            # The runtime's dict: the sampled token first, then the best ones.
            return trt.TokenLogprob(token_id=t, logprob=-3.0, top_logprobs=[trt.TopLogprob(token_id=t, logprob=-3.0),
                                                                            *tops])
        try:
            for step in range(max(map(len, outs))):
                if aborted.is_set():
                    break
                await asyncio.sleep(self.step)
                for i, out in enumerate(outs):
                    if step < len(out):
                        yield trt.GenerateResponse(request_id=request.request_id, chunk=trt.GenerateStreamChunk(
                            token_ids=[out[step]], sequence_index=i, prompt_tokens=prompt,
                            completion_tokens=step + 1, logprobs=[logprob(out[step])] if want_logprobs else []))
            for i, out in enumerate(outs):
                done = out if not aborted.is_set() else out[:0]
                reason = "cancelled" if aborted.is_set() else (
                    "stop" if out and out[-1] in set(request.stop_token_ids) else "length")
                complete = trt.GenerateComplete(output_token_ids=done, sequence_index=i, finish_reason=reason,
                                                prompt_tokens=prompt, completion_tokens=len(done),
                                                logprobs=[logprob(t) for t in done] if want_logprobs else [])
                yield trt.GenerateResponse(request_id=request.request_id, complete=complete)
        finally:
            del self.running[request.request_id]

    async def Abort(self, request: trt.AbortRequest, context: grpc.aio.ServicerContext) -> trt.AbortResponse:
        self.aborts.append(request.request_id)
        event = self.running.get(request.request_id)
        if event is None:
            return trt.AbortResponse(success=False, message=f"Request {request.request_id} not found")
        event.set()
        return trt.AbortResponse(success=True, message=f"Request {request.request_id} aborted")

    async def HealthCheck(self, request: trt.HealthCheckRequest,
                          context: grpc.aio.ServicerContext) -> trt.HealthCheckResponse:
        return trt.HealthCheckResponse(status=self.status)

    async def GetModelInfo(self, request: trt.GetModelInfoRequest,
                           context: grpc.aio.ServicerContext) -> trt.GetModelInfoResponse:
        return trt.GetModelInfoResponse(model_id="fake", max_input_len=self.context, max_seq_len=self.context,
                                        vocab_size=self.vocab_size)


class FakeSglangWorker(FakeWorkerBase, sg_grpc.SglangSchedulerServicer):
    kind = "sglang"

    def __init__(self, *args: Any, tokenizer_dir: Path | None = None, eos: tuple[int, ...] = (), **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.healthy = True
        self.extra_load = 0          # requests of other clients, as GetLoads reports them
        self.eos = eos
        self.tokenizer_dir = tokenizer_dir

    def add_to(self, server: grpc.aio.Server) -> None:
        sg_grpc.add_SglangSchedulerServicer_to_server(self, server)

    async def check(self, r: sg.GenerateRequest, context: grpc.aio.ServicerContext) -> bool:
        p = r.sampling_params
        problems = [
            (not r.HasField("tokenized") or not r.tokenized.input_ids, "no tokenized input"),
            (not r.stream, "a non-streaming request"),
            (r.logprob_start_len != -1, f"logprob_start_len {r.logprob_start_len} (0 asks for the prompt's)"),
            (not p.HasField("max_new_tokens"), "no max_new_tokens"),
            (not p.no_stop_trim, "no_stop_trim off (stop-string tokens would be trimmed from the ids)"),
            (p.n < 1, "n below 1"),
            (p.WhichOneof("constraint") is not None and not getattr(p, p.WhichOneof("constraint")),
             "an empty constraint"),
        ]
        for bad, problem in problems:
            if bad:
                await self.refuse(context, problem)
                return False
        return True

    async def Generate(self, request: sg.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[sg.GenerateResponse]:
        self.requests.append(request)
        if self.fail_generate is not None:
            await context.abort(self.fail_generate, "fake worker: refusing as told")
        if not await self.check(request, context):
            return
        aborted = self.running[request.request_id] = asyncio.Event()
        p = request.sampling_params
        outs = [self.tokens(i, p.max_new_tokens, set(p.stop_token_ids)) for i in range(p.n)]
        prompt = len(request.tokenized.input_ids)
        k = request.top_logprobs_num

        def logprobs(t: int) -> sg.OutputLogProbs:
            if not request.return_logprob:
                return sg.OutputLogProbs()
            alts = sorted([*self.alternatives(t, k, self.vocab_size), (t, -3.0)], key=lambda a: -a[1])[:k]
            return sg.OutputLogProbs(token_logprobs=[-3.0], token_ids=[t], top_logprobs=[
                sg.TopLogProbs(values=[lp for _, lp in alts], token_ids=[a for a, _ in alts])] if k else [])
        try:
            for step in range(max(map(len, outs))):
                await asyncio.sleep(self.step)
                if aborted.is_set():
                    await context.abort(grpc.StatusCode.INTERNAL, "Request aborted")
                for i, out in enumerate(outs):
                    if step >= len(out):
                        continue
                    chunk = sg.GenerateStreamChunk(token_ids=[out[step]], prompt_tokens=prompt,
                                                   completion_tokens=step + 1, output_logprobs=logprobs(out[step]),
                                                   index=i)
                    yield sg.GenerateResponse(request_id=request.request_id, chunk=chunk)
                    if step == len(out) - 1:   # finished: a complete built from the same output
                        reason = "stop" if out[-1] in set(p.stop_token_ids) else "length"
                        yield sg.GenerateResponse(request_id=request.request_id, complete=sg.GenerateComplete(
                            output_ids=[out[step]], finish_reason=reason, prompt_tokens=prompt,
                            completion_tokens=len(out), index=i))
        finally:
            del self.running[request.request_id]

    async def Abort(self, request: sg.AbortRequest, context: grpc.aio.ServicerContext) -> sg.AbortResponse:
        self.aborts.append(request.request_id)
        event = self.running.get(request.request_id)
        if event is not None:
            event.set()
        return sg.AbortResponse(success=True, message=f"Request {request.request_id} aborted")

    async def HealthCheck(self, request: sg.HealthCheckRequest,
                          context: grpc.aio.ServicerContext) -> sg.HealthCheckResponse:
        if not self.healthy:
            return sg.HealthCheckResponse(healthy=False, message="Health check probe failed")
        return sg.HealthCheckResponse(healthy=True, message="Health check passed")

    async def GetLoads(self, request: sg.GetLoadsRequest, context: grpc.aio.ServicerContext) -> sg.GetLoadsResponse:
        running = len(self.running) + self.extra_load
        return sg.GetLoadsResponse(version="fake", dp_rank_count=1, loads=[sg.SchedulerLoad(
            num_running_reqs=running, num_total_reqs=running, token_usage=0.25, max_running_requests=64)],
            aggregate=sg.AggregateMetrics(total_running_reqs=running, total_reqs=running))

    async def GetModelInfo(self, request: sg.GetModelInfoRequest,
                           context: grpc.aio.ServicerContext) -> sg.GetModelInfoResponse:
        return sg.GetModelInfoResponse(model_path="fake", served_model_name="fake", is_generation=True,
                                       max_context_length=self.context, vocab_size=self.vocab_size,
                                       eos_token_ids=list(self.eos), max_req_input_len=self.context)

    async def GetTokenizer(self, request: common_pb2.GetTokenizerRequest,
                           context: grpc.aio.ServicerContext) -> AsyncIterator[common_pb2.GetTokenizerChunk]:
        if self.tokenizer_dir is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no tokenizer path")
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            for path in sorted(self.tokenizer_dir.iterdir()):  # type: ignore[union-attr]
                if path.suffix == ".json":
                    archive.write(path, path.name)
        data = buffer.getvalue()
        digest = hashlib.sha256(data).hexdigest()
        for offset in range(0, len(data), CHUNK):
            end = min(offset + CHUNK, len(data))
            yield common_pb2.GetTokenizerChunk(data=data[offset:end], sha256=digest if end == len(data) else "")
