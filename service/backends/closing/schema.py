"""A JSON schema read into shapes (shapes.py), or Unsupported where it uses what they do not model.

Keywords that only describe (title, description, $defs...) are ignored, as
xgrammar ignores them; keywords that constrain but are not modelled here
(`format`, `multipleOf`, ...) make the whole schema Unsupported, so that a
closing is never guessed for them.
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

from service.backends.closing import Unsupported
from service.backends.closing.numbers import Range
from service.backends.closing.regex import nfa
from service.backends.closing.shapes import (
    AnyValue,
    Array,
    Literals,
    Node,
    Number,
    Object,
    Regex,
    String,
    Tagged,
    Union,
    compact,
    finish,
)

UNMODELED = ("format", "multipleOf", "patternProperties", "minProperties", "maxProperties", "not", "if", "then",
             "else", "dependentRequired", "dependentSchemas", "propertyNames", "unevaluatedProperties",
             "unevaluatedItems", "contains", "minContains", "maxContains", "uniqueItems", "additionalItems")
_TYPE_KEYWORDS = {
    "object": ("properties", "required", "additionalProperties"),
    "array": ("items", "prefixItems", "minItems", "maxItems"),
    "string": ("minLength", "maxLength", "pattern"),
    "number": ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"),
}



class _Builder:
    def __init__(self, root: dict[str, Any]) -> None:
        self.root = root
        self.nodes: dict[int, Node] = {}

    def resolve(self, ref: str) -> Any:
        if not ref.startswith("#"):
            raise Unsupported(f"$ref {ref!r}")
        target: Any = self.root
        for part in [p for p in ref[1:].split("/") if p]:
            part = part.replace("~1", "/").replace("~0", "~")
            target = target[int(part)] if isinstance(target, list) else target.get(part)
            if target is None:
                raise Unsupported(f"$ref {ref!r}")
        return target

    def build(self, schema: Any) -> Node:
        if schema is True or schema == {}:
            return AnyValue()
        if not isinstance(schema, dict):
            raise Unsupported("a schema that is not an object")
        known = self.nodes.get(id(schema))
        if known is not None:
            return known
        for keyword in UNMODELED:
            if keyword in schema and schema[keyword] is not False:
                raise Unsupported(keyword)
        if "$ref" in schema:
            node = self.nodes[id(schema)] = Union()
            node.alternatives.append(self.build(self.resolve(schema["$ref"])))
            return node
        if "enum" in schema or "const" in schema:
            values = schema["enum"] if "enum" in schema else [schema["const"]]
            node = self.nodes[id(schema)] = Literals([compact(v) for v in values])
            return node
        branches = schema.get("anyOf") or schema.get("oneOf") or schema.get("allOf")
        if branches is not None:
            if "allOf" in schema and len(branches) != 1:
                raise Unsupported("allOf")
            node = self.nodes[id(schema)] = Union()
            node.alternatives += [self.build(b) for b in branches]
            return node
        types = schema.get("type")
        if types is None:
            types = [t for t, keys in _TYPE_KEYWORDS.items() if any(k in schema for k in keys)] or None
            if types is None:
                return AnyValue()
        if isinstance(types, list):
            node = self.nodes[id(schema)] = Union()
            node.alternatives += [self.typed(t, schema) for t in types]
            return node
        node = self.nodes[id(schema)] = self.typed(types, schema)
        return node

    def typed(self, kind: str, schema: dict[str, Any]) -> Node:
        if kind in ("boolean", "null"):
            return Literals([b"true", b"false"] if kind == "boolean" else [b"null"])
        if kind in ("integer", "number"):
            return Number(_range(kind == "integer", schema))
        if kind == "string":
            if "pattern" in schema and ("minLength" in schema or "maxLength" in schema):
                raise Unsupported("pattern with a length")
            pattern = nfa(schema["pattern"], json_string=True) if "pattern" in schema else None
            return String(int(schema.get("minLength", 0)), schema.get("maxLength"), pattern)
        if kind == "array":
            return self.array(schema)
        if kind == "object":
            return self.object(schema)
        raise Unsupported(f"type {kind!r}")

    def array(self, schema: dict[str, Any]) -> Node:
        prefix = [self.build(s) for s in schema.get("prefixItems", [])]
        items = schema.get("items", None if prefix else True)
        node = Array(prefix, None if items is False or items is None else self.build(items),
                     int(schema.get("minItems", 0)), schema.get("maxItems"))
        return node

    def object(self, schema: dict[str, Any]) -> Node:
        node = Object()
        self.nodes[id(schema)] = node
        properties = schema.get("properties")
        required = set(schema.get("required", []))
        if required - set(properties or {}):
            raise Unsupported("a required property that is not listed")
        extra = schema.get("additionalProperties", properties is None)
        for name, sub in (properties or {}).items():
            node.index[json.dumps(name, ensure_ascii=False).encode()] = len(node.names)
            node.names.append(json.dumps(name, ensure_ascii=False).encode())
            node.values.append(self.build(sub))
            node.required.append(name in required)
        if extra is not False:
            node.additional = self.build(extra)
            key = ""
            while json.dumps(key, ensure_ascii=False).encode() in node.names:
                key += "a"
            node.extra_key = json.dumps(key).encode()
        return node


def _range(integer: bool, schema: dict[str, Any]) -> Range:
    def bound(name: str) -> Decimal | None:
        value = schema.get(name)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise Unsupported(name)
        return Decimal(str(value))

    lo, lo_x = (bound("exclusiveMinimum"), True) if "exclusiveMinimum" in schema else (bound("minimum"), False)
    hi, hi_x = (bound("exclusiveMaximum"), True) if "exclusiveMaximum" in schema else (bound("maximum"), False)
    if ("minimum" in schema and "exclusiveMinimum" in schema) or ("maximum" in schema and "exclusiveMaximum" in schema):
        raise Unsupported("both a minimum and an exclusive one")
    return Range(integer, lo, lo_x, hi, hi_x)


def json_shape(schema: dict[str, Any]) -> Node:
    """The shapes of a JSON schema, finished. Raises Unsupported."""
    return finish(_Builder(schema).build(schema))


def regex_shape(pattern: str) -> Node:
    return finish(Regex(nfa(pattern, json_string=False)))


def choice_shape(choices: tuple[str, ...]) -> Node:
    return finish(Literals([c.encode() for c in choices]))


def tagged_shape(before: str, value: Node, after: str) -> Node:
    """A JSON value's shapes between two fixed texts (service.backends.base.GuidedDecoding.tags)."""
    return finish(Tagged(before.encode(), value, after.encode()))
