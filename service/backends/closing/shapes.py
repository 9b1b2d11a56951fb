"""A JSON schema as the shapes xgrammar generates, each with its shortest value.

xgrammar (compact, strict mode) writes an object's properties in the schema's
order, required ones always, optional ones maybe, additional ones (when
allowed) only after the listed ones and never under a listed name; an array's
items with `, ` between them, as many as minItems/maxItems allow; enum and
const values as compact JSON. A node here mirrors one schema position under
those rules, and knows the shortest text that is a valid value there, so that
the tracker can say what closes any open document. Keywords xgrammar enforces
but this does not model raise Unsupported.
"""

from __future__ import annotations

import bisect
import json
from decimal import Decimal
from typing import Any

from service.backends.closing import Unsupported
from service.backends.closing.numbers import Range, completion
from service.backends.closing.regex import Nfa, nfa

IGNORED = {"title", "description", "default", "examples", "$schema", "$id", "$comment", "$anchor", "deprecated",
           "readOnly", "writeOnly", "$defs", "definitions", "contentMediaType", "contentEncoding"}
UNMODELED = ("format", "multipleOf", "patternProperties", "minProperties", "maxProperties", "not", "if", "then",
             "else", "dependentRequired", "dependentSchemas", "propertyNames", "unevaluatedProperties",
             "unevaluatedItems", "contains", "minContains", "maxContains", "uniqueItems", "additionalItems")
_TYPE_KEYWORDS = {
    "object": ("properties", "required", "additionalProperties"),
    "array": ("items", "prefixItems", "minItems", "maxItems"),
    "string": ("minLength", "maxLength", "pattern"),
    "number": ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"),
}


def compact(value: Any) -> bytes:
    """A JSON value as xgrammar writes an enum or const member."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


class Node:
    """One schema position; `options` are the shapes a value there may take (several for anyOf)."""

    shortest: bytes | None = None

    @property
    def options(self) -> tuple[Node, ...]:
        return (self,)


class AnyValue(Node):
    """Any JSON value (xgrammar's basic_any)."""


class Literals(Node):
    """One of a fixed set of texts: enum, const, booleans, null; a choice list, raw."""

    def __init__(self, texts: list[bytes]) -> None:
        self.texts = tuple(dict.fromkeys(texts))


class Number(Node):
    def __init__(self, range_: Range) -> None:
        self.range = range_


class String(Node):
    """A JSON string. Length-bounded strings admit no escapes (xgrammar's rule); a pattern is an NFA."""

    def __init__(self, min_len: int = 0, max_len: int | None = None, pattern: Nfa | None = None) -> None:
        self.min_len, self.max_len, self.nfa = min_len, max_len, pattern
        self.bounded = bool(min_len) or max_len is not None


class Regex(Node):
    """Raw text matching a regex (structured_outputs.regex): no quotes, no escapes."""

    def __init__(self, pattern: Nfa) -> None:
        self.nfa = pattern


class Union(Node):
    def __init__(self) -> None:
        self.alternatives: list[Node] = []

    @property
    def options(self) -> tuple[Node, ...]:
        return tuple(o for a in self.alternatives for o in a.options)


class Object(Node):
    """Listed properties in order, then additional ones (under any other name) when `additional` is set."""

    def __init__(self) -> None:
        self.names: list[bytes] = []       # each property's key as written: '"name"'
        self.index: dict[bytes, int] = {}  # key as written -> its position in names
        self.values: list[Node] = []
        self.required: list[bool] = []
        self.additional: Node | None = None
        self.extra_key = b'""'           # the shortest key that is no listed name
        self._candidates: dict[int, list[int]] = {}

    def value(self, j: int) -> Node | None:
        """Property j's schema; j == len(names) stands for an additional property."""
        return self.additional if j == len(self.names) else self.values[j]

    def entry(self, j: int) -> bytes:
        """Property j as the shortest `"key": value`."""
        return (self.extra_key if j == len(self.names) else self.names[j]) + b": " + _value(self.value(j))

    def _entry_len(self, j: int) -> float:
        node = self.value(j)
        return float("inf") if node is None or node.shortest is None else len(self.entry(j))

    def finish(self) -> None:
        """Suffix tables: `_rest[j+1]` is how many bytes close the object after property j (-1: none yet;
        len(names): after an additional one); `_next[k]` the cheapest property from k on that may come next,
        with its own rest (what a comma commits to)."""
        n = len(self.names)
        self._required_at = [k for k in range(n) if self.required[k]]
        rest = [1.0] * (n + 2)
        for j in range(n - 1, -1, -1):
            rest[j] = rest[j + 1] + (2 + self._entry_len(j) if self.required[j] else 0)
        self._rest = rest
        nxt: list[tuple[float, int]] = [(float("inf"), -1)] * (n + 1)
        if self.additional is not None:
            nxt[n] = (self._entry_len(n) + 1, n)
        for j in range(n - 1, -1, -1):
            own = (self._entry_len(j) + rest[j + 1], j)
            nxt[j] = own if self.required[j] else min(own, nxt[j + 1])
        self._next = nxt

    def rest_len(self, j: int) -> float:
        return self._rest[min(j, len(self.names)) + 1]

    def rest(self, j: int) -> bytes:
        start = bisect.bisect_right(self._required_at, j)
        return b"".join(b", " + self.entry(k) for k in self._required_at[start:]) + b"}"

    def opening_rest(self) -> bytes:
        return self.rest(-1)[2:] if any(self.required) else b"}"

    def opening_len(self) -> float:
        return self.rest_len(-1) - 2 if any(self.required) else 1

    def next_len(self, j: int) -> float:
        """Bytes that close the object after property j and a comma: the cheapest property that may follow."""
        return self._next[min(j + 1, len(self.names))][0]

    def next_entry(self, j: int) -> bytes:
        k = self._next[min(j + 1, len(self.names))][1]
        return self.entry(k) + self.rest(k)

    def candidates(self, j: int) -> list[int]:
        """The properties that may follow property j: listed ones up to the next required, or additional ones."""
        found = self._candidates.get(j)
        if found is not None:
            return found
        out = []
        for k in range(j + 1, len(self.names)):
            out.append(k)
            if self.required[k]:
                break
        else:
            if self.additional is not None:
                out.append(len(self.names))
        self._candidates[j] = out
        return out


class Array(Node):
    def __init__(self, prefix: list[Node], items: Node | None, min_items: int, max_items: int | None) -> None:
        self.prefix, self.items, self.min_items, self.max_items = prefix, items, min_items, max_items
        self._rest_lens: dict[int, int] = {}

    def item(self, i: int) -> Node:
        node = self.prefix[i] if i < len(self.prefix) else self.items
        if node is None:
            raise Unsupported("array item beyond prefixItems")
        return node

    def rest(self, count: int) -> bytes:
        """What closes the array once `count` items are written."""
        return b"".join(b", " + _value(self.item(i)) for i in range(count, self.min_items)) + b"]"

    def rest_len(self, count: int) -> int:
        if count >= self.min_items:
            return 1
        found = self._rest_lens.get(count)
        if found is None:
            found = self._rest_lens[count] = len(self.rest(count))
        return found

    def opening_rest(self) -> bytes:
        return self.rest(0)[2:] if self.min_items else b"]"


def _value(node: Node | None) -> bytes:
    if node is None or node.shortest is None:
        raise Unsupported("a schema with no finite value")
    return node.shortest


def _shortest(node: Node) -> bytes | None:
    if isinstance(node, AnyValue):
        return b"0"
    if isinstance(node, Literals):
        return min(node.texts, key=len) if node.texts else None
    if isinstance(node, Number):
        text = completion("", node.range)
        return text.encode() if text is not None else None
    if isinstance(node, String):
        inner = node.nfa.completion(node.nfa.start) if node.nfa else "a" * node.min_len
        return None if inner is None else b'"' + inner.encode() + b'"'
    if isinstance(node, Regex):
        text = node.nfa.completion(node.nfa.start)
        return text.encode() if text is not None else None
    if isinstance(node, Union):
        found = [o.shortest for o in node.alternatives if o.shortest is not None]
        return min(found, key=len) if found else None
    if isinstance(node, Object):
        parts = [node.names[j] + b": " + node.values[j].shortest for j in range(len(node.names))
                 if node.required[j] and node.values[j].shortest is not None]
        if len(parts) < sum(node.required):
            return None
        return b"{" + b", ".join(parts) + b"}"
    if isinstance(node, Array):
        items = [node.item(i).shortest for i in range(node.min_items)]
        return None if None in items else b"[" + b", ".join(items) + b"]"  # type: ignore[arg-type]
    raise TypeError(node)


def _children(node: Node) -> list[Node]:
    if isinstance(node, Union):
        return node.alternatives
    if isinstance(node, Object):
        return node.values + ([node.additional] if node.additional else [])
    if isinstance(node, Array):
        return node.prefix + ([node.items] if node.items else [])
    return []


def finish(root: Node) -> Node:
    """Fills every node's shortest value: children first, repeated while recursive schemas still improve."""
    order, seen, stack = [], set(), [(root, False)]
    while stack:
        node, done = stack.pop()
        if done:
            order.append(node)
        elif id(node) not in seen:
            seen.add(id(node))
            stack.append((node, True))
            stack += [(c, False) for c in _children(node)]
    changed = True
    while changed:
        changed = False
        for node in order:
            value = _shortest(node)
            if value is not None and (node.shortest is None or len(value) < len(node.shortest)):
                node.shortest, changed = value, True
    if root.shortest is None:
        raise Unsupported("the schema admits no finite document")
    for node in order:
        if isinstance(node, Object):
            node.finish()
    return root


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
