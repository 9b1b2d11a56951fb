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

from service.backends.closing import containers, values
from service.backends.closing.numbers import Range
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
    finish,
)
from service.backends.closing.stack import INF, STARTS, Entry, Frame, State, begin

MAX_ALTERNATIVES = 32


class RootFrame(Frame):
    __slots__ = ("node",)

    def __init__(self, node: Node) -> None:
        self.node = node

    def feed(self, b: int, e: Entry) -> list[Entry]:
        return [Entry(f, None, 0) for f in (begin(o, b) for o in self.node.options) if f is not None]

    def closing_len(self) -> float:
        return INF if self.node.shortest is None else len(self.node.shortest)

    def closing(self) -> bytes:
        return self.node.shortest or b""


_FREE_OBJECT = Object()
_FREE_OBJECT.additional = AnyValue()
_ANY: dict[int, Node] = {0x7B: _FREE_OBJECT, 0x5B: Array([], AnyValue(), 0, None), 0x22: String(),
                         0x74: Literals([b"true"]), 0x66: Literals([b"false"]), 0x6E: Literals([b"null"]),
                         **{d: Number(Range(False)) for d in b"-0123456789"}}
for _node in {id(n): n for n in _ANY.values()}.values():
    finish(_node)


STARTS.update({
    Object: containers.start_object, Array: containers.start_array, String: values.start_string,
    Number: values.start_number, Literals: values.start_literal, Regex: values.start_regex,
    Tagged: containers.start_tagged,
    AnyValue: lambda _, b: begin(_ANY[b], b) if b in _ANY else None,
})


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
