"""Where a constrained output stands, byte by byte, and the shortest text that closes it.

A state is a tuple of alternatives (anyOf branches that still fit the text);
each is a persistent stack of frames, one per open value, so a state is kept
for free when the next token is only being considered. Every level knows its
`tail`: how many bytes the levels below it need once it is complete, so the
closing length of a state costs one call per alternative, and the text only
has to be spelled out when the engine actually steers onto it.

The text is a prefix xgrammar allowed (compact JSON: `", "` and `": "`, no
other whitespace). A byte no alternative expects kills the state (None): the
engine then serves the rest without the budget guarantee.
"""

from __future__ import annotations

from service.backends.closing.numbers import Range, completion
from service.backends.closing.regex import Nfa, Ranges
from service.backends.closing.shapes import AnyValue, Array, Literals, Node, Number, Object, Regex, String, finish

INF = float("inf")
MAX_ALTERNATIVES = 32
_ESCAPES = {0x22: '"', 0x5C: "\\", 0x2F: "/", 0x62: "\b", 0x66: "\f", 0x6E: "\n", 0x72: "\r", 0x74: "\t"}
_HEX = frozenset(b"0123456789abcdefABCDEF")
_DIGITS = frozenset(b"0123456789")


class Entry:
    __slots__ = ("below", "frame", "tail")

    def __init__(self, frame: Frame, below: Entry | None, tail: float) -> None:
        self.frame, self.below, self.tail = frame, below, tail


class Frame:
    __slots__ = ()

    def feed(self, b: int, e: Entry) -> list[Entry]:
        raise NotImplementedError

    def closing_len(self) -> float:
        raise NotImplementedError

    def closing(self) -> bytes:
        raise NotImplementedError

    def child_done(self) -> Frame:
        raise NotImplementedError


State = tuple[Entry, ...]


def _same(e: Entry, frame: Frame) -> list[Entry]:
    return [Entry(frame, e.below, e.tail)]


def _pop(e: Entry) -> list[Entry]:
    below = e.below
    if below is None:
        return [Entry(DONE, None, 0)]
    return [Entry(below.frame.child_done(), below.below, below.tail)]


def _push(e: Entry, parent: Frame, node: Node, b: int) -> list[Entry]:
    """`parent` (e's frame, now waiting on a value) and the value that byte b starts."""
    waiting = Entry(parent, e.below, e.tail)
    tail = e.tail + parent.closing_len()
    out = []
    for option in node.options:
        frame = _begin(option, b)
        if frame is not None:
            out.append(Entry(frame, waiting, tail))
    return out


def _begin(node: Node, b: int) -> Frame | None:
    if isinstance(node, AnyValue):
        node = _ANY.get(b)  # type: ignore[assignment]
        if node is None:
            return None
    if isinstance(node, Object):
        return ObjectFrame(node, OPEN, -1) if b == 0x7B else None
    if isinstance(node, Array):
        return ArrayFrame(node, OPEN, 0) if b == 0x5B else None
    if isinstance(node, String):
        return StringFrame(node, 0, node.nfa.start if node.nfa else None) if b == 0x22 else None
    if isinstance(node, Number):
        return NumberFrame(node, chr(b)) if b in _DIGITS or b == 0x2D else None
    if isinstance(node, Literals):
        first = bytes([b])
        texts = tuple(t for t in node.texts if t.startswith(first))
        return LiteralFrame(texts, first) if texts else None
    if isinstance(node, Regex):
        return RegexFrame(node.nfa, node.nfa.start, b"").step(b)
    return None


# -- characters: escapes and UTF-8 in strings -------------------------------------------------------------------

def _utf8_len(lead: int) -> int:
    return 2 if 0xC2 <= lead <= 0xDF else 3 if 0xE0 <= lead <= 0xEF else 4 if 0xF0 <= lead <= 0xF4 else 0


def _code_points(pending: bytes) -> tuple[int, int] | None:
    """The code points whose UTF-8 encoding starts with `pending` (xgrammar admits encoded surrogates too)."""
    n = _utf8_len(pending[0])
    second = {0xE0: (0xA0, 0xBF), 0xED: (0x80, 0x9F), 0xF0: (0x90, 0xBF), 0xF4: (0x80, 0x8F)}.get(pending[0],
                                                                                                 (0x80, 0xBF))
    low, high = bytearray(pending), bytearray(pending)
    for i in range(len(pending), n):
        low.append(second[0] if i == 1 else 0x80)
        high.append(second[1] if i == 1 else 0xBF)
    try:
        return ord(low.decode("utf-8", "surrogatepass")), ord(high.decode("utf-8", "surrogatepass"))
    except (UnicodeDecodeError, TypeError):
        return None


def _decode(data: bytes) -> str | None:
    try:
        return data.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        return None


def _lowest_allowed(lo: int, hi: int, allowed: list[Ranges] | None) -> int | None:
    if allowed is None:
        return lo
    best = None
    for ranges in allowed:
        for a, z in ranges:
            c = max(a, lo)
            if c <= min(z, hi) and (best is None or c < best):
                best = c
    return best


def _finish_char(esc: str | None, pending: bytes, allowed: list[Ranges] | None) -> tuple[bytes, str] | None:
    """The bytes that finish a character left open by a token (an escape, or part of a UTF-8 sequence), and the
    character; `allowed` (a pattern's next classes) restricts which."""
    if pending:
        span = _code_points(pending)
        c = None if span is None else _lowest_allowed(*span, allowed)
        return None if c is None else (chr(c).encode("utf-8", "surrogatepass")[len(pending):], chr(c))
    if esc == "":
        for byte, ch in ((0x6E, "\n"), (0x22, '"'), (0x5C, "\\"), (0x2F, "/"), (0x74, "\t")):
            if allowed is None or _lowest_allowed(ord(ch), ord(ch), allowed) is not None:
                return bytes([byte]), ch
        c = _lowest_allowed(0x20, 0xFFFF, allowed)
        return None if c is None else (f"u{c:04x}".encode(), chr(c))
    assert esc is not None and esc.startswith("u")
    digits = esc[1:]
    width = 4 - len(digits)
    base = int(digits or "0", 16) << (4 * width)
    c = _lowest_allowed(base, base + (1 << (4 * width)) - 1, allowed)
    return None if c is None else (f"{c:04x}"[len(digits):].encode(), chr(c))


# -- values -----------------------------------------------------------------------------------------------------

class StringFrame(Frame):
    __slots__ = ("count", "esc", "node", "pending", "states")

    def __init__(self, node: String, count: int, states: frozenset[int] | None, esc: str | None = None,
                 pending: bytes = b"") -> None:
        self.node, self.count, self.states, self.esc, self.pending = node, count, states, esc, pending

    def feed(self, b: int, e: Entry) -> list[Entry]:
        node = self.node
        if self.esc is not None:
            if self.esc == "":
                if b == 0x75:
                    return _same(e, StringFrame(node, self.count, self.states, "u"))
                ch = _ESCAPES.get(b)
                return self._char(ch, e) if ch is not None else []
            if b not in _HEX:
                return []
            digits = self.esc + chr(b)
            if len(digits) == 5:
                return self._char(chr(int(digits[1:], 16)), e)
            return _same(e, StringFrame(node, self.count, self.states, digits))
        if self.pending:
            if not 0x80 <= b <= 0xBF:
                return []
            pending = self.pending + bytes([b])
            if len(pending) < _utf8_len(pending[0]):
                return _same(e, StringFrame(node, self.count, self.states, None, pending))
            ch = _decode(pending)
            return self._char(ch, e) if ch is not None else []
        if b == 0x22:
            return _pop(e)
        if b == 0x5C:
            return [] if node.bounded else _same(e, StringFrame(node, self.count, self.states, ""))
        if b >= 0x80:
            return _same(e, StringFrame(node, self.count, self.states, None, bytes([b]))) if _utf8_len(b) else []
        if b < 0x20 and (not node.bounded or b in (0x0A, 0x0D)):
            return []
        if not node.bounded and node.nfa is None:
            return [e]
        return self._char(chr(b), e)

    def _char(self, ch: str, e: Entry) -> list[Entry]:
        states = self.states
        if states is not None:
            states = self.node.nfa.step(states, ch)  # type: ignore[union-attr]
            if not states:
                return []
        return _same(e, StringFrame(self.node, self.count + 1, states))

    def _finished(self) -> tuple[bytes, int, frozenset[int] | None] | None:
        """The open character finished: its bytes, and the count and pattern states after it."""
        if self.esc is None and not self.pending:
            return b"", self.count, self.states
        nfa = self.node.nfa
        done = _finish_char(self.esc, self.pending, nfa.allowed(self.states) if nfa else None)  # type: ignore
        if done is None:
            return None
        states = nfa.step(self.states, done[1]) if nfa else None  # type: ignore[arg-type]
        return done[0], self.count + 1, states

    def closing_len(self) -> float:
        finished = self._finished()
        if finished is None:
            return INF
        text, count, states = finished
        if states is not None:
            return len(text) + self.node.nfa.distance(states) + 1  # type: ignore[union-attr]
        return len(text) + max(0, self.node.min_len - count) + 1

    def closing(self) -> bytes:
        finished = self._finished()
        assert finished is not None
        text, count, states = finished
        if states is not None:
            return text + self.node.nfa.completion(states).encode() + b'"'  # type: ignore[union-attr]
        return text + b"a" * max(0, self.node.min_len - count) + b'"'


class NumberFrame(Frame):
    __slots__ = ("node", "rest", "text")

    def __init__(self, node: Number, text: str) -> None:
        self.node, self.text = node, text
        self.rest = completion(text, node.range)

    def feed(self, b: int, e: Entry) -> list[Entry]:
        fraction = not self.node.range.integer and (b in b".eE" or (b in b"+-" and self.text[-1] in "eE"))
        if b in _DIGITS or fraction:
            return _same(e, NumberFrame(self.node, self.text + chr(b)))
        if self.rest != "":
            return []
        return [out for popped in _pop(e) for out in popped.frame.feed(b, popped)]

    def closing_len(self) -> float:
        return INF if self.rest is None else len(self.rest)

    def closing(self) -> bytes:
        assert self.rest is not None
        return self.rest.encode()


class LiteralFrame(Frame):
    __slots__ = ("consumed", "texts")

    def __init__(self, texts: tuple[bytes, ...], consumed: bytes) -> None:
        self.texts, self.consumed = texts, consumed

    def feed(self, b: int, e: Entry) -> list[Entry]:
        consumed = self.consumed + bytes([b])
        texts = tuple(t for t in self.texts if t.startswith(consumed))
        if texts:
            return _same(e, LiteralFrame(texts, consumed))
        if self.consumed not in self.texts:
            return []
        return [out for popped in _pop(e) for out in popped.frame.feed(b, popped)]

    def closing_len(self) -> float:
        return min(len(t) for t in self.texts) - len(self.consumed)

    def closing(self) -> bytes:
        return min(self.texts, key=len)[len(self.consumed):]


class RegexFrame(Frame):
    """Raw text under a regex (structured_outputs.regex): the whole output, never popped."""

    __slots__ = ("nfa", "pending", "states")

    def __init__(self, nfa: Nfa, states: frozenset[int], pending: bytes) -> None:
        self.nfa, self.states, self.pending = nfa, states, pending

    def step(self, b: int) -> RegexFrame | None:
        if self.pending or b >= 0x80:
            pending = self.pending + bytes([b])
            if len(pending) < max(1, _utf8_len(pending[0])):
                return RegexFrame(self.nfa, self.states, pending)
            ch = _decode(pending)  # type: ignore[assignment]
            if ch is None:
                return None
        else:
            ch = chr(b)
        states = self.nfa.step(self.states, ch)
        return RegexFrame(self.nfa, states, b"") if states else None

    def feed(self, b: int, e: Entry) -> list[Entry]:
        frame = self.step(b)
        return _same(e, frame) if frame else []

    def _finished(self) -> tuple[bytes, frozenset[int]] | None:
        if not self.pending:
            return b"", self.states
        done = _finish_char(None, self.pending, self.nfa.allowed(self.states))
        return None if done is None else (done[0], self.nfa.step(self.states, done[1]))

    def closing_len(self) -> float:
        finished = self._finished()
        return INF if finished is None else len(finished[0]) + self.nfa.distance(finished[1])

    def closing(self) -> bytes:
        finished = self._finished()
        assert finished is not None
        return finished[0] + self.nfa.completion(finished[1]).encode()  # type: ignore[union-attr]


# -- containers -------------------------------------------------------------------------------------------------

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
                return _same(e, ObjectFrame(node, KEY, self.j, self.key + bytes([b]), esc))
            if b == 0x22:
                k = self._property(b'"' + self.key + b'"')
                return [] if k is None else _same(e, ObjectFrame(node, COLON, k))
            return _same(e, ObjectFrame(node, KEY, self.j, self.key + bytes([b]), -1 if b == 0x5C else 0))
        if phase == EXPECT:
            return _push(e, ObjectFrame(node, VALUE, self.j), self._value_node(), b)
        if phase == OPEN:
            return _same(e, ObjectFrame(node, KEY, -1)) if b == 0x22 else _pop(e) if b == 0x7D else []
        if phase == COLON:
            return _same(e, ObjectFrame(node, BLANK, self.j)) if b == 0x3A else []
        if phase == BLANK:
            return _same(e, ObjectFrame(node, EXPECT, self.j)) if b == 0x20 else []
        if phase == AFTER:
            return _same(e, ObjectFrame(node, COMMA, self.j, esc=1)) if b == 0x2C else _pop(e) if b == 0x7D else []
        if phase == COMMA:
            if self.esc == 1:
                return _same(e, ObjectFrame(node, COMMA, self.j, esc=2)) if b == 0x20 else []
            return _same(e, ObjectFrame(node, KEY, self.j)) if b == 0x22 else []
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
                if _utf8_len(tail[i]) > len(tail) - i:
                    pending = tail[i:]
            done = _finish_char(esc, pending, None) if esc is not None or pending else (b"", "")
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
                return _same(e, ArrayFrame(node, COMMA, self.count, 1))
            return _pop(e) if b == 0x5D else []
        if phase == COMMA and self.typed == 1:
            return _same(e, ArrayFrame(node, COMMA, self.count, 2)) if b == 0x20 else []
        if phase == OPEN and b == 0x5D:
            return _pop(e)
        if phase in (OPEN, COMMA):
            if self.count >= len(node.prefix) and node.items is None:
                return []
            return _push(e, ArrayFrame(node, VALUE, self.count), node.item(self.count), b)
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


class RootFrame(Frame):
    __slots__ = ("node",)

    def __init__(self, node: Node) -> None:
        self.node = node

    def feed(self, b: int, e: Entry) -> list[Entry]:
        return [Entry(f, None, 0) for f in (_begin(o, b) for o in self.node.options) if f is not None]

    def closing_len(self) -> float:
        return INF if self.node.shortest is None else len(self.node.shortest)

    def closing(self) -> bytes:
        return self.node.shortest or b""


class DoneFrame(Frame):
    __slots__ = ()

    def feed(self, b: int, e: Entry) -> list[Entry]:
        return []

    def closing_len(self) -> float:
        return 0

    def closing(self) -> bytes:
        return b""


DONE = DoneFrame()
_FREE_OBJECT = Object()
_FREE_OBJECT.additional = AnyValue()
_ANY: dict[int, Node] = {0x7B: _FREE_OBJECT, 0x5B: Array([], AnyValue(), 0, None), 0x22: String(),
                         0x74: Literals([b"true"]), 0x66: Literals([b"false"]), 0x6E: Literals([b"null"]),
                         **{d: Number(Range(False)) for d in b"-0123456789"}}
for _node in {id(n): n for n in _ANY.values()}.values():
    finish(_node)


# -- states -----------------------------------------------------------------------------------------------------

def start(node: Node) -> State:
    return (Entry(RootFrame(node), None, 0),)


def advance(state: State, data: bytes) -> State | None:
    """The state after `data`, or None when no alternative expected it."""
    if len(state) == 1:  # the common case, without the bookkeeping of several alternatives
        e = state[0]
        for i, b in enumerate(data):
            following = e.frame.feed(b, e)
            if len(following) != 1:
                return _advance(tuple(following[:MAX_ALTERNATIVES]), data[i + 1:]) if following else None
            e = following[0]
        return (e,)
    return _advance(state, data)


def _advance(state: State, data: bytes) -> State | None:
    for b in data:
        following: list[Entry] = []
        for e in state:
            following += e.frame.feed(b, e)
        if not following:
            return None
        state = tuple(following[:MAX_ALTERNATIVES])
    return state


def _cost(e: Entry) -> float:
    return e.frame.closing_len() + e.tail


def closing_len(state: State) -> float:
    """Bytes of the shortest text that closes the output from here."""
    if len(state) == 1:
        return state[0].frame.closing_len() + state[0].tail
    return min(_cost(e) for e in state)


def cheapest(state: State) -> Entry:
    """The alternative that closes in the fewest bytes."""
    return state[0] if len(state) == 1 else min(state, key=_cost)


def closing(state: State) -> bytes:
    e: Entry | None = cheapest(state)
    out = []
    while e is not None:
        out.append(e.frame.closing())
        e = e.below
    return b"".join(out)
