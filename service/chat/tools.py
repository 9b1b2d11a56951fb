"""Tool calls in the model's tool format: the grammar that forces one, the parser that finds one.

A model's format is its chat template's (service/models/template.py):

- "llama-3.1-json": Llama 3.1 and its Nemotron fine-tune are trained to call a
  tool by answering `{"name": "<function>", "parameters": {...}}`, sometimes
  after `<|python_tag|>`; their chat templates print past calls the same way.
- "hermes": for templates that cannot show tools, llmserve asks for
  `<tool_call>{"name": "<function>", "arguments": {...}}</tool_call>`
  (service/models/hermes.py).

Either way:

- tool_choice "required" or a named function: decoding is constrained to
  exactly one call, by a JSON schema (one branch per allowed tool, its
  arguments valid against the tool's `parameters`), between the tags for
  "hermes";
- "auto": the model decides; an answer that opens with a call of a known tool
  is a call, anything else is content;
- "none": tools never reach the prompt and nothing is parsed.

`ToolCallParser` turns a choice's text, fed as it streams, into content and
tool-call pieces. The unary answer and the stream use the same parser, so
they agree on what is a call and what its arguments are.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import regex
from google.protobuf import json_format

from service.backends.base import GuidedDecoding
from service.chat.schemas import plain_json, schema_json, schema_problem
from service.errors import FieldViolation
from service.gen.llmserve.v1 import chat_pb2
from service.models.hermes import TOOL_CALL_CLOSE, TOOL_CALL_OPEN
from service.models.template import HERMES, LLAMA_JSON

PYTHON_TAG = "<|python_tag|>"
# What comes before a call's JSON object, by tool format.
_CALL_PREFIX = {LLAMA_JSON: rf"(?:{regex.escape(PYTHON_TAG)}\s*)?", HERMES: rf"{regex.escape(TOOL_CALL_OPEN)}\s*"}
NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}  # OpenAI: no parameters means none


def tool_mode(req: chat_pb2.ChatCompletionRequest) -> str:
    """The effective tool_choice: "none", "auto", "required", or "function"."""
    if not req.HasField("tool_choice"):
        return "auto" if req.tools else "none"
    kind = req.tool_choice.WhichOneof("choice")
    return "function" if kind == "function" else req.tool_choice.mode


def _parameters(tool: chat_pb2.Tool) -> dict[str, Any]:
    if not tool.function.HasField("parameters"):
        return NO_PARAMETERS
    return plain_json(json_format.MessageToDict(tool.function.parameters))


def callable_tools(req: chat_pb2.ChatCompletionRequest,
                   violations: list[FieldViolation]) -> dict[str, dict[str, Any]]:
    """The tools the model may call, name to parameters schema; a bad schema is added to `violations`."""
    mode = tool_mode(req)
    if mode == "none":
        return {}
    out: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(req.tools):
        parameters, field = _parameters(tool), f"tools[{i}].function.parameters"
        if parameters.get("type", "object") != "object":
            violations.append(FieldViolation(field, "must be the JSON schema of an object (the arguments are an "
                                                    "object)"))
            continue
        problem = schema_problem(parameters)
        if problem:
            violations.append(FieldViolation(field, problem))
            continue
        if mode != "function" or tool.function.name == req.tool_choice.function.name:
            out[tool.function.name] = parameters
    return out


def _rebase_refs(value: Any, old: str, new: str) -> Any:
    if isinstance(value, dict):
        return {k: (new + v[len(old):] if k == "$ref" and isinstance(v, str) and v.startswith(old)
                    else _rebase_refs(v, old, new)) for k, v in value.items()}
    if isinstance(value, list):
        return [_rebase_refs(v, old, new) for v in value]
    return value


def call_schema(tools: dict[str, dict[str, Any]], tool_format: str) -> dict[str, Any]:
    """The JSON schema of one call of any of `tools`. Each tool's `$defs` (pydantic writes them) move to the
    root under a prefix, since a `#/$defs/...` reference means the root of the whole schema."""
    arguments = "arguments" if tool_format == HERMES else "parameters"
    branches, defs = [], {}
    for i, (name, parameters) in enumerate(tools.items()):
        parameters = dict(parameters)
        for key in ("$defs", "definitions"):
            for def_name, definition in (parameters.pop(key, None) or {}).items():
                defs[f"tool{i}_{def_name}"] = _rebase_refs(definition, f"#/{key}/", f"#/$defs/tool{i}_")
            parameters = _rebase_refs(parameters, f"#/{key}/", f"#/$defs/tool{i}_")
        branches.append({"type": "object", "properties": {"name": {"const": name}, arguments: parameters},
                         "required": ["name", arguments], "additionalProperties": False})
    schema: dict[str, Any] = branches[0] if len(branches) == 1 else {"anyOf": branches}
    if defs:
        schema = {**schema, "$defs": defs}
    return schema


def forced_call(tools: dict[str, dict[str, Any]], tool_format: str,
                violations: list[FieldViolation]) -> GuidedDecoding | None:
    """Decoding constrained to one call of one of `tools`, as the model's format writes it."""
    schema = call_schema(tools, tool_format)
    problem = schema_problem(schema)
    if problem:
        violations.append(FieldViolation("tools", problem))
        return None
    tags = (TOOL_CALL_OPEN, TOOL_CALL_CLOSE) if tool_format == HERMES else None
    return GuidedDecoding(json_schema=schema_json(schema), tags=tags)


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


class ToolCallParser:
    """One choice's text in, content or a tool call out, piece by piece.

    Text is held only while it could still be the opening of a call
    (`{"name": "<known tool>", "parameters": `, after `<tool_call>` in the
    "hermes" format); then the call starts and the arguments object streams
    through as it is written, up to its closing brace. An answer holds one
    call (Llama 3.1 makes one per turn), so what follows is dropped, the
    closing `</tool_call>` included.
    """

    def __init__(self, names: list[str], tool_format: str) -> None:
        alternatives = "|".join(regex.escape(n) for n in names)  # names are [a-zA-Z0-9_-]: no JSON escapes
        self._opening = regex.compile(
            rf'\s*{_CALL_PREFIX[tool_format]}\{{\s*"name"\s*:\s*"({alternatives})"\s*,\s*"(?:parameters|arguments)"\s*:\s*')
        self._held = ""
        self._state = "deciding" if names else "content"
        self._depth = 0
        self._in_string = False
        self._escaped = False
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
        if self._depth == 0:
            text = text.lstrip()  # between the opening's colon and the value
        for i, ch in enumerate(text):
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
                self._depth += 1
            elif ch in "}]":
                self._depth -= 1
                if self._depth <= 0:  # below 0: the call's own brace, after arguments that were not an object
                    self._state = "done"
                    end = i + 1 if self._depth == 0 else i
                    return [Arguments(text[:end])] if end else []
        return [Arguments(text)] if text else []


def add_to_message(message: chat_pb2.ChatMessage, pieces: list[Piece]) -> None:
    """A whole answer: its content, or its tool call (then no content, as OpenAI answers a call)."""
    start = next((p for p in pieces if isinstance(p, CallStart)), None)
    if start is None:
        message.content = "".join(p.text for p in pieces if isinstance(p, Content))
        return
    arguments = "".join(p.text for p in pieces if isinstance(p, Arguments))
    message.tool_calls.add(id=start.id, type="function",
                           function=chat_pb2.FunctionCall(name=start.name, arguments=arguments))


def add_to_delta(delta: chat_pb2.Delta, pieces: list[Piece]) -> None:
    """Stream pieces, OpenAI's way: a call's first delta has its id, type and name; argument fragments follow."""
    for piece in pieces:
        if isinstance(piece, Content):
            delta.content = delta.content + piece.text
        elif isinstance(piece, CallStart):
            delta.tool_calls.add(index=0, id=piece.id, type="function",
                                 function=chat_pb2.FunctionCall(name=piece.name, arguments=""))
        elif piece.text:
            last = delta.tool_calls[-1] if delta.tool_calls and not delta.tool_calls[-1].id else None
            if last is None:
                last = delta.tool_calls.add(index=0)
            last.function.arguments += piece.text
