"""A JSON schema as the shapes xgrammar generates, each with its shortest value.

xgrammar (compact, strict mode) writes an object's properties in the schema's
order, required ones always, optional ones maybe, additional ones (when
allowed) only after the listed ones and never under a listed name; an array's
items with `, ` between them, as many as minItems/maxItems allow; enum and
const values as compact JSON. A node here mirrors one schema position under
those rules, and knows the shortest text that is a valid value there, so that
the tracker can say what closes any open document. schema.py reads a JSON
schema into these.
"""

from __future__ import annotations

import bisect
import json
from typing import Any

from service.backends.closing import Unsupported
from service.backends.closing.numbers import Range, completion
from service.backends.closing.regex import Nfa


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


class Tagged(Node):
    """A JSON value between two fixed texts: a Hermes-style tool call between `<tool_call>` and `</tool_call>`."""

    def __init__(self, before: bytes, value: Node, after: bytes) -> None:
        self.before, self.value, self.after = before, value, after


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
    if isinstance(node, Tagged):
        return None if node.value.shortest is None else node.before + node.value.shortest + node.after
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
    if isinstance(node, Tagged):
        return [node.value]
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
