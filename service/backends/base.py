"""The engine interface: everything the serving layer knows of a backend.

The PyTorch reference engine and a model's gRPC workers (service/backends/workers/:
TensorRT-LLM, vLLM, SGLang) implement `Engine`. A request goes in as prompt token
ids plus sampling parameters and comes back as an async stream of events, one
stream per request carrying all of its n choices. Engines own detokenization and
stop strings, with the one byte-exact detokenizer (choices.py for engines that
return token ids), so every engine streams the same text for the same tokens; the
serving layer only maps events to RPC chunks.
"""

from __future__ import annotations

import abc
import dataclasses
import enum
from collections.abc import AsyncIterator
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase


class FinishReason(enum.Enum):
    """Why a choice ended. Tool calls are decided by the serving layer, not the engine."""

    STOP = "stop"            # EOS token or a stop string
    LENGTH = "length"        # max_tokens, or the context is full
    CANCELLED = "cancelled"  # aborted by the caller
    DEADLINE = "deadline"    # the request's deadline passed
    ERROR = "error"          # a worker failed the choice (gone, or gave up on it): the call ends UNAVAILABLE


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Per-request sampling; every field is already validated and defaulted."""

    max_tokens: int
    temperature: float = 1.0         # 0 is greedy
    top_p: float = 1.0
    top_k: int = 0                   # 0 is off
    min_p: float = 0.0               # 0 is off
    presence_penalty: float = 0.0    # additive, over generated tokens (OpenAI's definition)
    frequency_penalty: float = 0.0   # additive per occurrence, over generated tokens
    repetition_penalty: float = 1.0  # multiplicative, over prompt and generated tokens
    seed: int | None = None          # None: random
    stop: tuple[str, ...] = ()       # matched on decoded text, excluded from the output
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit), -100 to 100
    skip_special_tokens: bool = True  # special tokens' text (<|eot_id|>) never reaches the output unless False


@dataclass(frozen=True, slots=True)
class GuidedDecoding:
    """Constrained decoding: the output must match this (xgrammar semantics in every engine).

    Exactly one constraint is set:
    - `json_schema`: a JSON schema's text; the output writes object keys in its `properties` order
      (a forced tool call is one too, see service/chat/tools.py);
    - `json_object`: any JSON object, i.e. the schema `service.backends.grammar.JSON_OBJECT_SCHEMA`;
    - `regex`: the whole output matches this regular expression;
    - `choice`: the output is exactly one of these strings;
    - `ebnf`: an xgrammar EBNF grammar (its start rule is `root`).
    JSON is compact (`, ` and `: `, no other whitespace). `tags`, with `json_schema`, puts the document between
    two texts (a Hermes-style call's `<tool_call>` and `</tool_call>`); they hold no control characters, so the
    output still never needs one. `field` names the request field the constraint came from
    (`response_format.json_schema.schema`, `tools`, `structured_outputs.regex`, ...), for errors; it is not part
    of the constraint's identity.

    Engines map it onto their own APIs: TensorRT-LLM's GuidedDecodingParams takes json=, regex= and grammar=
    (a choice, and a schema between tags, as the grammar `service.backends.grammar.grammar_text` writes); vLLM's
    structured outputs take json, regex, choice and grammar as they are.
    """

    json_schema: str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    ebnf: str | None = None
    tags: tuple[str, str] | None = None
    field: str = dataclasses.field(default="response_format", compare=False)


@dataclass(frozen=True, slots=True)
class StructuredOutputSupport:
    """What an engine's constrained decoding does, as ListModels reports it."""

    forms: tuple[str, ...] = ("json_object", "json_schema", "tools", "regex", "choice", "grammar")
    # JSON (json_object, json_schema, forced tool calls), regex and choice outputs end valid even when
    # max_tokens runs out: the engine steers onto the shortest valid ending in time.
    closes_within_max_tokens: bool = False


@dataclass(slots=True)
class GenerationRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    n: int = 1                           # choices; they share the prompt's prefill
    deadline: float | None = None        # time.monotonic() after which the request ends with DEADLINE
    guided: GuidedDecoding | None = None


@dataclass(frozen=True, slots=True)
class TopToken:
    token_id: int
    token: str          # the token's text (U+FFFD for a partial UTF-8 byte)
    logprob: float
    bytes: bytes        # the token's exact bytes


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    bytes: bytes
    top: tuple[TopToken, ...] = ()


@dataclass(frozen=True, slots=True)
class TokenDelta:
    """New tokens of one choice. `text` may be empty while a UTF-8 character or a
    possible stop string is held back; it is released (or dropped, for a stop) later."""

    index: int
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob] | None = None


@dataclass(frozen=True, slots=True)
class Finished:
    """The last event of one choice; a request's stream ends after every choice's Finished."""

    index: int
    finish_reason: FinishReason
    completion_tokens: int
    queue_time: float = 0.0   # seconds from submission until the request's prefill was scheduled


Event = TokenDelta | Finished


class EngineError(RuntimeError):
    """The engine failed this request (the stream raises it). If `fatal`, the engine is
    unusable and its health says so."""

    def __init__(self, message: str, *, fatal: bool = False) -> None:
        super().__init__(message)
        self.fatal = fatal

    def __reduce__(self) -> tuple:  # pickled by the engine process: as a plain EngineError, keeping `fatal`
        return (EngineError, (str(self),), {"fatal": self.fatal})


class QueueFull(RuntimeError):
    """Admission refused: the waiting queue is at its bound. Raised before any event."""


class Unavailable(RuntimeError):
    """No worker can take the request now (none in rotation, or each one tried failed before starting it).
    Raised before any event; the client should retry."""


class InvalidRequest(ValueError):
    """The engine cannot take this request as asked (e.g. a grammar it cannot compile)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message

    def __reduce__(self) -> tuple:
        return (InvalidRequest, (self.field, self.message))


@dataclass(frozen=True, slots=True)
class EngineStats:
    running: int              # sequences being decoded
    waiting: int              # requests queued for admission
    kv_blocks_used: int
    kv_blocks_total: int
    prefix_cache_hit_rate: float = 0.0

    @property
    def kv_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0


@dataclass(frozen=True, slots=True)
class EngineHealth:
    ok: bool
    detail: str = ""
    recoverable: bool = False   # not ok for now, and back by itself (a model whose workers are all down)


@dataclass(frozen=True, slots=True)
class WorkerStatus:
    """One of a model's gRPC workers, for ListModels and the metrics."""

    address: str               # KIND://HOST:PORT
    kind: str
    healthy: bool              # in rotation
    detail: str                # why not, or the worker's own health message
    in_flight: int             # llmserve's requests on it now
    stats: EngineStats | None  # as the worker reports them (GetLoads); None for a kind without


@dataclass(frozen=True, slots=True)
class ProfileInfo:
    """What ListModels reports as the profile in use."""

    id: str
    gpu_architecture: str
    precision: str
    tensor_parallel_size: int = 1


class Engine(abc.ABC):
    """A loaded model that generates. One instance per served model."""

    tokenizer: PreTrainedTokenizerBase  # the model's own: chat templates render with it, Tokenize counts with it

    @property
    @abc.abstractmethod
    def profile(self) -> ProfileInfo: ...

    @property
    def structured_output(self) -> StructuredOutputSupport:
        """Every engine enforces every form through xgrammar; only some close outputs within max_tokens."""
        return StructuredOutputSupport()

    @abc.abstractmethod
    async def start(self) -> None:
        """Loads weights and starts the step loop; returns when requests can be submitted."""

    @abc.abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncIterator[Event]:
        """Submits a request and streams its events.

        Raises QueueFull (or InvalidRequest) on the first `__anext__` when the request is
        not admitted. Closing the iterator early (`aclose`, or garbage collection of an
        abandoned stream) aborts the request and frees its KV within one step.
        """

    @abc.abstractmethod
    async def abort(self, request_id: str) -> None:
        """Ends a request now: its choices finish with CANCELLED and its KV is freed."""

    @abc.abstractmethod
    def stats(self) -> EngineStats: ...

    @abc.abstractmethod
    def health(self) -> EngineHealth: ...

    def workers(self) -> list[WorkerStatus]:
        """The gRPC workers generating for this engine; none for an engine that generates in this process."""
        return []

    def refused_fields(self) -> dict[str, str]:
        """Contract fields this engine cannot honour, with why: validation refuses a request that sets one."""
        return {}

    @abc.abstractmethod
    async def shutdown(self) -> None:
        """Stops the step loop; pending requests end with an EngineError."""
