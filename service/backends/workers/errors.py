"""A worker's refusal, read back into the contract: which field it concerns, and whether another worker may do.

Validation runs before any worker sees a request, so a worker's
INVALID_ARGUMENT means a limit of that worker (vLLM's --max-logprobs, a
grammar its backend cannot compile, a token past its vocabulary). Its
message is passed on under the contract field it names; the protocols carry
no field path, so the field is read from the message's words.
"""

from __future__ import annotations

import grpc

# Codes that say the request itself is wrong for the worker: refused by field, never retried.
INVALID = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
                     grpc.StatusCode.OUT_OF_RANGE})
# Codes another worker would answer the same way.
_FINAL = INVALID | {grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED,
                    grpc.StatusCode.UNAUTHENTICATED}

# Words of the workers' messages (vLLM's parameter=..., SGLang's and TensorRT-LLM's ValueErrors) -> the field.
_FIELDS = (
    (("logprob",), "top_logprobs"),
    (("seed",), "seed"),
    (("temperature",), "temperature"),
    (("top_p",), "top_p"),
    (("top_k",), "top_k"),
    (("min_p",), "min_p"),
    (("presence_penalty",), "presence_penalty"),
    (("frequency_penalty",), "frequency_penalty"),
    (("repetition_penalty",), "repetition_penalty"),
    (("max_tokens", "max_new_tokens"), "max_tokens"),
    (("grammar", "schema", "json", "regex", "guide", "structured", "structural"), "response_format"),
    (("stop",), "stop"),
)


def invalid_field(message: str) -> str:
    """The contract field a worker's refusal concerns; the prompt (`messages`) when its words name none."""
    lowered = message.lower()
    for words, field in _FIELDS:
        if any(w in lowered for w in words):
            return field
    return "messages"


def retryable(code: grpc.StatusCode) -> bool:
    """Whether a call that failed before its first answer may go to another worker."""
    return code not in _FINAL
