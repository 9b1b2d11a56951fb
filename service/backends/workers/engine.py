"""A model served by gRPC workers (TensorRT-LLM, vLLM or SGLang), behind the Engine interface.

The workers generate token ids; everything the contract promises beyond that
happens here, as for the in-process engine: the tokenizer and chat template
(the model folder's, or the worker's own from GetTokenizer), text by the
shared byte-exact detokenizer with stop strings and end-of-turn tokens
(service/backends/choices.py), usage, and n. A request goes to the worker the
router picks; one whose worker fails before answering is tried on the next;
one whose worker fails mid-stream ends its choices with ERROR, which the
call reports as UNAVAILABLE. n > 1 under greedy decoding, which vLLM refuses
and every worker would answer with n identical choices, is one choice given
to all n.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
from transformers import AutoTokenizer

from service.backends.base import (
    Engine,
    EngineError,
    EngineHealth,
    EngineStats,
    Event,
    FinishReason,
    GenerationRequest,
    InvalidRequest,
    ProfileInfo,
    QueueFull,
    Unavailable,
    WorkerStatus,
)
from service.backends.choices import Choices
from service.backends.grammar import json_banned_tokens, json_document
from service.backends.vocab import eos_token_ids, special_token_ids, token_byte_table
from service.backends.workers.address import WorkerAddress
from service.backends.workers.call import CANCELLED, DEADLINE, WorkerCall
from service.backends.workers.errors import INVALID, invalid_field, retryable
from service.backends.workers.health import Prober, describe_error
from service.backends.workers.kinds import CLIENTS
from service.backends.workers.protocol import LENGTH_REASONS, STOP_REASONS, ModelInfo, Output
from service.backends.workers.router import Router
from service.backends.workers.tokenizer import fetch_tokenizer
from service.backends.workers.worker import Worker, block_hashes
from service.config import WorkersConfig
from service.metrics import WORKER_ERRORS
from service.repository.manifest import ModelManifest

log = logging.getLogger("llmserve.workers")

_CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 32 * 1024 * 1024)]


@dataclasses.dataclass
class _Live:
    """A request in progress: its current worker call, and whether it was aborted (a retry's new call too)."""

    call: WorkerCall | None = None
    cancelled: bool = False


def _finish(reason: str | None) -> FinishReason | None:
    if reason is None:
        return None
    if reason in STOP_REASONS:
        return FinishReason.STOP
    return FinishReason.LENGTH if reason in LENGTH_REASONS else FinishReason.ERROR


class WorkerEngine(Engine):
    def __init__(self, name: str, addresses: list[WorkerAddress], manifest: ModelManifest | None,
                 config: WorkersConfig) -> None:
        kinds = sorted({a.kind for a in addresses})
        if len(kinds) != 1:
            raise ValueError(f"model {name!r}: its workers must be of one kind, got {', '.join(kinds) or 'none'}")
        self.name = name
        self.kind = kinds[0]
        self._addresses = addresses
        self._folder = manifest
        self._config = config
        self._client_class = CLIENTS[self.kind]
        self.manifest: ModelManifest | None = None   # the manifest it is served under, once started
        self.tokenizer: Any = None
        self._workers: list[Worker] = []
        self._router: Router | None = None
        self._info: ModelInfo | None = None
        self._table: list[bytes] = []
        self._eos: set[int] = set()
        self._special: frozenset[int] = frozenset()
        self._json_banned: tuple[int, ...] = ()
        self._live: dict[str, _Live] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._prober: Prober | None = None
        self._probing: asyncio.Task[None] | None = None
        self._tokenizer_dir: Path | None = None
        self._stopped = False

    # -- start-up -------------------------------------------------------------------------------------------------

    async def start(self) -> None:
        channels = [grpc.aio.insecure_channel(a.target, options=_CHANNEL_OPTIONS) for a in self._addresses]
        self._workers = [Worker(self._client_class(a, ch)) for a, ch in zip(self._addresses, channels, strict=True)]
        self._router = Router(self._workers, self._config.worker_affinity_slack)
        self._prober = Prober(self.name, self._workers, self._config.worker_probe_interval,
                              self._config.worker_probe_timeout)
        log.info("waiting for a worker", extra={"model": self.name, "workers": [w.name for w in self._workers]})
        first = await self._prober.first_healthy(self._config.worker_start_timeout)
        info = await first.client.model_info(self._config.worker_probe_timeout)
        await self._load_tokenizer(first, info)
        self._info = dataclasses.replace(info, context_length=self._context(info))
        self._prober.admit = self._admit
        for worker in self._workers:   # the others joined before the model's info was known: check them now
            if worker is not first and worker.healthy:
                worker.healthy = False
                await self._prober.probe(worker)
        self._probing = asyncio.create_task(self._prober.run())

    async def _load_tokenizer(self, first: Worker, info: ModelInfo) -> None:
        if self._folder is not None:
            checkpoint = self._folder.checkpoint
        else:
            self._tokenizer_dir = checkpoint = Path(tempfile.mkdtemp(prefix=f"llmserve-{self.kind}-tokenizer-"))
            await fetch_tokenizer(first.client, self.name, checkpoint, self._config.worker_probe_timeout * 10)
        self.tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, checkpoint)
        self._eos = eos_token_ids(checkpoint, self.tokenizer) | set(info.eos_token_ids)
        self._special = special_token_ids(self.tokenizer)
        table = token_byte_table(self.tokenizer)
        self._table = table + [b""] * max(0, info.vocab_size - len(table))   # ids past the tokenizer: no text
        self._json_banned = tuple(json_banned_tokens(self._table))
        context = self._context(info)
        if self._folder is not None:
            self.manifest = dataclasses.replace(self._folder, backend=self.kind, context_length=context)
        else:
            self.manifest = ModelManifest(root=checkpoint, name=self.name, backend=self.kind,
                                          context_length=context, checkpoint=checkpoint)

    def _context(self, info: ModelInfo) -> int:
        """The worker's context, or the folder's where it says less (its manifest may cap what is served)."""
        context = info.context_length or (self._folder.context_length if self._folder else 0)
        return min(context, self._folder.context_length) if self._folder else context

    def _admit(self, info: ModelInfo) -> str | None:
        """A worker may serve the model when it has its vocabulary and at least its context."""
        assert self._info is not None
        if info.vocab_size != self._info.vocab_size:
            return f"serves a vocabulary of {info.vocab_size} tokens, the model has {self._info.vocab_size}"
        if info.context_length and info.context_length < self._info.context_length:
            return f"serves a context of {info.context_length} tokens, the model needs {self._info.context_length}"
        return None

    # -- generation -----------------------------------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Event]:
        if self._router is None or self._stopped:
            raise Unavailable(f"model {self.name!r} is not being served")
        replicate = request.n > 1 and request.sampling.temperature == 0
        choices = Choices(request, self._table, self._eos, self._special)
        if request.request_id in self._live:
            request.request_id = f"{request.request_id}-{id(request):x}"
        live = self._live[request.request_id] = _Live()
        submitted = time.monotonic()
        call: WorkerCall | None = None
        try:
            call, outputs = await self._start(request, 1 if replicate else request.n, live)
            choices.queue_time = time.monotonic() - submitted
            while True:
                if outputs is DEADLINE or outputs is CANCELLED:
                    reason = FinishReason.DEADLINE if outputs is DEADLINE else FinishReason.CANCELLED
                    for event in choices.finish_all(FinishReason.ERROR if self._stopped else reason):
                        yield event
                    return
                if outputs is None:   # the worker ended the stream with choices open
                    self._failed(call, "the stream ended before every choice finished")
                    for event in choices.finish_all(FinishReason.ERROR):
                        yield event
                    return
                for event in self._events(choices, outputs, request, replicate):
                    yield event
                if choices.done:
                    return
                try:
                    outputs = await call.next()
                except grpc.aio.AioRpcError as e:
                    self._failed(call, describe_error(e), e)
                    for event in choices.finish_all(FinishReason.ERROR):
                        yield event
                    return
        finally:
            del self._live[request.request_id]
            if call is not None:
                call.close()

    async def _start(self, request: GenerationRequest, n: int, live: _Live) -> tuple[WorkerCall, Any]:
        """A call that answered (or hit the deadline or a cancel), on the first worker that takes the request;
        one that fails before its first answer is tried on the next worker."""
        assert self._router is not None
        hashes = block_hashes(request.prompt_token_ids)
        stop = () if request.sampling.ignore_eos else tuple(sorted(self._eos))
        vocab = self._info.vocab_size if self._info is not None and self._info.vocab_size else len(self._table)
        banned = self._json_banned if request.guided is not None and json_document(request.guided) else ()
        tried: list[Worker] = []
        failures: list[str] = []
        busy = False
        while (worker := self._router.pick(hashes, tried)) is not None:
            tried.append(worker)
            call = live.call = WorkerCall(worker, request, n, stop, banned, vocab, self._spawn,
                                          self._config.worker_probe_timeout)
            if live.cancelled:
                call.cancel()
            try:
                return call, await call.next()
            except grpc.aio.AioRpcError as e:
                call.close()
                WORKER_ERRORS.labels(self.name, worker.name, e.code().name).inc()
                if e.code() in INVALID:
                    raise InvalidRequest(invalid_field(e.details() or ""), f"the {self.kind} worker refused the "
                                         f"request: {e.details()}") from None
                if not retryable(e.code()):
                    raise EngineError(f"{worker.name} failed the request: {describe_error(e)}") from None
                busy |= e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                if e.code() == grpc.StatusCode.UNAVAILABLE and self._prober is not None:
                    self._prober.down(worker, describe_error(e))
                failures.append(f"{worker.name}: {describe_error(e)}")
            except BaseException:
                call.close()
                raise
        if busy:
            raise QueueFull(f"every worker of model {self.name!r} is at capacity ({'; '.join(failures)})")
        why = "; ".join(failures) or "; ".join(f"{w.name}: {w.detail}" for w in self._workers)
        raise Unavailable(f"no worker of model {self.name!r} can take the request now ({why})")

    def _events(self, choices: Choices, outputs: list[Output], request: GenerationRequest,
                replicate: bool) -> list[Event]:
        events: list[Event] = []
        for out in outputs:
            logprobs = None
            if request.sampling.logprobs and out.logprobs is not None:
                logprobs = [choices.logprob(t, lp.logprob, lp.alternatives)
                            for t, lp in zip(out.token_ids, out.logprobs, strict=False)]
            for index in (range(request.n) if replicate else (out.index,)):
                if choices.open(index):
                    events += choices.advance(index, out.token_ids, _finish(out.finish), logprobs)
        return events

    def _failed(self, call: WorkerCall, why: str, error: grpc.aio.AioRpcError | None = None) -> None:
        log.warning("worker failed a running request", extra={"model": self.name, "worker": call.worker.name,
                                                              "reason": why})
        WORKER_ERRORS.labels(self.name, call.worker.name, error.code().name if error else "EOF").inc()
        if error is not None and error.code() == grpc.StatusCode.UNAVAILABLE and self._prober is not None:
            self._prober.down(call.worker, why)

    def _spawn(self, work: Any) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def abort(self, request_id: str) -> None:
        live = self._live.get(request_id)
        if live is not None:
            live.cancelled = True
            if live.call is not None:
                live.call.cancel()

    # -- state ----------------------------------------------------------------------------------------------------

    @property
    def profile(self) -> ProfileInfo:
        return ProfileInfo(f"{self.kind}-workers", "", "", 0)

    def refused_fields(self) -> dict[str, str]:
        return dict(self._client_class.refused)

    def workers(self) -> list[WorkerStatus]:
        return [w.status() for w in self._workers]

    def stats(self) -> EngineStats:
        statuses = self.workers()
        reported = [s.stats or EngineStats(s.in_flight, 0, 0, 0) for s in statuses]
        return EngineStats(sum(s.running for s in reported), sum(s.waiting for s in reported),
                           sum(s.kv_blocks_used for s in reported), sum(s.kv_blocks_total for s in reported))

    def health(self) -> EngineHealth:
        healthy = sum(w.healthy for w in self._workers)
        if healthy:
            return EngineHealth(True, f"{healthy} of {len(self._workers)} workers in rotation")
        details = "; ".join(f"{w.name}: {w.detail}" for w in self._workers)
        return EngineHealth(False, f"no worker in rotation ({details})", recoverable=not self._stopped)

    async def shutdown(self) -> None:
        self._stopped = True
        if self._probing is not None:
            self._probing.cancel()
        for request_id in list(self._live):
            await self.abort(request_id)
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*(w.client.channel.close() for w in self._workers), return_exceptions=True)
        if self._tokenizer_dir is not None:
            shutil.rmtree(self._tokenizer_dir, ignore_errors=True)
