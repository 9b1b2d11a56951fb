"""TensorRT-LLM behind the Engine interface, through its LLM API.

TensorRT-LLM does the batching (in-flight), the KV cache and sampling; this
module only chooses the profile, maps each request onto `SamplingParams`, and
turns the runtime's cumulative outputs into the interface's events. Names follow
TensorRT-LLM 1.x's sources (tensorrt_llm/sampling_params.py, llmapi/llm.py,
executor/result.py; read at 1.0-era commits, the v1.2.0 tag was not readable here):
`generate_async(prompt_token_ids, sampling_params=...,
streaming=True)` returns a GenerationResult iterated with `async for`, whose
`.outputs[i]` are CompletionOutputs (`index`, `token_ids`, `logprobs`,
`finish_reason`), and `abort()` cancels it.

Detokenization and stop strings are done here, with the reference engine's
byte-exact incremental detokenizer, so both engines stream the same text. The
runtime still gets the stop strings, to stop early where they tokenize as
expected, but with `include_stop_str_in_output=True`: trimming them there would
drop tokens whose text was already held back here.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoTokenizer

from service.backends.base import (
    Engine,
    EngineError,
    EngineHealth,
    EngineStats,
    Event,
    FinishReason,
    GenerationRequest,
    GuidedDecoding,
    InvalidRequest,
    ProfileInfo,
    QueueFull,
    TokenLogprob,
)
from service.backends.choices import Choices
from service.backends.grammar import grammar_text, schema_text
from service.backends.vocab import eos_token_ids, special_token_ids, token_byte_table
from service.config import EngineConfig, TrtllmConfig
from service.repository.gpus import detect_gpus
from service.repository.manifest import ModelManifest
from service.repository.profiles import Profile, installed_trtllm_version, load_profiles, profile_by_id, select_profile

log = logging.getLogger("llmserve.engine.trtllm")

_FINISH_REASONS = {"stop": FinishReason.STOP, "length": FinishReason.LENGTH, "cancelled": FinishReason.CANCELLED,
                  "timeout": FinishReason.DEADLINE}
PYTORCH_MODEL_LINK = "model"


@dataclass(frozen=True, slots=True)
class Runtime:
    """A loaded TensorRT-LLM LLM and the parameter classes of the same release."""

    llm: Any
    sampling_params: Callable[..., Any]
    guided_decoding_params: Callable[..., Any]


def create_runtime(profile: Profile, manifest: ModelManifest, config: TrtllmConfig) -> Runtime:
    """Loads the profile: an engine folder through `_tensorrt_engine.LLM` (1.2's TensorRT flow), or the
    checkpoint through `tensorrt_llm.LLM` (the PyTorch backend, 1.3 and later)."""
    # The LLM API refuses n > 1 under greedy sampling unless this is set; the contract allows it.
    os.environ.setdefault("TLLM_ALLOW_N_GREEDY_DECODING", "1")
    try:
        import tensorrt_llm
        from tensorrt_llm.llmapi import GuidedDecodingParams, KvCacheConfig
    except ImportError as e:
        raise EngineError(f"model {manifest.name!r} needs TensorRT-LLM ({e})", fatal=True) from None
    common: dict[str, Any] = {
        "tokenizer": str(manifest.checkpoint),
        "tensor_parallel_size": profile.tensor_parallel_size,
        "kv_cache_config": KvCacheConfig(free_gpu_memory_fraction=config.trt_kv_cache_fraction,
                                         enable_block_reuse=config.trt_block_reuse),
        "max_batch_size": min(config.trt_max_batch_size, profile.max_batch_size),
        "max_num_tokens": min(config.trt_max_num_tokens, profile.max_num_tokens),
        "max_input_len": profile.max_seq_len,   # the LLM API's default is 1024; the server checks the context
        "enable_chunked_prefill": config.trt_chunked_prefill,
        "guided_decoding_backend": "xgrammar",
    }
    if profile.runtime == "tensorrt":
        from tensorrt_llm._tensorrt_engine import LLM

        llm = LLM(model=str(profile.path), gather_generation_logits=True, **common)   # logprobs, as built
    else:
        dtype = {"bf16": "bfloat16", "fp16": "float16"}.get(profile.precision, "auto")
        llm = tensorrt_llm.LLM(model=str(profile.path / PYTORCH_MODEL_LINK), backend="pytorch", dtype=dtype,
                               **common)
    return Runtime(llm, tensorrt_llm.SamplingParams, GuidedDecodingParams)


# -- request mapping (pure) ------------------------------------------------------------------------------------


def sampling_kwargs(request: GenerationRequest, random_seed: Callable[[], int], eos_ids: set[int],
                    vocab_size: int) -> dict[str, Any]:
    """SamplingParams keyword arguments for a request (each a field in tests/fixtures/trtllm-sampling-params.txt)."""
    s = request.sampling
    kwargs: dict[str, Any] = {
        "max_tokens": s.max_tokens,
        "n": request.n,
        "best_of": request.n,   # above n the API re-sorts choices by cumulative logprob; the contract keeps order
        "presence_penalty": s.presence_penalty,
        "frequency_penalty": s.frequency_penalty,
        "repetition_penalty": s.repetition_penalty,
        # The runtime's default seed is 0 for every request: "no seed" must still differ between requests.
        "seed": s.seed if s.seed is not None else random_seed(),
        "ignore_eos": s.ignore_eos,
        "detokenize": False,    # text is made here, byte-exact and with stop strings held back
        "include_stop_str_in_output": True,
    }
    if s.stop:
        kwargs["stop"] = list(s.stop)
    if eos_ids and not s.ignore_eos:
        kwargs["stop_token_ids"] = sorted(eos_ids)
    if s.temperature == 0:
        # The LLM API's greedy decoding is top_k 1 with top_p unset (SamplingParams._greedy_decoding); the runtime
        # accepts only temperatures above 0, so none is sent.
        kwargs["top_k"] = 1
    else:
        kwargs.update(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k)   # top_k 0: all tokens, as here
        if s.min_p > 0:
            kwargs["min_p"] = s.min_p
    if s.logprobs:
        kwargs["logprobs"] = max(1, s.top_logprobs)
    if s.logit_bias:  # the runtime adds embedding_bias to the logits, as the reference engine adds logit_bias
        bias = torch.zeros(vocab_size, dtype=torch.float32)
        bias[torch.tensor([t for t, _ in s.logit_bias])] = torch.tensor([b for _, b in s.logit_bias])
        kwargs["embedding_bias"] = bias
    return kwargs


def guided_kwargs(guided: GuidedDecoding | None) -> dict[str, Any] | None:
    """GuidedDecodingParams keyword arguments: `json` takes the schema's text, `regex` the regex, `grammar`
    xgrammar EBNF (a choice, and a schema between tags, a Hermes-style forced call, go as EBNF).

    json_object goes as the schema {"type": "object"}, as the reference engine compiles it:
    `json_object=True` is xgrammar's built-in JSON grammar, which also admits a top-level array.
    The runtime does not close outputs within max_tokens (it cannot be told how): see
    docs/tools-and-structured-output.md."""
    if guided is None:
        return None
    schema = schema_text(guided)
    if schema is not None:
        return {"json": schema}
    if guided.regex is not None:
        return {"regex": guided.regex}
    grammar = grammar_text(guided)
    return {"grammar": grammar} if grammar is not None else None


def _logprob_value(entry: Any) -> float:
    return float(getattr(entry, "logprob", entry))


class ChoiceStreams(Choices):
    """TensorRT-LLM's cumulative CompletionOutputs in, the interface's events out."""

    def events(self, outputs: list[Any]) -> list[Event]:
        events: list[Event] = []
        for out in outputs:
            i = out.index
            if not self.open(i):
                continue
            start = self.seen(i)
            new = list(out.token_ids[start:])
            reason = _FINISH_REASONS.get(out.finish_reason or "")
            if out.finish_reason and reason is None:
                raise EngineError(f"TensorRT-LLM finished choice {i} with unknown reason {out.finish_reason!r}")
            logprobs = None
            if self._request.sampling.logprobs:
                entries = list(out.logprobs or [])[start:start + len(new)]
                logprobs = [self._token_logprob(t, e) for t, e in zip(new, entries, strict=False)]
            events += self.advance(i, new, reason, logprobs)
        return events

    def _token_logprob(self, token_id: int, entry: Any) -> TokenLogprob:
        """One position of CompletionOutput.logprobs: a {token_id: Logprob(logprob, rank)} dict, or a bare float."""
        if not isinstance(entry, dict):
            return self.logprob(token_id, _logprob_value(entry), [])
        chosen = entry.get(token_id)
        ranked = sorted(entry.items(), key=lambda kv: (getattr(kv[1], "rank", None) or 0, -_logprob_value(kv[1])))
        return self.logprob(token_id, _logprob_value(chosen) if chosen is not None else float("-inf"),
                            [(t, _logprob_value(v)) for t, v in ranked])


# -- the engine ------------------------------------------------------------------------------------------------

_DEADLINE = object()
_CANCELLED = object()


class TrtllmEngine(Engine):
    def __init__(self, manifest: ModelManifest, engine_config: EngineConfig, trtllm_config: TrtllmConfig) -> None:
        self._manifest = manifest
        self._engine_config = engine_config
        self._config = trtllm_config
        self.tokenizer: Any = AutoTokenizer.from_pretrained(manifest.checkpoint)
        self._table = token_byte_table(self.tokenizer)
        self._eos = eos_token_ids(manifest.checkpoint, self.tokenizer)
        self._special = special_token_ids(self.tokenizer)
        self._runtime: Runtime | None = None
        self._profile: Profile | None = None
        self._cancels: dict[str, asyncio.Event] = {}
        self._health = EngineHealth(False, "not started")

    @property
    def profile(self) -> ProfileInfo:
        assert self._profile is not None, "start() first"
        p = self._profile
        return ProfileInfo(p.id, p.gpu_architecture, p.precision, p.tensor_parallel_size)

    async def start(self) -> None:
        profiles = load_profiles(self._manifest.profiles or self._manifest.root / "profiles")
        if self._config.trt_profile:
            profile = profile_by_id(self._manifest.name, profiles, self._config.trt_profile)
        else:
            profile = select_profile(self._manifest.name, profiles, detect_gpus(), installed_trtllm_version())
        log.info("loading TensorRT-LLM profile", extra={"model": self._manifest.name, "profile": profile.id})
        self._runtime = await asyncio.to_thread(create_runtime, profile, self._manifest, self._config)
        self._profile = profile
        self._health = EngineHealth(True)

    def _waiting(self) -> int:
        """Requests beyond the runtime's batch: they wait inside TensorRT-LLM's scheduler."""
        return max(0, len(self._cancels) - self._max_batch())

    def _max_batch(self) -> int:
        built = self._profile.max_batch_size if self._profile else self._config.trt_max_batch_size
        return min(self._config.trt_max_batch_size, built)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Event]:
        if not self._health.ok or self._runtime is None:
            raise EngineError(f"engine unavailable: {self._health.detail}", fatal=True)
        waiting = self._waiting()
        if waiting >= self._engine_config.max_queue:
            raise QueueFull(f"{waiting} requests are already waiting (--max-queue {self._engine_config.max_queue})")
        if request.n > self._max_batch():
            raise InvalidRequest("n", f"{request.n} choices are decoded together, and this engine decodes at most "
                                      f"{self._max_batch()} sequences at once (--trt-max-batch-size)")
        runtime = self._runtime
        kwargs = sampling_kwargs(request, lambda: random.getrandbits(63), self._eos, len(self._table))
        guided = guided_kwargs(request.guided)
        try:
            if guided is not None:
                kwargs["guided_decoding"] = runtime.guided_decoding_params(**guided)
            params = runtime.sampling_params(**kwargs)
        except ValueError as e:   # the release's own validation of the combination
            raise InvalidRequest("sampling", str(e)) from None
        submitted = time.monotonic()
        try:
            result = runtime.llm.generate_async(list(request.prompt_token_ids), sampling_params=params,
                                                streaming=True)
        except ValueError as e:   # the runtime's argument checks, e.g. a prompt longer than the engine's max_seq_len
            raise InvalidRequest("messages", str(e)) from None
        except RuntimeError as e:  # "LLM is shutting down"
            raise EngineError(f"TensorRT-LLM refused request {request.request_id}: {e}") from None
        if request.request_id in self._cancels:
            request.request_id = f"{request.request_id}-{id(request):x}"
        cancelled = asyncio.Event()
        self._cancels[request.request_id] = cancelled
        streams = ChoiceStreams(request, self._table, self._eos, self._special)
        outputs = aiter(result)
        first = True
        try:
            while not streams.done:
                output = await self._next(outputs, request.deadline, cancelled)
                if output is _CANCELLED and not self._health.ok:
                    raise EngineError("the engine shut down")
                if output is _DEADLINE or output is _CANCELLED:
                    result.abort()
                    for event in streams.finish_all(
                            FinishReason.DEADLINE if output is _DEADLINE else FinishReason.CANCELLED):
                        yield event
                    break
                if output is None:
                    raise EngineError(f"TensorRT-LLM ended request {request.request_id} before every choice finished")
                if first:
                    streams.queue_time, first = time.monotonic() - submitted, False
                for event in streams.events(output.outputs):
                    yield event
        except EngineError:
            raise
        except Exception as e:   # the runtime's RequestError and the like: this request failed, not the engine
            raise EngineError(f"TensorRT-LLM failed request {request.request_id}: {type(e).__name__}: {e}") from e
        finally:
            del self._cancels[request.request_id]
            if not getattr(result, "finished", False):
                result.abort()

    @staticmethod
    async def _next(outputs: AsyncIterator[Any], deadline: float | None, cancelled: asyncio.Event) -> Any:
        """The next output, or None at the end, _CANCELLED once aborted, _DEADLINE once the deadline passed."""
        step = asyncio.ensure_future(anext(outputs, None))
        stop = asyncio.ensure_future(cancelled.wait())
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            done, _ = await asyncio.wait({step, stop}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:   # also when the caller itself is cancelled: no task is left waiting on the runtime
            stop.cancel()
            if not step.done():
                step.cancel()
        if step in done:
            return step.result()
        return _CANCELLED if stop in done else _DEADLINE

    async def abort(self, request_id: str) -> None:
        cancelled = self._cancels.get(request_id)
        if cancelled is not None:
            cancelled.set()

    def stats(self) -> EngineStats:
        """Counted here: the LLM API's per-iteration stats cost a round trip to the executor per call."""
        inflight = len(self._cancels)
        return EngineStats(min(inflight, self._max_batch()), self._waiting(), 0, 0)

    def health(self) -> EngineHealth:
        return self._health

    async def shutdown(self) -> None:
        self._health = EngineHealth(False, "shutting down")
        for cancelled in self._cancels.values():
            cancelled.set()
        if self._runtime is not None:
            await asyncio.to_thread(self._runtime.llm.shutdown)
        self._health = EngineHealth(False, "shut down")
