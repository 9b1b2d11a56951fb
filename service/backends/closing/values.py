"""Frames for values that hold no other value: strings, numbers, literals (enum, const, booleans, null, a
choice) and raw regex text. Each knows the shortest bytes that finish it."""

from __future__ import annotations

from service.backends.closing.chars import ESCAPES, HEX, decode, finish_char, utf8_len
from service.backends.closing.numbers import completion
from service.backends.closing.regex import Nfa
from service.backends.closing.shapes import Literals, Number, Regex, String
from service.backends.closing.stack import INF, Entry, Frame, pop, same

DIGITS = frozenset(b"0123456789")


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
                    return same(e, StringFrame(node, self.count, self.states, "u"))
                ch = ESCAPES.get(b)
                return self._char(ch, e) if ch is not None else []
            if b not in HEX:
                return []
            digits = self.esc + chr(b)
            if len(digits) == 5:
                return self._char(chr(int(digits[1:], 16)), e)
            return same(e, StringFrame(node, self.count, self.states, digits))
        if self.pending:
            if not 0x80 <= b <= 0xBF:
                return []
            pending = self.pending + bytes([b])
            if len(pending) < utf8_len(pending[0]):
                return same(e, StringFrame(node, self.count, self.states, None, pending))
            ch = decode(pending)
            return self._char(ch, e) if ch is not None else []
        if b == 0x22:
            return pop(e)
        if b == 0x5C:
            return [] if node.bounded else same(e, StringFrame(node, self.count, self.states, ""))
        if b >= 0x80:
            return same(e, StringFrame(node, self.count, self.states, None, bytes([b]))) if utf8_len(b) else []
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
        return same(e, StringFrame(self.node, self.count + 1, states))

    def _finished(self) -> tuple[bytes, int, frozenset[int] | None] | None:
        """The open character finished: its bytes, and the count and pattern states after it."""
        if self.esc is None and not self.pending:
            return b"", self.count, self.states
        nfa = self.node.nfa
        done = finish_char(self.esc, self.pending, nfa.allowed(self.states) if nfa else None)  # type: ignore
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
        if b in DIGITS or fraction:
            return same(e, NumberFrame(self.node, self.text + chr(b)))
        if self.rest != "":
            return []
        return [out for popped in pop(e) for out in popped.frame.feed(b, popped)]

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
            return same(e, LiteralFrame(texts, consumed))
        if self.consumed not in self.texts:
            return []
        return [out for popped in pop(e) for out in popped.frame.feed(b, popped)]

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
            if len(pending) < max(1, utf8_len(pending[0])):
                return RegexFrame(self.nfa, self.states, pending)
            ch = decode(pending)  # type: ignore[assignment]
            if ch is None:
                return None
        else:
            ch = chr(b)
        states = self.nfa.step(self.states, ch)
        return RegexFrame(self.nfa, states, b"") if states else None

    def feed(self, b: int, e: Entry) -> list[Entry]:
        frame = self.step(b)
        return same(e, frame) if frame else []

    def _finished(self) -> tuple[bytes, frozenset[int]] | None:
        if not self.pending:
            return b"", self.states
        done = finish_char(None, self.pending, self.nfa.allowed(self.states))
        return None if done is None else (done[0], self.nfa.step(self.states, done[1]))

    def closing_len(self) -> float:
        finished = self._finished()
        return INF if finished is None else len(finished[0]) + self.nfa.distance(finished[1])

    def closing(self) -> bytes:
        finished = self._finished()
        assert finished is not None
        return finished[0] + self.nfa.completion(finished[1]).encode()  # type: ignore[union-attr]


def start_string(node: String, b: int) -> Frame | None:
    return StringFrame(node, 0, node.nfa.start if node.nfa else None) if b == 0x22 else None


def start_number(node: Number, b: int) -> Frame | None:
    return NumberFrame(node, chr(b)) if b in DIGITS or b == 0x2D else None


def start_literal(node: Literals, b: int) -> Frame | None:
    first = bytes([b])
    texts = tuple(t for t in node.texts if t.startswith(first))
    return LiteralFrame(texts, first) if texts else None


def start_regex(node: Regex, b: int) -> Frame | None:
    return RegexFrame(node.nfa, node.nfa.start, b"").step(b)
