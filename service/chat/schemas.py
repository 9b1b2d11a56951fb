"""Constraints a request puts on its output (JSON schemas, regexes, grammars), checked before any engine sees them.

Response formats and tool parameters arrive as protobuf Structs, as JSON text
(`schema_json`, `parameters_json`: the REST shim fills them from the body), or
both. The text keeps the order the client wrote, which is the order the output
writes an object's keys in; a Struct keeps none (upb iterates its map in an
order that changes with every process), so a Struct alone gets one fixed
order: each object's required properties first, in `required` order, then the
others sorted by name, and every other key sorted. The same request then gives
the same output on every server, through either front door.

A schema is valid only if it is a JSON schema (jsonschema's own check) that
xgrammar can compile and enforce, so that "valid against the schema" stays a
promise whichever engine serves the model. Keywords xgrammar accepts but does
not enforce are refused rather than silently ignored.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any

import jsonschema
import xgrammar as xgr
from google.protobuf import json_format, struct_pb2

from service.errors import FieldViolation

COMPILE_CHECK_CACHE_SIZE = 256  # constraints: the tokenizer-free check is repeated for every request otherwise
# Keywords xgrammar accepts but does not enforce: refused, so that "valid against the schema" stays a promise.
UNENFORCED = ("uniqueItems", "contains", "minContains", "maxContains", "dependentRequired", "dependentSchemas",
              "propertyNames", "unevaluatedItems")
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LISTS = ("anyOf", "allOf", "oneOf", "prefixItems")
_SCHEMA_VALUES = ("items", "additionalProperties", "not", "if", "then", "else", "contains", "propertyNames",
                  "unevaluatedItems", "unevaluatedProperties", "additionalItems")
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


def _sorted(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _sorted(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [_sorted(v) for v in value]
    return value


def ordered(schema: Any) -> Any:
    """A schema whose key order was lost, in the fixed order: required properties first (in `required` order),
    then the other properties by name; every other object's keys sorted."""
    if not isinstance(schema, dict):
        return _sorted(schema)
    out: dict[str, Any] = {}
    for key in sorted(schema):
        value = schema[key]
        if key == "properties" and isinstance(value, dict):
            required = [n for n in schema.get("required", []) if isinstance(n, str) and n in value]
            names = list(dict.fromkeys(required)) + sorted(set(value) - set(required))
            out[key] = {name: ordered(value[name]) for name in names}
        elif key in _SCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: ordered(value[name]) for name in sorted(value)}
        elif key in _SCHEMA_LISTS and isinstance(value, list):
            out[key] = [ordered(v) for v in value]
        elif key in _SCHEMA_VALUES:
            out[key] = ordered(value)
        else:
            out[key] = _sorted(value)
    return out


def request_schema(struct: struct_pb2.Struct | None, text: str, field: str,
                   violations: list[FieldViolation]) -> tuple[dict[str, Any] | None, str]:
    """The schema a request gives as a Struct (at `field`), as JSON text (at `field` + "_json"), or as both, in the
    order its output follows; and the field its problems are reported on (the Struct's, when there is one)."""
    text_field = field + "_json"
    parsed = None
    if text:
        if not text.lstrip(" \t\n\r").startswith("{"):
            return None, text_field  # not an object: the contract's annotation said so already
        try:
            parsed = plain_json(json.loads(text))
        except (ValueError, RecursionError) as e:
            violations.append(FieldViolation(text_field, f"not valid JSON: {e}"))
            return None, text_field
    if struct is None:
        return parsed, text_field
    given = plain_json(json_format.MessageToDict(struct))
    if parsed is None:
        return ordered(given), field
    if given != parsed:
        violations.append(FieldViolation(text_field, f"is not the same schema as {field.rsplit('.', 1)[-1]}; "
                                                     "send one of them, or the same schema in both"))
        return None, field
    return parsed, field


def size_problem(text: str, max_bytes: int) -> str | None:
    """A schema past the operator's size limit: what bounds how long it compiles and how much memory that takes."""
    size = len(text.encode())
    return f"at most {max_bytes} bytes (--max-schema-bytes), got {size}" if size > max_bytes else None


def schema_problem(schema: dict[str, Any]) -> str | None:
    """Why the schema cannot constrain decoding, or None when it can (remembered: the checks of a schema of
    thousands of properties take seconds)."""
    return _schema_problem(schema_json(schema))


@functools.lru_cache(maxsize=COMPILE_CHECK_CACHE_SIZE)
def _schema_problem(text: str) -> str | None:
    schema = json.loads(text)
    if not isinstance(schema.get("$schema", ""), str):
        return "not a valid JSON schema: $schema must be a URI"
    try:
        jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator).check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "/".join(str(p) for p in e.absolute_path)
        return f"not a valid JSON schema{f' at /{where}' if where else ''}: {e.message}"
    unenforced = _unenforced(schema, "")
    if unenforced:
        return f"unsupported JSON schema: {unenforced} cannot be enforced while decoding"
    problem = _uncompilable("json", schema_json(schema))
    return f"unsupported JSON schema: {problem}" if problem else None


def grammar_problem(kind: str, text: str) -> str | None:
    """Why a regex ("regex") or an EBNF grammar ("ebnf") cannot constrain decoding, or None when it can."""
    problem = _uncompilable(kind, text)
    return f"not a valid {'regular expression' if kind == 'regex' else 'grammar'}: {problem}" if problem else None


def schema_json(schema: dict[str, Any]) -> str:
    """The text engines compile: the schema's keys in the order they were given."""
    return json.dumps(schema)


def _unenforced(schema: Any, path: str) -> str | None:
    """The first keyword xgrammar would not enforce, as `/path/keyword`; property names are data, not keywords."""
    if isinstance(schema, list):
        return next((found for i, sub in enumerate(schema) if (found := _unenforced(sub, f"{path}/{i}"))), None)
    if not isinstance(schema, dict):
        return None
    if "pattern" in schema and ("minLength" in schema or "maxLength" in schema):  # xgrammar drops the lengths
        return f"{path}/{'minLength' if 'minLength' in schema else 'maxLength'} (beside a pattern)"
    for key, value in schema.items():
        merged = key == "allOf" and isinstance(value, list) and len(value) > 1  # xgrammar drops such an allOf
        if (key in UNENFORCED and value is not False) or merged:
            return f"{path}/{key}"
        subs = value.items() if key in _SCHEMA_MAPS and isinstance(value, dict) else [("", value)]
        for name, sub in subs:
            found = _unenforced(sub, f"{path}/{key}/{name}" if name else f"{path}/{key}")
            if found:
                return found
    return None


@functools.lru_cache(maxsize=COMPILE_CHECK_CACHE_SIZE)
def _uncompilable(kind: str, text: str) -> str | None:
    """xgrammar's objection to a constraint, if any; tokenizer-free, so the serving layer can ask it."""
    try:
        if kind == "json":
            xgr.Grammar.from_json_schema(text, any_whitespace=False)
        elif kind == "regex":
            xgr.Grammar.from_regex(text)
        else:
            xgr.Grammar.from_ebnf(text)
    except (RuntimeError, ValueError, TypeError) as e:
        return _XGRAMMAR_LOCATION.sub("", str(e).strip().splitlines()[-1]) if str(e).strip() else type(e).__name__
    return None
