"""Compiled grammars for constrained decoding: one xgrammar semantics for every engine.

The gRPC workers (TensorRT-LLM, vLLM, SGLang) guide decoding with xgrammar, so
the reference engine does too, and all take the same `GuidedDecoding`: a JSON
schema's text, a regex, a choice or an EBNF grammar (a choice, and a JSON schema
between tags as a Hermes-style tool call writes it, are the grammars
`grammar_text` writes; each worker protocol takes its own subset, see
service/backends/workers/). Constraints were checked by the serving layer
(service/chat/schemas.py) before any engine sees them; what is left here is
compiling them against a tokenizer.

JSON is compiled without free whitespace (xgrammar's `any_whitespace=False`):
a model, a random one above all, could otherwise emit blanks forever and
never close the object. `json_object` is the schema `{"type": "object"}`:
any object, never a bare array or string.

Beside the compiled grammar, a `Grammar` carries how its outputs close
(service/backends/closing): the shape an engine tracks to end the output
validly within max_tokens, and the fewest tokens of the shortest valid output,
which max_tokens must allow. xgrammar's own matcher checks that shortest output
here; a constraint the closing package cannot model (an EBNF grammar, a
`format`) has no shape and is served without that guarantee.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import xgrammar as xgr

from service.backends.base import GuidedDecoding, InvalidRequest
from service.backends.closing import Unsupported
from service.backends.closing.schema import choice_shape, json_shape, regex_shape, tagged_shape
from service.backends.closing.shapes import Node
from service.backends.closing.tokens import Speller
from service.backends.vocab import token_byte_table

log = logging.getLogger("llmserve.engine.grammar")

JSON_OBJECT_SCHEMA = '{"type": "object"}'
COMPILE_CACHE_BYTES = 256 * 1024 * 1024  # compiled grammars: ~0.2 MB each at 4k tokens, ~30x that at 128k


def schema_text(guided: GuidedDecoding) -> str | None:
    """The JSON schema an engine compiles for `guided`, or None when it compiles a regex or a grammar
    (grammar_text)."""
    if guided.tags is not None:
        return None
    return JSON_OBJECT_SCHEMA if guided.json_object else guided.json_schema


def choice_grammar(choices: tuple[str, ...]) -> str:
    """The xgrammar EBNF grammar that admits exactly one of `choices` (JSON string escapes are EBNF's too)."""
    return "root ::= " + " | ".join(json.dumps(c) for c in choices)


def _literal(text: str) -> xgr.Grammar:
    return xgr.Grammar.from_ebnf(f"root ::= {json.dumps(text)}")


def grammar_text(guided: GuidedDecoding) -> str | None:
    """The xgrammar EBNF an engine compiles for `guided`, or None for a bare JSON schema or a regex: `ebnf`, a
    choice as `choice_grammar`, or the JSON schema between its tags (compact JSON, as every schema compiles)."""
    if guided.choice is not None:
        return choice_grammar(guided.choice)
    if guided.tags is None:
        return guided.ebnf
    before, after = guided.tags
    document = xgr.Grammar.from_json_schema(guided.json_schema or JSON_OBJECT_SCHEMA, any_whitespace=False)
    return str(xgr.Grammar.concat(_literal(before), document, _literal(after)))


def json_document(guided: GuidedDecoding) -> bool:
    """Whether the output is compact JSON (between tags without control characters, maybe), which never holds a
    raw control character."""
    return guided.json_object or guided.json_schema is not None


def json_banned_tokens(token_bytes: list[bytes]) -> list[int]:
    """The tokens no `json_document` output may hold: those with a raw control character.

    JSON written without free whitespace never contains one (newlines and tabs inside strings are escaped),
    yet xgrammar's length-bounded strings (`maxLength`) admit them, and `json.loads` refuses them. Every engine
    bans these tokens whenever `json_document` holds: the reference engine masks them, gRPC workers are sent
    them as tokens to avoid (service/backends/workers/)."""
    return [i for i, b in enumerate(token_bytes) if any(c < 0x20 for c in b)]


@dataclass(frozen=True)
class Grammar:
    """A constraint compiled for one tokenizer, with how its outputs close."""

    compiled: xgr.CompiledGrammar
    shape: Node | None = None          # None: outputs are not tracked, max_tokens may cut them short
    shortest: tuple[int, ...] = ()     # the fewest tokens of the shortest valid output

    @property
    def memory_size_bytes(self) -> int:
        return self.compiled.memory_size_bytes


def closing_shape(guided: GuidedDecoding) -> Node | None:
    """The shape an output of `guided` closes by, or None where it is not modelled. Raises Unsupported."""
    if guided.tags is not None:
        before, after = guided.tags
        return tagged_shape(before, json_shape(json.loads(guided.json_schema or JSON_OBJECT_SCHEMA)), after)
    text = schema_text(guided)
    if text is not None:
        return json_shape(json.loads(text))
    if guided.regex is not None:
        return regex_shape(guided.regex)
    if guided.choice is not None:
        return choice_shape(guided.choice)
    return None


class GrammarCache:
    """Grammars for one tokenizer, least recently used first out past COMPILE_CACHE_BYTES.

    Compiling costs milliseconds to seconds with the constraint's and the
    vocabulary's size; a matcher built from a compiled grammar costs
    microseconds. `build` is what a worker thread runs; `put` and `lookup`
    belong to whoever owns the cache (the engine loop), hence the lock.
    """

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: set[int],
                 token_bytes: list[bytes] | None = None) -> None:
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                  stop_token_ids=sorted(stop_token_ids))
        self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        self.speller = Speller(token_bytes if token_bytes is not None else token_byte_table(tokenizer),
                               set(info.special_token_ids) | set(stop_token_ids))
        self._cache: OrderedDict[GuidedDecoding, Grammar] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.compiles = 0

    def get(self, guided: GuidedDecoding) -> Grammar:
        """The grammar, built now unless cached."""
        found = self.lookup(guided)
        if found is None:
            found = self.build(guided)
            self.put(guided, found)
        return found

    def lookup(self, guided: GuidedDecoding) -> Grammar | None:
        with self._lock:
            hit = self._cache.get(guided)
            if hit is not None:
                self._cache.move_to_end(guided)
            return hit

    def put(self, guided: GuidedDecoding, grammar: Grammar) -> None:
        with self._lock:
            if guided not in self._cache:
                self._cache[guided] = grammar
                self._bytes += grammar.memory_size_bytes
            while self._bytes > COMPILE_CACHE_BYTES and len(self._cache) > 1:
                self._bytes -= self._cache.popitem(last=False)[1].memory_size_bytes

    def build(self, guided: GuidedDecoding) -> Grammar:
        """Compiles `guided` and works out how its outputs close. Raises InvalidRequest naming its field."""
        compiled = self._compile(guided)
        with self._lock:
            self.compiles += 1
        try:
            shape = closing_shape(guided)
        except Unsupported as e:
            log.info("output closing not modelled; max_tokens may cut it short", extra={"reason": str(e)})
            return Grammar(compiled)
        if shape is None:
            return Grammar(compiled)
        shortest = self.speller.spell(shape.shortest or b"")
        matcher = xgr.GrammarMatcher(compiled)  # the text, not token by token: ten times faster on large grammars
        if shortest is None or not matcher.accept_string(shape.shortest or b"") or not matcher.is_completed():
            log.warning("xgrammar refused the shortest output worked out for a constraint; it is served without "
                        "closing", extra={"shortest": (shape.shortest or b"")[:200].decode(errors="replace")})
            return Grammar(compiled)
        return Grammar(compiled, shape, tuple(shortest))

    def _compile(self, guided: GuidedDecoding) -> xgr.CompiledGrammar:
        text = schema_text(guided)
        try:
            if text is not None:
                return self._compiler.compile_json_schema(text, any_whitespace=False)
            if guided.regex is not None:
                return self._compiler.compile_regex(guided.regex)
            return self._compiler.compile_grammar(grammar_text(guided) or "")
        except (RuntimeError, ValueError, TypeError) as e:
            raise InvalidRequest(guided.field, f"cannot compile the constraint: {e}") from None
