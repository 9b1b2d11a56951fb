"""Reading a tool call out of an answer, in each tool format a model may use, as the answer streams.

Both parsers take a choice's text piece by piece and give back content or a
call (its start, then its arguments' JSON text); the unary answer and the
stream go through the same parser, so they agree on what is a call and what its
arguments are. Which parser a model gets is its template's tool format
(service/models/template.py; service/chat/tools.py picks it).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Protocol

import regex

from service.models.hermes import TOOL_CALL_OPEN

PYTHON_TAG = "<|python_tag|>"


@dataclass(frozen=True, slots=True)
class Content:
    text: str


@dataclass(frozen=True, slots=True)
class CallStart:
    id: str
    name: str


@dataclass(frozen=True, slots=True)
class Arguments:
    text: str


Piece = Content | CallStart | Arguments


class _JsonNesting:
    """Follows a JSON value's strings and nesting character by character, so that its own closing brace is
    found however the text streams in."""

    def __init__(self) -> None:
        self.depth = 0
        self._in_string = False
        self._escaped = False

    def step(self, ch: str) -> bool:
        """Takes one character; True when it closed a container (then `depth` says which)."""
        if self._in_string:
            if self._escaped:
                self._escaped = False
            elif ch == "\\":
                self._escaped = True
            elif ch == '"':
                self._in_string = False
        elif ch == '"':
            self._in_string = True
        elif ch in "{[":
            self.depth += 1
        elif ch in "}]":
            self.depth -= 1
            return True
        return False


class CallParser(Protocol):
    called: bool  # whether the answer turned out to be a call

    def feed(self, text: str) -> list[Piece]: ...

    def finish(self) -> list[Piece]:
        """What was held back, once the answer has ended."""
        ...


class Llama31JsonParser:
    """One choice's text in, content or a tool call out, piece by piece; it reads a call where Meta's reference
    `ChatFormat.decode_assistant_message` reads a custom tool's call in the JSON format.

    The whole answer (spaces around it and an opening `<|python_tag|>` aside)
    must be one JSON object with "name" (one of the request's tools) and
    "parameters" (an object; "arguments" is accepted too), other keys ignored,
    as Meta's own `{"type": "function", ...}`. Prose before or after the
    object, or several calls, make the answer content, as for Meta. Text is
    held only while it could still be such an answer; so the call comes out
    when the answer ends, whole: its arguments are the object's text as written.
    """

    def __init__(self, names: list[str]) -> None:
        self._names = set(names)
        self._held = ""
        self._state = "opening" if names else "content"
        self._scanned = 0  # of _held, by the object scan
        self._object_start = self._object_end = 0
        self._nesting = _JsonNesting()
        self.called = False

    def feed(self, text: str) -> list[Piece]:
        if self._state == "content":
            return [Content(text)] if text else []
        self._held += text
        if self._state == "opening":
            opening = _OPENING.match(self._held)
            if opening is None:
                return self._as_content() if _OPENING.fullmatch(self._held, partial=True) is None else []
            self._state, self._object_start = "object", opening.end() - 1
            self._scanned = self._object_start
        if self._state == "object":
            self._scan()
        if self._state == "closed" and not _JSON_WHITESPACE.fullmatch(self._held, self._object_end):
            return self._as_content()  # prose after the object
        return []

    def finish(self) -> list[Piece]:
        """The answer has ended: what was held is a call, or content."""
        if self._state == "closed":
            call = _call(self._held[self._object_start:self._object_end], self._names)
            if call is not None:
                self._state, self.called = "done", True
                return [CallStart(f"call_{uuid.uuid4().hex[:24]}", call[0]), Arguments(call[1])]
        return self._as_content() if self._state != "content" else []

    def _as_content(self) -> list[Piece]:
        self._state, held, self._held = "content", self._held, ""
        return [Content(held)] if held else []

    def _scan(self) -> None:
        """Follows the object's strings and nesting as it streams, up to its own closing brace; then only JSON
        whitespace may follow, or it is prose."""
        for i in range(self._scanned, len(self._held)):
            if self._nesting.step(self._held[i]) and self._nesting.depth == 0:
                self._state, self._object_end = "closed", i + 1
                return
        self._scanned = len(self._held)


# An answer that may be a call: spaces, an optional <|python_tag|>, JSON whitespace, then the object.
_OPENING = regex.compile(rf" *(?:{regex.escape(PYTHON_TAG)})?[ \t\n\r]*\{{")
_JSON_WHITESPACE = regex.compile(r"[ \t\n\r]*")


def _call(text: str, names: set[str]) -> tuple[str, str] | None:
    """(name, arguments' JSON text as written) when the object is a call of one of `names`."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if not isinstance(value, dict) or value.get("name") not in names:
        return None
    key = "parameters" if "parameters" in value else "arguments"
    if not isinstance(value.get(key), dict):
        return None
    start, end = _member_spans(text)[key]
    return value["name"], text[start:end]


def _member_spans(text: str) -> dict[str, tuple[int, int]]:
    """Where each member's value lies in a JSON object's text (which json.loads has accepted); the last of a
    repeated key wins, as in json.loads."""
    decoder, spans = json.JSONDecoder(), {}
    i = _JSON_WHITESPACE.match(text, 1).end()
    while text[i] != "}":
        key, i = decoder.raw_decode(text, i)
        i = _JSON_WHITESPACE.match(text, _JSON_WHITESPACE.match(text, i).end() + 1).end()  # past the colon
        _, end = decoder.raw_decode(text, i)
        spans[key] = (i, end)
        i = _JSON_WHITESPACE.match(text, end).end()
        if text[i] == ",":
            i = _JSON_WHITESPACE.match(text, i + 1).end()
    return spans


class HermesParser:
    """The "hermes" format: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, read as it streams.

    Text is held only while it could still be the opening of a call
    (`<tool_call>{"name": "<known tool>", "arguments": `); then the call starts
    and the arguments object streams through as it is written, up to its
    closing brace. An answer holds one call, so what follows is dropped, the
    closing `</tool_call>` included.
    """

    def __init__(self, names: list[str]) -> None:
        alternatives = "|".join(regex.escape(n) for n in names)  # names are [a-zA-Z0-9_-]: no JSON escapes
        self._opening = regex.compile(
            rf'\s*{regex.escape(TOOL_CALL_OPEN)}\s*\{{\s*"name"\s*:\s*"({alternatives})"\s*,\s*'
            rf'"(?:arguments|parameters)"\s*:\s*')
        self._held = ""
        self._state = "deciding" if names else "content"
        self._nesting = _JsonNesting()
        self.called = False

    def feed(self, text: str) -> list[Piece]:
        if self._state == "content":
            return [Content(text)] if text else []
        if self._state == "deciding":
            return self._decide(text)
        if self._state == "arguments":
            return self._arguments(text)
        return []

    def finish(self) -> list[Piece]:
        """What was held back when the choice ends: text that never became a call is content."""
        if self._state == "deciding" and self._held:
            self._state = "content"
            return [Content(self._held)]
        return []

    def _decide(self, text: str) -> list[Piece]:
        self._held += text
        opening = self._opening.match(self._held)
        if opening is None:
            if self._opening.fullmatch(self._held, partial=True) is None:
                self._state = "content"
                return [Content(self._held)]
            return []
        self._state, self.called = "arguments", True
        start = CallStart(f"call_{uuid.uuid4().hex[:24]}", opening.group(1))
        return [start, *self._arguments(self._held[opening.end():])]

    def _arguments(self, text: str) -> list[Piece]:
        """Scans the arguments' JSON: strings and nesting, so that the object's own closing brace ends it."""
        if self._nesting.depth == 0:
            text = text.lstrip()  # between the opening's colon and the value
        for i, ch in enumerate(text):
            if self._nesting.step(ch) and self._nesting.depth <= 0:
                # Below 0: the call's own brace, after arguments that were not an object.
                self._state = "done"
                end = i + 1 if self._nesting.depth == 0 else i
                return [Arguments(text[:end])] if end else []
        return [Arguments(text)] if text else []
