"""Compiled grammars for constrained decoding: one xgrammar semantics for every engine.

The gRPC workers (TensorRT-LLM, vLLM, SGLang) guide decoding with xgrammar, so
the reference engine does too, and all take the same `GuidedDecoding`: a JSON
schema's text (each worker protocol's JSON-schema constraint) or an EBNF grammar. Schemas
were checked by the serving layer (service/chat/schemas.py) before any engine
sees them; what is left here is compiling them against a tokenizer.

JSON is compiled without free whitespace (xgrammar's `any_whitespace=False`):
a model, a random one above all, could otherwise emit blanks forever and
never close the object. `json_object` is the schema `{"type": "object"}`:
any object, never a bare array or string.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

import xgrammar as xgr

from service.backends.base import GuidedDecoding, InvalidRequest

JSON_OBJECT_SCHEMA = '{"type": "object"}'
COMPILE_CACHE_BYTES = 256 * 1024 * 1024  # compiled grammars: ~0.2 MB each at 4k tokens, ~30x that at 128k


def json_banned_tokens(token_bytes: list[bytes]) -> list[int]:
    """The tokens no output under a JSON schema may hold: those with a raw control character.

    JSON written without free whitespace never contains one (newlines and tabs inside strings are escaped),
    yet xgrammar's length-bounded strings (`maxLength`) admit them, and `json.loads` refuses them. Every engine
    bans these tokens under a JSON schema: the reference engine masks them, gRPC workers are sent them as
    tokens to avoid (service/backends/workers/)."""
    return [i for i, b in enumerate(token_bytes) if any(c < 0x20 for c in b)]


def schema_text(guided: GuidedDecoding) -> str | None:
    """The JSON schema an engine compiles for `guided`, or None for an EBNF grammar."""
    return JSON_OBJECT_SCHEMA if guided.json_object else guided.json_schema


class GrammarCache:
    """Compiled grammars for one tokenizer, least recently used first out past COMPILE_CACHE_BYTES.

    Compiling costs milliseconds to seconds with the vocabulary's size; a
    matcher built from a compiled grammar costs microseconds. Admission
    compiles in a worker thread while the engine thread reads, hence the lock.
    """

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: set[int]) -> None:
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                  stop_token_ids=sorted(stop_token_ids))
        self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        self._cache: OrderedDict[GuidedDecoding, xgr.CompiledGrammar] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.compiles = 0

    def get(self, guided: GuidedDecoding) -> xgr.CompiledGrammar:
        with self._lock:
            hit = self._cache.get(guided)
            if hit is not None:
                self._cache.move_to_end(guided)
                return hit
        compiled = self._compile(guided)  # outside the lock: the engine thread's cache hits never wait on it
        with self._lock:
            self.compiles += 1
            if guided not in self._cache:
                self._cache[guided] = compiled
                self._bytes += compiled.memory_size_bytes
            while self._bytes > COMPILE_CACHE_BYTES and len(self._cache) > 1:
                self._bytes -= self._cache.popitem(last=False)[1].memory_size_bytes
        return compiled

    def _compile(self, guided: GuidedDecoding) -> xgr.CompiledGrammar:
        text = schema_text(guided)
        try:
            if text is not None:
                return self._compiler.compile_json_schema(text, any_whitespace=False)
            return self._compiler.compile_grammar(guided.ebnf or "")
        except (RuntimeError, ValueError, TypeError) as e:
            field = "response_format.json_schema.schema" if text is not None else "response_format"
            raise InvalidRequest(field, f"cannot compile the grammar: {e}") from None
