"""The fewest tokens that spell a text.

A closing is forced token by token, and xgrammar matches tokens by their
bytes, so any spelling of the text is valid; the fewest tokens is the one
that fits the most budget. Tokens the grammar never allows (special tokens,
end-of-sequence) are left out. A byte-level vocabulary has a token for every
byte, so a text of n bytes never needs more than n tokens.
"""

from __future__ import annotations

from collections.abc import Iterable

_END = -1


class Speller:
    def __init__(self, token_bytes: list[bytes], excluded: Iterable[int]) -> None:
        skip = set(excluded)
        self._trie: dict[int, dict] = {}
        for token, data in enumerate(token_bytes):
            if not data or token in skip:
                continue
            node = self._trie
            for b in data:
                node = node.setdefault(b, {})
            node.setdefault(_END, token)  # type: ignore[call-overload]

    def spell(self, text: bytes) -> list[int] | None:
        """The fewest tokens whose bytes concatenate to `text`, or None if the vocabulary cannot spell it."""
        n = len(text)
        best: list[tuple[int, int, int] | None] = [None] * (n + 1)  # (count, token, start) of the best path
        best[0] = (0, -1, -1)
        for i in range(n):
            here = best[i]
            if here is None:
                continue
            node = self._trie
            for j in range(i, n):
                node = node.get(text[j])  # type: ignore[assignment]
                if node is None:
                    break
                token = node.get(_END)
                if token is not None:
                    there = best[j + 1]
                    if there is None or here[0] + 1 < there[0]:
                        best[j + 1] = (here[0] + 1, token, i)
        if best[n] is None:
            return None
        out, at = [], n
        while at > 0:
            _, token, start = best[at]  # type: ignore[misc]
            out.append(token)
            at = start
        return out[::-1]
