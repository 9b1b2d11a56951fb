"""Grammars for constrained decoding: one xgrammar semantics for every engine.

TensorRT-LLM guides decoding with xgrammar, so the reference engine does too,
and both take the same `GuidedDecoding`: a JSON schema's text (TensorRT-LLM's
`GuidedDecodingParams(json=...)`) or an EBNF grammar (`grammar=...`). A
schema is checked here, before any engine sees it, so a bad one is an
INVALID_ARGUMENT naming the field whichever engine serves the model.

JSON is compiled without free whitespace (xgrammar's `any_whitespace=False`):
a model, a random one above all, could otherwise emit blanks forever and
never close the object. `json_object` is the schema `{"type": "object"}`:
any object, never a bare array or string.
"""

from __future__ import annotations

import functools
import json
import re
import threading
from collections import OrderedDict
from typing import Any

import jsonschema
import xgrammar as xgr

from service.backends.base import GuidedDecoding, InvalidRequest

JSON_OBJECT_SCHEMA = '{"type": "object"}'
COMPILE_CACHE_SIZE = 256                # schemas, for the tokenizer-free check
COMPILE_CACHE_BYTES = 256 * 1024 * 1024  # compiled grammars: ~0.2 MB each at 4k tokens, ~30x that at 128k
# Keywords xgrammar accepts but does not enforce: refused, so that "valid against the schema" stays a promise.
UNENFORCED = ("uniqueItems", "contains", "minContains", "maxContains", "dependentRequired", "dependentSchemas",
              "propertyNames", "unevaluatedItems")
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
_XGRAMMAR_LOCATION = re.compile(r"^\[[^\]]*\] \S+:\d+: ")


def plain_json(value: Any) -> Any:
    """A protobuf Struct holds every number as a double; a schema's `maxItems: 3` must stay an integer."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: plain_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain_json(v) for v in value]
    return value


def schema_text(guided: GuidedDecoding) -> str | None:
    """The JSON schema an engine compiles for `guided`, or None for an EBNF grammar."""
    return JSON_OBJECT_SCHEMA if guided.json_object else guided.json_schema


def check_schema(schema: dict[str, Any], field: str) -> str:
    """The schema's text, once it is known to be a valid JSON schema that xgrammar can enforce."""
    if not isinstance(schema.get("$schema", ""), str):
        raise InvalidRequest(field, "not a valid JSON schema: $schema must be a URI")
    try:
        jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator).check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "/".join(str(p) for p in e.absolute_path)
        raise InvalidRequest(field, f"not a valid JSON schema{f' at /{where}' if where else ''}: {e.message}") \
            from None
    unenforced = _unenforced(schema, "")
    if unenforced:
        raise InvalidRequest(field, f"unsupported JSON schema: {unenforced} cannot be enforced while decoding")
    text = json.dumps(schema)
    problem = _unsupported(text)
    if problem:
        raise InvalidRequest(field, f"unsupported JSON schema: {problem}")
    return text


def _unenforced(schema: Any, path: str) -> str | None:
    """The first UNENFORCED keyword, as `/path/keyword`; property names are data, not keywords."""
    if isinstance(schema, list):
        return next((found for i, sub in enumerate(schema) if (found := _unenforced(sub, f"{path}/{i}"))), None)
    if not isinstance(schema, dict):
        return None
    for key, value in schema.items():
        if key in UNENFORCED and value is not False:
            return f"{path}/{key}"
        subs = value.items() if key in _SCHEMA_MAPS and isinstance(value, dict) else [("", value)]
        for name, sub in subs:
            found = _unenforced(sub, f"{path}/{key}/{name}" if name else f"{path}/{key}")
            if found:
                return found
    return None


@functools.lru_cache(maxsize=COMPILE_CACHE_SIZE)
def _unsupported(text: str) -> str | None:
    """xgrammar's objection to the schema, if any; tokenizer-free, so the serving layer can ask it."""
    try:
        xgr.Grammar.from_json_schema(text, any_whitespace=False)
    except (RuntimeError, ValueError, TypeError) as e:
        return _XGRAMMAR_LOCATION.sub("", str(e).strip().splitlines()[-1]) if str(e).strip() else type(e).__name__
    return None


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
