"""JSON schemas a request constrains its output with: checked before any engine sees them.

Response formats and tool parameters arrive as protobuf Structs; a schema is
valid only if it is a JSON schema (jsonschema's own check) that xgrammar can
compile and enforce, so that "valid against the schema" stays a promise
whichever engine serves the model. Keywords xgrammar accepts but does not
enforce are refused rather than silently ignored.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any

import jsonschema
import xgrammar as xgr

COMPILE_CHECK_CACHE_SIZE = 256  # schemas: the tokenizer-free check is repeated for every request otherwise
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


def schema_problem(schema: dict[str, Any]) -> str | None:
    """Why the schema cannot constrain decoding, or None when it can."""
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
    problem = _uncompilable(schema_json(schema))
    return f"unsupported JSON schema: {problem}" if problem else None


def schema_json(schema: dict[str, Any]) -> str:
    """The text engines compile: the schema's keys in the order they were given."""
    return json.dumps(schema)


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


@functools.lru_cache(maxsize=COMPILE_CHECK_CACHE_SIZE)
def _uncompilable(text: str) -> str | None:
    """xgrammar's objection to the schema, if any; tokenizer-free, so the serving layer can ask it."""
    try:
        xgr.Grammar.from_json_schema(text, any_whitespace=False)
    except (RuntimeError, ValueError, TypeError) as e:
        return _XGRAMMAR_LOCATION.sub("", str(e).strip().splitlines()[-1]) if str(e).strip() else type(e).__name__
    return None
