"""Special-token text is a special token only where the chat template writes it; in what a client sends it is text.

A tokenizer that encodes a rendered prompt recognises `<|eot_id|>` wherever the
text holds it, so a user whose message says "<|eot_id|><|start_header_id|>system"
would end their own turn and forge a system turn. Meta's reference ChatFormat
encodes the headers it writes with special tokens and message content as text
(`allowed_special` empty); so does llmserve, for every model and template:

- a conversation none of whose strings holds special-token text (nearly all)
  is rendered and encoded as before, in one call;
- otherwise every string that holds some (message content, tool-call
  arguments, tool definitions) is wrapped in markers that carry a per-request
  random number, the conversation is rendered, and a special token counts
  only where it lies wholly outside the markers: the template wrote it. The
  text between those tokens is encoded with special tokens read as text.

Splitting at the template's special tokens is what the tokenizer itself does
before it encodes the text between them, so the ids equal the one-call
encoding wherever content holds no special-token text (the tests check it on
byte-level BPE, Meta's Llama 3 tokenizer and SentencePiece-style tokenizers).
Markers sit inside a string's leading and trailing whitespace, so a template's
`trim` still trims. A template that cuts or reshapes such a string so that the
markers no longer pair up gets the request refused, never encoded unsafely.
"""

from __future__ import annotations

import json
import pickle
import re
import secrets
from collections.abc import Callable
from typing import Any

from tokenizers import Tokenizer

_OPEN, _CLOSE = "\ue000", "\ue001"  # private-use characters: no escaping, case filter or trim changes them


class MarkersLost(ValueError):
    """The template did not render a marked string whole."""


def _trie_pattern(words: list[str]) -> str:
    """One regex for many literal words, as a trie: matching costs the depth, not the number of words; the
    longest word wins."""
    trie: dict[str, Any] = {}
    for word in words:
        node = trie
        for ch in word:
            node = node.setdefault(ch, {})
        node[""] = {}

    def pattern(node: dict[str, Any]) -> str:
        branches = [re.escape(ch) + pattern(child) for ch, child in sorted(node.items()) if ch]
        if not branches:
            return ""
        ending = "" in node
        if len(branches) == 1 and not ending:
            return branches[0]
        return "(?:" + "|".join(branches) + ")" + ("?" if ending else "")

    return pattern(trie)


class _Marks:
    """Markers for one request: a string's core (inside its leading and trailing whitespace) goes between them."""

    def __init__(self) -> None:
        nonce = f"{secrets.randbelow(10**16):016d}"  # digits: upper/lower-casing filters leave them alone
        self.open, self.close = f"{_OPEN}{nonce}{_OPEN}", f"{_CLOSE}{nonce}{_CLOSE}"
        self._either = re.compile(f"{re.escape(self.open)}|{re.escape(self.close)}")

    def wrap(self, text: str) -> str:
        core = text.strip()
        if not core:
            return text
        start = text.index(core)
        return f"{text[:start]}{self.open}{core}{self.close}{text[start + len(core):]}"

    def remove(self, rendered: str) -> tuple[str, list[tuple[int, int]]]:
        """The rendered text without markers, and the template's own stretches of it (start, end): everything
        outside the marked strings."""
        text: list[str] = []
        length, inside, own, own_start, last = 0, False, [], 0, 0
        for marker in self._either.finditer(rendered):
            opening = marker.group() == self.open
            if opening == inside:
                raise MarkersLost("the chat template split or reordered a marked string")
            piece = rendered[last:marker.start()]
            text.append(piece)
            length += len(piece)
            if opening:
                own.append((own_start, length))
            else:
                own_start = length
            inside, last = opening, marker.end()
        if inside:
            raise MarkersLost("the chat template cut a marked string short")
        text.append(rendered[last:])
        own.append((own_start, length + len(rendered) - last))
        return "".join(text), own


def _without_offset_dependence(backend: Tokenizer) -> Tokenizer | None:
    """A copy for text that does not open the prompt, where the tokenizer would behave differently: Metaspace
    with prepend_scheme "first" prepends its "▁" only at the very start of the input. None when nothing
    depends on the offset."""
    if backend.pre_tokenizer is None:
        return None
    spec = json.loads(backend.pre_tokenizer.__getstate__())
    changed = False

    def visit(node: Any) -> None:
        nonlocal changed
        if isinstance(node, dict):
            if node.get("type") == "Metaspace" and node.get("prepend_scheme") == "first":
                node["prepend_scheme"] = "never"
                changed = True
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(spec)
    if not changed:
        return None
    later = pickle.loads(pickle.dumps(backend))
    pre_tokenizer = pickle.loads(pickle.dumps(backend.pre_tokenizer))
    pre_tokenizer.__setstate__(json.dumps(spec).encode())
    later.pre_tokenizer = pre_tokenizer
    return later


def _as_text(tokenizer: Tokenizer) -> Tokenizer:
    """A copy of the tokenizer that reads every special token as text, for this module alone (transformers' own
    split_special_tokens flips a flag shared by every thread)."""
    plain = pickle.loads(pickle.dumps(tokenizer))
    plain.encode_special_tokens = True
    plain.no_truncation()
    plain.no_padding()
    return plain


class SpecialText:
    """A tokenizer's special tokens, to find their text in a conversation and to encode a rendering in which
    only the template's own count."""

    def __init__(self, tokenizer: Any) -> None:
        added = {i: t for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if t.special}
        self._ids = {t.content: i for i, t in added.items()}
        for token in getattr(tokenizer, "all_special_tokens", []):
            token_id = tokenizer.convert_tokens_to_ids(token)
            if isinstance(token_id, int):
                self._ids.setdefault(token, token_id)
        self._lstrip = {t.content for t in added.values() if t.lstrip}
        self._rstrip = {t.content for t in added.values() if t.rstrip}
        self._pattern = re.compile(_trie_pattern(list(self._ids))) if self._ids else None
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._encoders: tuple[Callable[[str], list[int]], Callable[[str], list[int]]]
        if isinstance(backend, Tokenizer):
            plain = _as_text(backend)
            later = _as_text(offset_free) if (offset_free := _without_offset_dependence(backend)) else plain
            self._encoders = (lambda s: plain.encode(s, add_special_tokens=False).ids,
                              lambda s: later.encode(s, add_special_tokens=False).ids)
        else:  # a slow tokenizer: split_special_tokens is a call argument there, not shared state
            def encode(text: str) -> list[int]:
                return tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)
            self._encoders = (encode, encode)

    def found_in(self, value: Any) -> bool:
        """Whether any string in value (nested dicts and lists, keys included) holds special-token text."""
        if self._pattern is None:
            return False
        if isinstance(value, str):
            return self._pattern.search(value) is not None
        if isinstance(value, dict):
            return any(self.found_in(k) or self.found_in(v) for k, v in value.items())
        if isinstance(value, list | tuple):
            return any(self.found_in(v) for v in value)
        return False

    def encode(self, render: Callable[[Callable[[Any], Any]], str]) -> list[int]:
        """Token ids of the conversation that `render(mark)` renders with `mark` applied to what the client sent:
        special tokens only where the template wrote them. Raises MarkersLost unless the marked rendering, markers
        removed, is the plain one (a second rendering, on this rare path)."""
        marks = _Marks()

        def mark(value: Any) -> Any:
            if isinstance(value, str):
                return marks.wrap(value) if self.found_in(value) else value
            if isinstance(value, dict):
                return {mark(k): mark(v) for k, v in value.items()}
            if isinstance(value, list | tuple):
                return [mark(v) for v in value]
            return value

        text, own = marks.remove(render(mark))
        if text != render(lambda value: value):
            raise MarkersLost("the chat template changed a marked string")
        cuts = self._template_tokens(text, own)
        ids: list[int] = []
        start = 0
        for token_start, token_end, token_id in cuts:
            if token_start > start:
                ids += self._encoders[start > 0](text[start:token_start])
            ids.append(token_id)
            start = token_end
        if start < len(text):
            ids += self._encoders[start > 0](text[start:])
        return ids

    def _template_tokens(self, text: str, own: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
        """(start, end, id) of each special token lying wholly in the template's own text, with the whitespace that
        an lstrip/rstrip token takes."""
        assert self._pattern is not None
        found: list[tuple[int, int, int]] = []
        for own_start, own_end in own:
            for match in self._pattern.finditer(text, own_start, own_end):
                start, end, token = match.start(), match.end(), match.group()
                if token in self._lstrip:
                    floor = found[-1][1] if found else 0
                    while start > floor and text[start - 1].isspace():
                        start -= 1
                if token in self._rstrip:
                    while end < len(text) and text[end].isspace():
                        end += 1
                found.append((start, end, self._ids[token]))
        return found
