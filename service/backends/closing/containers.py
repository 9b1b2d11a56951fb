"""Frames for objects and arrays: where in the object (before a key, in one, after it, in its value) or the
array a byte leaves the output, and what closes it from there under xgrammar's order of properties."""

from __future__ import annotations

from service.backends.closing.chars import finish_char, utf8_len
from service.backends.closing.shapes import Array, Node, Object, Tagged
from service.backends.closing.stack import INF, Entry, Frame, pop, push, same

OPEN, KEY, COLON, BLANK, EXPECT, VALUE, AFTER, COMMA = range(8)


class ObjectFrame(Frame):
    """`j` is the property last written (or being written); -1 before the first, len(names) once additional."""

    __slots__ = ("_len", "esc", "j", "key", "node", "phase")

    def __init__(self, node: Object, phase: int, j: int, key: bytes = b"", esc: int = 0) -> None:
        """`key`: an open key's bytes so far; `esc`: in a key, -1 right after a backslash, else the hex digits of
        a \\u escape still to come; after a comma (COMMA), 1 or 2 bytes of ", " written."""
        self.node, self.phase, self.j, self.key, self.esc = node, phase, j, key, esc
        self._len: float | None = None

    def _value_node(self) -> Node:
        return self.node.value(self.j)  # type: ignore[return-value]

    def feed(self, b: int, e: Entry) -> list[Entry]:
        node, phase = self.node, self.phase
        if phase == KEY:
            if self.esc:
                esc = 4 if self.esc == -1 and b == 0x75 else 0 if self.esc == -1 else self.esc - 1
                return same(e, ObjectFrame(node, KEY, self.j, self.key + bytes([b]), esc))
            if b == 0x22:
                k = self._property(b'"' + self.key + b'"')
                return [] if k is None else same(e, ObjectFrame(node, COLON, k))
            return same(e, ObjectFrame(node, KEY, self.j, self.key + bytes([b]), -1 if b == 0x5C else 0))
        if phase == EXPECT:
            return push(e, ObjectFrame(node, VALUE, self.j), self._value_node(), b)
        if phase == OPEN:
            return same(e, ObjectFrame(node, KEY, -1)) if b == 0x22 else pop(e) if b == 0x7D else []
        if phase == COLON:
            return same(e, ObjectFrame(node, BLANK, self.j)) if b == 0x3A else []
        if phase == BLANK:
            return same(e, ObjectFrame(node, EXPECT, self.j)) if b == 0x20 else []
        if phase == AFTER:
            return same(e, ObjectFrame(node, COMMA, self.j, esc=1)) if b == 0x2C else pop(e) if b == 0x7D else []
        if phase == COMMA:
            if self.esc == 1:
                return same(e, ObjectFrame(node, COMMA, self.j, esc=2)) if b == 0x20 else []
            return same(e, ObjectFrame(node, KEY, self.j)) if b == 0x22 else []
        return []

    def _property(self, key: bytes) -> int | None:
        node = self.node
        k = node.index.get(key)
        if k is not None and k > self.j:
            return k
        return len(node.names) if k is None and node.additional is not None else None

    def child_done(self) -> Frame:
        return ObjectFrame(self.node, AFTER, self.j)

    def _key_options(self) -> list[tuple[float, int, bytes]]:
        """For an open key: (bytes to close the object, property, rest of the key) for each key it may become."""
        node, typed = self.node, b'"' + self.key
        out = []
        for k in node.candidates(self.j):
            if k < len(node.names):
                name = node.names[k]
                rest: bytes | None = name[len(typed):] if name.startswith(typed) else None
            else:
                rest = self._extra_key_rest()
            value = node.value(k).shortest  # type: ignore[union-attr]
            if rest is not None and value is not None:
                out.append((len(rest) + 2 + len(value) + node.rest_len(k), k, rest))
        return out

    def _extra_key_rest(self) -> bytes | None:
        """What finishes the open key as an additional property's: any string that is no listed name."""
        if self.esc == 0 and (not self.key or self.key[-1] < 0x80):  # the common case: nothing left open
            rest = b""
        else:
            esc = None if self.esc == 0 else "" if self.esc == -1 else "u" + "0" * (4 - self.esc)
            tail = self.key[-3:]
            pending = b""
            for i in range(len(tail)):
                if utf8_len(tail[i]) > len(tail) - i:
                    pending = tail[i:]
            done = finish_char(esc, pending, None) if esc is not None or pending else (b"", "")
            if done is None:
                return None
            rest = done[0]
        while b'"' + self.key + rest + b'"' in self.node.index:
            rest += b"a"
        return rest + b'"'

    def closing_len(self) -> float:
        if self._len is None:
            node, phase, j = self.node, self.phase, self.j
            if phase == OPEN:
                self._len = node.opening_len()
            elif phase == KEY:
                self._len = min((o[0] for o in self._key_options()), default=INF)
            elif phase in (COLON, BLANK, EXPECT):
                value = self._value_node().shortest
                self._len = (INF if value is None else len(value)) + node.rest_len(j) + (EXPECT - phase)
            elif phase == COMMA:
                self._len = (1 if self.esc == 1 else 0) + node.next_len(j)
            else:
                self._len = node.rest_len(j)
        return self._len

    def closing(self) -> bytes:
        node, phase, j = self.node, self.phase, self.j
        if phase == OPEN:
            return node.opening_rest()
        if phase == KEY:
            _, k, rest = min(self._key_options(), key=lambda o: o[0])
            return rest + b": " + (node.value(k).shortest or b"") + node.rest(k)  # type: ignore[union-attr]
        if phase in (COLON, BLANK, EXPECT):
            return b": "[phase - COLON:] + (self._value_node().shortest or b"") + node.rest(j)
        if phase == COMMA:
            return (b" " if self.esc == 1 else b"") + node.next_entry(j)
        return node.rest(j)


class ArrayFrame(Frame):
    """`count` is how many items are written; while one is being written (VALUE), its index."""

    __slots__ = ("count", "node", "phase", "typed")

    def __init__(self, node: Array, phase: int, count: int, typed: int = 0) -> None:
        self.node, self.phase, self.count, self.typed = node, phase, count, typed

    def feed(self, b: int, e: Entry) -> list[Entry]:
        node, phase = self.node, self.phase
        if phase == AFTER:
            if b == 0x2C:
                return same(e, ArrayFrame(node, COMMA, self.count, 1))
            return pop(e) if b == 0x5D else []
        if phase == COMMA and self.typed == 1:
            return same(e, ArrayFrame(node, COMMA, self.count, 2)) if b == 0x20 else []
        if phase == OPEN and b == 0x5D:
            return pop(e)
        if phase in (OPEN, COMMA):
            if self.count >= len(node.prefix) and node.items is None:
                return []
            return push(e, ArrayFrame(node, VALUE, self.count), node.item(self.count), b)
        return []

    def child_done(self) -> Frame:
        return ArrayFrame(self.node, AFTER, self.count + 1)

    def _next_item(self) -> bytes | None:
        node = self.node
        if self.count >= len(node.prefix) and node.items is None:
            return None
        return node.item(self.count).shortest

    def closing_len(self) -> float:
        node, phase = self.node, self.phase
        if phase == OPEN:
            return node.rest_len(0) - 2 if node.min_items else 1
        if phase == VALUE:
            return node.rest_len(self.count + 1)
        if phase == COMMA:
            item = self._next_item()
            return INF if item is None else (1 if self.typed == 1 else 0) + len(item) + node.rest_len(self.count + 1)
        return node.rest_len(self.count)

    def closing(self) -> bytes:
        node, phase = self.node, self.phase
        if phase == OPEN:
            return node.opening_rest()
        if phase == VALUE:
            return node.rest(self.count + 1)
        if phase == COMMA:
            return (b" " if self.typed == 1 else b"") + (self._next_item() or b"") + node.rest(self.count + 1)
        return node.rest(self.count)


def start_object(node: Object, b: int) -> Frame | None:
    return ObjectFrame(node, OPEN, -1) if b == 0x7B else None


def start_array(node: Array, b: int) -> Frame | None:
    return ArrayFrame(node, OPEN, 0) if b == 0x5B else None


class TaggedFrame(Frame):
    """The fixed text before the value (OPEN, `k` bytes of it written), the value (EXPECT, then VALUE while it is
    written), the fixed text after it (AFTER, `k` bytes written)."""

    __slots__ = ("k", "node", "phase")

    def __init__(self, node: Tagged, phase: int, k: int) -> None:
        self.node, self.phase, self.k = node, phase, k

    def feed(self, b: int, e: Entry) -> list[Entry]:
        node, phase, k = self.node, self.phase, self.k
        if phase == OPEN:
            if node.before[k] != b:
                return []
            return same(e, TaggedFrame(node, EXPECT if k + 1 == len(node.before) else OPEN, k + 1))
        if phase == EXPECT:
            return push(e, TaggedFrame(node, VALUE, 0), node.value, b)
        if phase == AFTER and k < len(node.after) and node.after[k] == b:
            return same(e, TaggedFrame(node, AFTER, k + 1))
        return []

    def child_done(self) -> Frame:
        return TaggedFrame(self.node, AFTER, 0)

    def closing(self) -> bytes:
        node, phase = self.node, self.phase
        if phase in (OPEN, EXPECT):
            return node.before[self.k:] + (node.value.shortest or b"") + node.after
        return node.after[self.k:] if phase == AFTER else node.after

    def closing_len(self) -> float:
        if self.phase in (OPEN, EXPECT) and self.node.value.shortest is None:
            return INF
        return len(self.closing())


def start_tagged(node: Tagged, b: int) -> Frame | None:
    if not node.before or node.before[0] != b:
        return None
    return TaggedFrame(node, EXPECT if len(node.before) == 1 else OPEN, 1)
