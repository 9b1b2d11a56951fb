"""Tool calls in the Llama 3.1 JSON form: the grammar that forces one, the parser that finds one.

Llama 3.1 and its Nemotron fine-tune are trained to call a tool by answering
`{"name": "<function>", "parameters": {...}}`, sometimes after
`<|python_tag|>`; their chat templates print past calls the same way. So:

- tool_choice "required" or a named function: decoding is constrained to
  exactly that object, by a JSON schema (one branch per allowed tool, its
  arguments valid against the tool's `parameters`);
- "auto": the model decides; an answer that opens with such an object naming
  a known tool is a call, anything else is content;
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

from service.chat.schemas import request_schema, schema_problem
from service.errors import FieldViolation
from service.gen.llmserve.v1 import chat_pb2

PYTHON_TAG = "<|python_tag|>"
NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}  # OpenAI: no parameters means none


def tool_mode(req: chat_pb2.ChatCompletionRequest) -> str:
    """The effective tool_choice: "none", "auto", "required", or "function"."""
    if not req.HasField("tool_choice"):
        return "auto" if req.tools else "none"
    kind = req.tool_choice.WhichOneof("choice")
    return "function" if kind == "function" else req.tool_choice.mode


def _parameters(tool: chat_pb2.Tool, field: str,
                violations: list[FieldViolation]) -> tuple[dict[str, Any] | None, str]:
    function = tool.function
    if not function.HasField("parameters") and not function.parameters_json:
        return NO_PARAMETERS, field
    return request_schema(function.parameters if function.HasField("parameters") else None,
                          function.parameters_json, field, violations)


def tool_parameters(req: chat_pb2.ChatCompletionRequest,
                    violations: list[FieldViolation]) -> list[dict[str, Any] | None]:
    """Each tool's parameters schema, in the order its arguments are written (see service/chat/schemas.py); None
    for one that is bad (added to `violations`), and for every tool when tool_choice is "none"."""
    if tool_mode(req) == "none":
        return [None] * len(req.tools)
    out: list[dict[str, Any] | None] = []
    for i, tool in enumerate(req.tools):
        parameters, field = _parameters(tool, f"tools[{i}].function.parameters", violations)
        problem = None
        if parameters is not None and parameters.get("type", "object") != "object":
            problem = "must be the JSON schema of an object (the arguments are an object)"
        elif parameters is not None:
            problem = schema_problem(parameters)
        if problem:
            violations.append(FieldViolation(field, problem))
        out.append(None if problem else parameters)
    return out


def callable_tools(req: chat_pb2.ChatCompletionRequest,
                   parameters: list[dict[str, Any] | None]) -> dict[str, dict[str, Any]]:
    """The tools the model may call, name to parameters schema."""
    named = req.tool_choice.function.name if tool_mode(req) == "function" else None
    return {t.function.name: p for t, p in zip(req.tools, parameters, strict=True)
            if p is not None and named in (None, t.function.name)}


def offered_tools(req: chat_pb2.ChatCompletionRequest,
                  parameters: list[dict[str, Any] | None]) -> list[dict[str, Any]] | None:
    """The tools as the chat template renders them, their parameters in the same order as the arguments."""
    if not req.tools or tool_mode(req) == "none":
        return None
    out = []
    for tool, schema in zip(req.tools, parameters, strict=True):
        rendered = json_format.MessageToDict(tool, preserving_proto_field_name=True)
        function = rendered.setdefault("function", {})
        function.pop("parameters_json", None)
        if schema is not None and (tool.function.HasField("parameters") or tool.function.parameters_json):
            function["parameters"] = schema
        out.append(rendered)
    return out


def _rebase_refs(value: Any, old: str, new: str) -> Any:
    if isinstance(value, dict):
        return {k: (new + v[len(old):] if k == "$ref" and isinstance(v, str) and v.startswith(old)
                    else _rebase_refs(v, old, new)) for k, v in value.items()}
    if isinstance(value, list):
        return [_rebase_refs(v, old, new) for v in value]
    return value


def call_schema(tools: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The JSON schema of one call of any of `tools`. Each tool's `$defs` (pydantic writes them) move to the
    root under a prefix, since a `#/$defs/...` reference means the root of the whole schema."""
    branches, defs = [], {}
    for i, (name, parameters) in enumerate(tools.items()):
        parameters = dict(parameters)
        for key in ("$defs", "definitions"):
            for def_name, definition in (parameters.pop(key, None) or {}).items():
                defs[f"tool{i}_{def_name}"] = _rebase_refs(definition, f"#/{key}/", f"#/$defs/tool{i}_")
            parameters = _rebase_refs(parameters, f"#/{key}/", f"#/$defs/tool{i}_")
        branches.append({"type": "object", "properties": {"name": {"const": name}, "parameters": parameters},
                         "required": ["name", "parameters"], "additionalProperties": False})
    schema: dict[str, Any] = branches[0] if len(branches) == 1 else {"anyOf": branches}
    if defs:
        schema = {**schema, "$defs": defs}
    return schema


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
    (`{"name": "<known tool>", "parameters": `); then the call starts and the
    arguments object streams through as it is written, up to its closing
    brace. Llama 3.1 makes one call per turn, so what follows is dropped.
    """

    def __init__(self, names: list[str]) -> None:
        alternatives = "|".join(regex.escape(n) for n in names)  # names are [a-zA-Z0-9_-]: no JSON escapes
        self._opening = regex.compile(
            rf'\s*(?:{regex.escape(PYTHON_TAG)}\s*)?\{{\s*"name"\s*:\s*"({alternatives})"\s*,\s*'
            rf'"(?:parameters|arguments)"\s*:\s*')
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
