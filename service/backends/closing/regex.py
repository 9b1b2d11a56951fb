"""Regular expressions as NFAs over characters: where a partial match stands, and how few characters complete it.

xgrammar enforces a schema's `pattern` (and `structured_outputs.regex`) but
does not say how far a partial match is from a full one. Patterns are parsed
by Python's own parser and built into a Thompson NFA; a backward shortest-path
pass gives every state its distance, in UTF-8 bytes, to a match. The whole
text must match (xgrammar's reading; anchors are no-ops). Look-around,
back-references and inline flags raise Unsupported.
"""

from __future__ import annotations

import functools
import heapq
import re
from re import _constants as sre  # type: ignore[attr-defined]
from re import _parser as sre_parse  # type: ignore[attr-defined]

from service.backends.closing import Unsupported

MAX_STATES = 20_000
NFA_CACHE_SIZE = 1024
_STEP_MEMO = 4096
_UNICODE_MAX = 0x10FFFF
_CATEGORIES: dict[object, list[tuple[int, int]]] = {
    sre.CATEGORY_DIGIT: [(48, 57)],
    sre.CATEGORY_SPACE: [(9, 13), (32, 32)],
    sre.CATEGORY_WORD: [(48, 57), (65, 90), (95, 95), (97, 122)],
}
_NEGATED = {sre.CATEGORY_NOT_DIGIT: sre.CATEGORY_DIGIT, sre.CATEGORY_NOT_SPACE: sre.CATEGORY_SPACE,
            sre.CATEGORY_NOT_WORD: sre.CATEGORY_WORD}
Ranges = tuple[tuple[int, int], ...]


def _normalise(ranges: list[tuple[int, int]]) -> Ranges:
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return tuple(out)


def _complement(ranges: Ranges) -> Ranges:
    out, start = [], 0
    for lo, hi in ranges:
        if lo > start:
            out.append((start, lo - 1))
        start = hi + 1
    if start <= _UNICODE_MAX:
        out.append((start, _UNICODE_MAX))
    return tuple(out)


def _class(items: list) -> Ranges:
    ranges: list[tuple[int, int]] = []
    negate = False
    for op, arg in items:
        if op is sre.NEGATE:
            negate = True
        elif op is sre.LITERAL:
            ranges.append((arg, arg))
        elif op is sre.RANGE:
            ranges.append(arg)
        elif op is sre.CATEGORY and arg in _CATEGORIES:
            ranges += _CATEGORIES[arg]
        elif op is sre.CATEGORY and arg in _NEGATED:
            ranges += _complement(_normalise(_CATEGORIES[_NEGATED[arg]]))
        else:
            raise Unsupported(f"regex class item {op}")
    out = _normalise(ranges)
    return _complement(out) if negate else out


def pick(ranges: Ranges, json_string: bool) -> str | None:
    """The character a completion writes for `ranges`: the lowest printable one (fewest UTF-8 bytes); inside a
    JSON string never one that would need an escape."""
    for lo, hi in ranges:
        c = max(lo, 0x20)
        while c <= hi and (0xD800 <= c <= 0xDFFF or (json_string and c in (0x22, 0x5C))):
            c = 0xE000 if 0xD800 <= c <= 0xDFFF else c + 1
        if c <= hi:
            return chr(c)
    if not json_string and ranges and ranges[0][0] < 0x20:
        return chr(ranges[0][0])
    return None


@functools.lru_cache(maxsize=NFA_CACHE_SIZE)
def nfa(pattern: str, json_string: bool) -> Nfa:
    """The NFA of a pattern, built once: schemas repeat patterns (dates, ids) across many properties."""
    return Nfa(pattern, json_string)


class Nfa:
    """One pattern. States are ints; a set of states is where a partial match stands."""

    def __init__(self, pattern: str, json_string: bool) -> None:
        try:
            parsed = sre_parse.parse(pattern)
        except re.error as e:
            raise Unsupported(f"regex: {e}") from None
        if parsed.state.flags & ~(sre.SRE_FLAG_UNICODE | sre.SRE_FLAG_ASCII):
            raise Unsupported("regex flags")
        self.edges: list[list[tuple[Ranges, int]]] = []
        self.eps: list[list[int]] = []
        start, self.accept = self._sequence(list(parsed))
        self._closures: dict[int, frozenset[int]] = {}
        self._memo: dict[tuple[frozenset[int], str], frozenset[int]] = {}
        self._char: dict[Ranges, str | None] = {}
        self.json_string = json_string
        self.dist, self._next = self._distances()
        self.start = self._closure(start)

    # -- construction ---------------------------------------------------------------------------------------

    def _state(self) -> int:
        if len(self.edges) >= MAX_STATES:
            raise Unsupported("regex too large to model")
        self.edges.append([])
        self.eps.append([])
        return len(self.edges) - 1

    def _sequence(self, items: list) -> tuple[int, int]:
        start = end = self._state()
        for item in items:
            s, e = self._item(*item)
            self.eps[end].append(s)
            end = e
        return start, end

    def _item(self, op: object, arg: object) -> tuple[int, int]:
        if op is sre.LITERAL:
            return self._edge(((arg, arg),))
        if op is sre.NOT_LITERAL:
            return self._edge(_complement(((arg, arg),)))
        if op is sre.ANY:
            return self._edge(_complement(((10, 10),)))
        if op is sre.IN:
            return self._edge(_class(arg))  # type: ignore[arg-type]
        if op is sre.AT:
            s = self._state()
            return s, s
        if op is sre.BRANCH:
            start, end = self._state(), self._state()
            for alternative in arg[1]:  # type: ignore[index]
                s, e = self._sequence(list(alternative))
                self.eps[start].append(s)
                self.eps[e].append(end)
            return start, end
        if op is sre.SUBPATTERN:
            _, add_flags, del_flags, sub = arg  # type: ignore[misc]
            if add_flags or del_flags:
                raise Unsupported("regex inline flags")
            return self._sequence(list(sub))
        if op in (sre.MAX_REPEAT, sre.MIN_REPEAT, sre.POSSESSIVE_REPEAT):
            low, high, sub = arg  # type: ignore[misc]
            return self._repeat(low, None if high is sre.MAXREPEAT else high, list(sub))
        raise Unsupported(f"regex construct {op}")

    def _edge(self, ranges: Ranges) -> tuple[int, int]:
        s, e = self._state(), self._state()
        self.edges[s].append((ranges, e))
        return s, e

    def _repeat(self, low: int, high: int | None, sub: list) -> tuple[int, int]:
        start = end = self._state()
        for _ in range(low):
            s, e = self._sequence(sub)
            self.eps[end].append(s)
            end = e
        final = self._state()
        if high is None:
            s, e = self._sequence(sub)
            self.eps[end] += [s, final]
            self.eps[e] += [s, final]
            return start, final
        for _ in range(high - low):
            self.eps[end].append(final)
            s, e = self._sequence(sub)
            self.eps[end].append(s)
            end = e
        self.eps[end].append(final)
        return start, final

    # -- queries ------------------------------------------------------------------------------------------------

    def _closure(self, state: int) -> frozenset[int]:
        found = self._closures.get(state)
        if found is None:
            seen, todo = {state}, [state]
            while todo:
                for t in self.eps[todo.pop()]:
                    if t not in seen:
                        seen.add(t)
                        todo.append(t)
            found = self._closures[state] = frozenset(seen)
        return found

    def char_for(self, ranges: Ranges) -> str | None:
        if ranges not in self._char:
            self._char[ranges] = pick(ranges, self.json_string)
        return self._char[ranges]

    def _distances(self) -> tuple[list[float], list[tuple[str | None, int] | None]]:
        """Fewest UTF-8 bytes from each state to a match, and the first step of that shortest path."""
        back: list[list[tuple[int, str | None, int]]] = [[] for _ in self.edges]
        for s, edges in enumerate(self.edges):
            for ranges, t in edges:
                ch = self.char_for(ranges)
                if ch is not None:
                    back[t].append((s, ch, len(ch.encode())))
            for t in self.eps[s]:
                back[t].append((s, None, 0))
        dist = [float("inf")] * len(self.edges)
        nxt: list[tuple[str | None, int] | None] = [None] * len(self.edges)
        dist[self.accept] = 0
        heap = [(0, self.accept)]
        while heap:
            d, t = heapq.heappop(heap)
            if d > dist[t]:
                continue
            for s, ch, w in back[t]:
                if d + w < dist[s]:
                    dist[s], nxt[s] = d + w, (ch, t)
                    heapq.heappush(heap, (d + w, s))
        return dist, nxt

    def step(self, states: frozenset[int], ch: str) -> frozenset[int]:
        key = (states, ch)
        found = self._memo.get(key)
        if found is None:
            code = ord(ch)
            out: set[int] = set()
            for s in states:
                for ranges, t in self.edges[s]:
                    if any(lo <= code <= hi for lo, hi in ranges):
                        out |= self._closure(t)
            if len(self._memo) >= _STEP_MEMO:
                self._memo.clear()
            found = self._memo[key] = frozenset(out)
        return found

    def allowed(self, states: frozenset[int]) -> list[Ranges]:
        """The character classes that can come next."""
        return [ranges for s in states for ranges, _ in self.edges[s]]

    def distance(self, states: frozenset[int]) -> float:
        return min((self.dist[s] for s in states), default=float("inf"))

    def matches(self, states: frozenset[int]) -> bool:
        return self.accept in states

    def completion(self, states: frozenset[int]) -> str | None:
        """The shortest text (in UTF-8 bytes) that completes a match, or None if none can."""
        if not states or self.distance(states) == float("inf"):
            return None
        s = min(states, key=lambda q: self.dist[q])
        out = []
        while s != self.accept:
            step = self._next[s]
            assert step is not None
            ch, s = step
            if ch is not None:
                out.append(ch)
        return "".join(out)
