"""Compiled grammars for constrained decoding: one xgrammar semantics for every engine.

TensorRT-LLM guides decoding with xgrammar, so the reference engine does too,
and both take the same `GuidedDecoding`: a JSON schema's text (TensorRT-LLM's
`GuidedDecodingParams(json=...)`) or an EBNF grammar (`grammar=...`), which is
also how a JSON schema between tags (a Hermes-style tool call) goes. Schemas
were checked by the serving layer (service/chat/schemas.py) before any engine
sees them; what is left here is compiling them against a tokenizer.

JSON is compiled without free whitespace (xgrammar's `any_whitespace=False`):
a model, a random one above all, could otherwise emit blanks forever and
never close the object. `json_object` is the schema `{"type": "object"}`:
any object, never a bare array or string.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Any

import xgrammar as xgr

from service.backends.base import GuidedDecoding, InvalidRequest

JSON_OBJECT_SCHEMA = '{"type": "object"}'
COMPILE_CACHE_BYTES = 256 * 1024 * 1024  # compiled grammars: ~0.2 MB each at 4k tokens, ~30x that at 128k


def schema_text(guided: GuidedDecoding) -> str | None:
    """The JSON schema an engine compiles for `guided`, or None when it compiles a grammar (grammar_text)."""
    if guided.tags is not None:
        return None
    return JSON_OBJECT_SCHEMA if guided.json_object else guided.json_schema


def _literal(text: str) -> xgr.Grammar:
    return xgr.Grammar.from_ebnf(f"root ::= {json.dumps(text)}")


def grammar_text(guided: GuidedDecoding) -> str | None:
    """The xgrammar EBNF an engine compiles for `guided`, or None for a bare JSON schema: `ebnf`, or the JSON schema
    between its tags (compact JSON, as the reference engine compiles every schema)."""
    if guided.tags is None:
        return guided.ebnf
    before, after = guided.tags
    document = xgr.Grammar.from_json_schema(guided.json_schema or JSON_OBJECT_SCHEMA, any_whitespace=False)
    return str(xgr.Grammar.concat(_literal(before), document, _literal(after)))


def json_document(guided: GuidedDecoding) -> bool:
    """Whether the output is compact JSON (between tags without control characters, maybe), which never holds a
    raw control character."""
    return guided.json_object or guided.json_schema is not None


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
            return self._compiler.compile_grammar(grammar_text(guided) or "")
        except (RuntimeError, ValueError, TypeError) as e:
            field = "response_format.json_schema.schema" if text is not None else \
                "tools" if guided.tags else "response_format"
            raise InvalidRequest(field, f"cannot compile the grammar: {e}") from None
