"""The tracker's building blocks: a frame per open value, the persistent stacks they form, and what a byte
does to them (replace the top frame, open a value above it, or close it).

A stack is a chain of `Entry`s, never changed once built, so the state before a
token stays valid while the token is only being considered. Each entry knows its
`tail`: how many bytes the levels below it need once its own value is complete.
Which frame a byte opens for a schema node is looked up in `STARTS`, which
tracker.py fills (the frame classes live in values.py and containers.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from service.backends.closing.shapes import Node

INF = float("inf")


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


def same(e: Entry, frame: Frame) -> list[Entry]:
    return [Entry(frame, e.below, e.tail)]


def pop(e: Entry) -> list[Entry]:
    below = e.below
    if below is None:
        return [Entry(DONE, None, 0)]
    return [Entry(below.frame.child_done(), below.below, below.tail)]


def push(e: Entry, parent: Frame, node: Node, b: int) -> list[Entry]:
    """`parent` (e's frame, now waiting on a value) and the value that byte b starts."""
    waiting = Entry(parent, e.below, e.tail)
    tail = e.tail + parent.closing_len()
    out = []
    for option in node.options:
        frame = begin(option, b)
        if frame is not None:
            out.append(Entry(frame, waiting, tail))
    return out


STARTS: dict[type, Callable[[Any, int], Frame | None]] = {}


def begin(node: Node, b: int) -> Frame | None:
    """The frame that byte b opens as a value of `node` (one of its options), or None if it cannot start one."""
    start = STARTS.get(type(node))
    return start(node, b) if start is not None else None


class DoneFrame(Frame):
    __slots__ = ()

    def feed(self, b: int, e: Entry) -> list[Entry]:
        return []

    def closing_len(self) -> float:
        return 0

    def closing(self) -> bytes:
        return b""


DONE = DoneFrame()
