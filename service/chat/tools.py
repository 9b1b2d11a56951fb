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
- "auto": the model decides; for "llama-3.1-json" an answer that is one call
  object of an offered tool and nothing else is a call (as Meta's reference
  code reads it), for "hermes" an answer that opens with `<tool_call>` and a
  call of an offered tool; anything else is content;
- "none": tools never reach the prompt and nothing is parsed.

The parsers that read a call back out of an answer are in
service/chat/tool_parsers.py; `call_parser` picks the model's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from google.protobuf import json_format

from service.backends.base import GuidedDecoding
from service.chat.schemas import request_schema, schema_json, schema_problem, size_problem
from service.chat.tool_parsers import (
    Arguments,
    CallParser,
    CallStart,
    Content,
    HermesParser,
    Llama31JsonParser,
    Piece,
)
from service.errors import FieldViolation
from service.gen.llmserve.v1 import chat_pb2
from service.models.hermes import TOOL_CALL_CLOSE, TOOL_CALL_OPEN
from service.models.template import HERMES

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


def tool_parameters(tools: Sequence[chat_pb2.Tool], violations: list[FieldViolation]) -> list[dict[str, Any] | None]:
    """Each tool's parameters schema, in the order its arguments are written (see service/chat/schemas.py), or
    None for one that is bad (added to `violations`)."""
    out: list[dict[str, Any] | None] = []
    for i, tool in enumerate(tools):
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


def offered_tools(tools: Sequence[chat_pb2.Tool],
                  parameters: list[dict[str, Any] | None]) -> list[dict[str, Any]] | None:
    """The tools as the chat template renders them (OpenAI's JSON form), their parameters in the order the
    arguments are written: the same tools always make the same prompt, token for token. None for no tools."""
    out = []
    for tool, schema in zip(tools, parameters, strict=True):
        rendered = json_format.MessageToDict(tool, preserving_proto_field_name=True)
        function = rendered.setdefault("function", {})
        function.pop("parameters_json", None)
        if schema is not None and (tool.function.HasField("parameters") or tool.function.parameters_json):
            function["parameters"] = schema
        out.append(rendered)
    return out or None


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


def forced_call(tools: dict[str, dict[str, Any]], tool_format: str, max_bytes: int,
                violations: list[FieldViolation]) -> GuidedDecoding | None:
    """Decoding constrained to one call of one of `tools`, as the model's format writes it."""
    schema = call_schema(tools, tool_format)
    text = schema_json(schema)
    problem = size_problem(text, max_bytes) or schema_problem(schema)
    if problem:
        violations.append(FieldViolation("tools", problem))
        return None
    tags = (TOOL_CALL_OPEN, TOOL_CALL_CLOSE) if tool_format == HERMES else None
    return GuidedDecoding(json_schema=text, tags=tags, field="tools")


def call_parser(names: list[str], tool_format: str) -> CallParser:
    """The parser for answers of a model with this tool format that may call `names` (none: never a call)."""
    return HermesParser(names) if tool_format == HERMES else Llama31JsonParser(names)


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
