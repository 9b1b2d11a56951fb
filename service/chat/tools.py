"""Tool calls in the Llama 3.1 JSON form: the grammar that forces one, the parser that finds one.

Llama 3.1 and its Nemotron fine-tune are trained to call a tool by answering
`{"name": "<function>", "parameters": {...}}`, sometimes after
`<|python_tag|>`; their chat templates print past calls the same way. So:

- tool_choice "required" or a named function: decoding is constrained to
  exactly that object, by a JSON schema (one branch per allowed tool, its
  arguments valid against the tool's `parameters`);
- "auto": the model decides; an answer that is such an object naming a
  known tool, and nothing else, is a call (as Meta's reference code reads
  it); anything else is content;
- "none": tools never reach the prompt and nothing is parsed.

`ToolCallParser` turns a choice's text, fed as it streams, into content and
tool-call pieces. The unary answer and the stream use the same parser, so
they agree on what is a call and what its arguments are.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

import regex
from google.protobuf import json_format

from service.chat.schemas import plain_json, schema_problem
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
        self._depth = 0
        self._in_string = False
        self._escaped = False
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
            ch = self._held[i]
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
                if self._depth == 0:
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
