"""OpenAI's chat-completion JSON -> the contract's ChatCompletionRequest.

OpenAI's schema has unions the contract spells one way (`stop` as a string or a
list, `tool_choice` and `function_call` as a string or an object, message
`content` as a string or text parts); they are normalised first. Lists longer
than the contract allows are refused before anything walks them. Then every
key is checked against the contract's own descriptor, so an unknown field is
named with its path (`messages[0].rol`) instead of being dropped silently, a
JSON null means "unset", and a value of the wrong JSON type (or a string that
is not UTF-8, a lone surrogate) is named precisely; json_format.ParseDict does
the conversion itself. Schemas also travel as their JSON text (schema_json,
parameters_json), which keeps the client's key order. Ranges and cross-field
rules are not checked here: the
request then goes through the same validation as a gRPC request.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from service.errors import FieldViolation, ServiceError
from service.gen.buf.validate import validate_pb2
from service.gen.llmserve.v1 import chat_pb2

log = logging.getLogger("llmserve.rest.request")

_JSON_VALUES = {"google.protobuf.Struct", "google.protobuf.Value", "google.protobuf.ListValue"}
_SCALARS: dict[int, tuple[tuple[type, ...], str]] = {
    FieldDescriptor.CPPTYPE_STRING: ((str,), "a string"),
    FieldDescriptor.CPPTYPE_BOOL: ((bool,), "a boolean"),
    **{t: ((int, float), "a number") for t in (
        FieldDescriptor.CPPTYPE_INT32, FieldDescriptor.CPPTYPE_INT64, FieldDescriptor.CPPTYPE_UINT32,
        FieldDescriptor.CPPTYPE_UINT64, FieldDescriptor.CPPTYPE_DOUBLE, FieldDescriptor.CPPTYPE_FLOAT)},
}
_PARSE_ERROR_PATH = re.compile(r'at "?ChatCompletionRequest\.([\w.\[\]]*\w\]?)')
_PARSE_ERROR_FIELD = re.compile(r"Failed to parse (\w+) field")


@dataclass
class ParsedChat:
    request: chat_pb2.ChatCompletionRequest
    stream: bool = False
    ignored: list[str] = field(default_factory=list)  # unknown fields dropped under --ignore-unknown-fields


def _json_type(value: Any) -> str:
    return "null" if value is None else {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}.get(
        type(value), "a number")


def decode_json(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ServiceError.invalid_field("body", f"not valid JSON: {e}") from None
    except RecursionError:
        raise ServiceError.invalid_field("body", "JSON nested too deeply") from None
    if not isinstance(body, dict):
        raise ServiceError.invalid_field("body", f"must be a JSON object, got {_json_type(body)}")
    return body


class _Walker:
    """Checks a JSON object against a message descriptor, collecting every problem with its path."""

    def __init__(self) -> None:
        self.violations: list[FieldViolation] = []
        self.unknown: list[str] = []

    def message(self, value: dict[str, Any], desc: Descriptor, prefix: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, item in value.items():
            if item is None:
                continue
            fd = desc.fields_by_name.get(key)
            if fd is None:
                self.unknown.append(prefix + key)
                continue
            path = prefix + key
            if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
                out[key] = self.map(item, fd.message_type.fields_by_name["value"], path)
            elif fd.is_repeated:
                if not isinstance(item, list):
                    self.violations.append(FieldViolation(path, f"must be an array, got {_json_type(item)}"))
                    continue
                out[key] = [self.value(v, fd, f"{path}[{i}]") for i, v in enumerate(item)]
            else:
                out[key] = self.value(item, fd, path)
        return out

    def map(self, item: Any, value_fd: FieldDescriptor, path: str) -> Any:
        """A JSON object whose keys are the map's keys (ParseDict checks that they parse as the key type)."""
        if not isinstance(item, dict):
            self.violations.append(FieldViolation(path, f"must be an object, got {_json_type(item)}"))
            return {}
        return {k: self.value(v, value_fd, f"{path}[{k}]") for k, v in item.items()}

    def value(self, item: Any, fd: FieldDescriptor, path: str) -> Any:
        if fd.message_type is not None:
            if fd.message_type.full_name in _JSON_VALUES:
                return item
            if not isinstance(item, dict):
                self.violations.append(FieldViolation(path, f"must be an object, got {_json_type(item)}"))
                return {}
            return self.message(item, fd.message_type, path + ".")
        kinds, name = _SCALARS[fd.cpp_type]
        if not isinstance(item, kinds) or (isinstance(item, bool) and bool not in kinds):
            self.violations.append(FieldViolation(path, f"must be {name}, got {_json_type(item)}"))
        elif isinstance(item, str) and not _is_utf8(item):
            self.violations.append(FieldViolation(path, "not valid Unicode: a lone surrogate (\\ud800-\\udfff)"))
        return item


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _max_items(fd: FieldDescriptor) -> int:
    rules = fd.GetOptions().Extensions[validate_pb2.field]
    return rules.repeated.max_items if rules.HasField("repeated") else 0


_BOUNDED_LISTS = {fd.name: bound for fd in chat_pb2.ChatCompletionRequest.DESCRIPTOR.fields
                  if fd.is_repeated and (bound := _max_items(fd))}


def _too_long_lists(body: dict[str, Any]) -> list[FieldViolation]:
    """Lists past the contract's max_items (800,000 stop strings), refused before any per-item work."""
    return [FieldViolation(name, f"at most {bound} items, got {len(value)}")
            for name, bound in _BOUNDED_LISTS.items()
            if isinstance(value := body.get(name), list) and len(value) > bound]


def _content_text(content: Any, path: str, violations: list[FieldViolation]) -> Any:
    """OpenAI's content parts, joined with newlines (as vLLM does); only text parts have meaning for these models."""
    if not isinstance(content, list):
        return content
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            violations.append(FieldViolation(f"{path}[{j}].type", f"only text parts are supported, got {kind!r}"))
            continue
        texts.append(part["text"])
    return "\n".join(texts)


def _normalise(body: dict[str, Any], violations: list[FieldViolation]) -> dict[str, Any]:
    body = dict(body)
    if isinstance(body.get("stop"), str):
        body["stop"] = [body["stop"]]
    if isinstance(body.get("tool_choice"), str):
        body["tool_choice"] = {"mode": body["tool_choice"]}
    legacy = body.get("function_call")
    if isinstance(legacy, str):
        body["function_call"] = {"mode": legacy}
    elif isinstance(legacy, dict) and set(legacy) == {"name"}:
        body["function_call"] = {"function": legacy}
    messages = body.get("messages")
    if isinstance(messages, list):
        body["messages"] = [
            {**m, "content": _content_text(m.get("content"), f"messages[{i}].content", violations)}
            if isinstance(m, dict) and "content" in m else m
            for i, m in enumerate(messages)
        ]
    return body


def _verbatim_schemas(body: dict[str, Any]) -> None:
    """Each schema also as its JSON text, in the order the client wrote it: a Struct keeps none, and the output
    writes keys in the schema's order (see service/chat/schemas.py)."""
    fmt = body.get("response_format")
    given = fmt.get("json_schema") if isinstance(fmt, dict) else None
    if isinstance(given, dict) and isinstance(given.get("schema"), dict) and "schema_json" not in given:
        given["schema_json"] = json.dumps(given["schema"])
    for tool in body.get("tools") or []:
        function = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(function, dict) and isinstance(function.get("parameters"), dict) and \
                "parameters_json" not in function:
            function["parameters_json"] = json.dumps(function["parameters"])


def _parse_error_field(message: str) -> str:
    found = _PARSE_ERROR_PATH.search(message) or _PARSE_ERROR_FIELD.search(message)
    return found.group(1) if found else "body"


def parse_chat(body: dict[str, Any], ignore_unknown: bool) -> ParsedChat:
    """Raises ServiceError(INVALID_ARGUMENT) naming every unknown or mistyped field."""
    violations: list[FieldViolation] = []
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        violations.append(FieldViolation("stream", f"must be a boolean, got {_json_type(stream)}"))
    too_long = _too_long_lists(body)
    if too_long:
        raise ServiceError.invalid(too_long)
    body = _normalise({k: v for k, v in body.items() if k != "stream"}, violations)
    walker = _Walker()
    checked = walker.message(body, chat_pb2.ChatCompletionRequest.DESCRIPTOR, "")
    if walker.unknown and ignore_unknown:
        log.warning("ignored unknown request fields", extra={"fields": walker.unknown})
    elif walker.unknown:
        violations = [FieldViolation(path, "unknown field (the server can be started with --ignore-unknown-fields)")
                      for path in walker.unknown] + violations
    violations += walker.violations
    if violations:
        raise ServiceError.invalid(violations)
    _verbatim_schemas(checked)
    try:
        request = json_format.ParseDict(checked, chat_pb2.ChatCompletionRequest())
    except json_format.ParseError as e:
        raise ServiceError.invalid_field(_parse_error_field(str(e)), str(e)) from None
    return ParsedChat(request, bool(stream), walker.unknown if ignore_unknown else [])


def parse_dataoorts(body: dict[str, Any], ignore_unknown: bool) -> ParsedChat:
    """`{"model": ..., "data": {messages, temperature, ...}}`: the data object is a chat request without model."""
    data = body.get("data")
    if not isinstance(data, dict):
        raise ServiceError.invalid_field("data", f"must be an object, got {_json_type(data)}")
    extra = [FieldViolation(k, "unknown field") for k in body if k not in ("model", "data")]
    if extra and not ignore_unknown:
        raise ServiceError.invalid(extra)
    parsed = parse_chat({**data, "model": body.get("model")}, ignore_unknown)
    if parsed.stream:
        raise ServiceError.invalid_field("data.stream", "not supported on /api/v1; use /v1/chat/completions")
    return parsed
