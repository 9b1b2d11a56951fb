"""Streaming detokenization on bytes, and stop strings across token boundaries.

Tokens are turned into their exact bytes (service/backends/vocab.py), and the
bytes go through an incremental UTF-8 decoder with errors="replace": a character split over
tokens is held until complete, and bytes that can never complete a character
come out as U+FFFD, as `tokenizer.decode` shows them. So every generated
token reaches the text, and the streamed text equals the decoded output.

Text that might be the start of a stop string is held back until it is known
not to be; a stop string found is cut with everything after it. Silent tokens
(special tokens, unless a request asks for their text) add no text at all.
"""

from __future__ import annotations

import codecs


class IncrementalDetokenizer:
    def __init__(self, table: list[bytes], stop: tuple[str, ...], silent: frozenset[int] = frozenset()) -> None:
        self._table = table
        self._silent = silent
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = stop
        self._held = ""  # decoded text not yet released: it may begin a stop string

    def token_text(self, token_id: int) -> str:
        """One token's text on its own (for logprobs), U+FFFD where it is a partial character."""
        return self._table[token_id].decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        return self._table[token_id]

    def add(self, token_id: int) -> tuple[str, bool]:
        """The text released by this token, and whether a stop string was hit (the text then ends before it)."""
        if token_id in self._silent:
            return "", False
        return self._release(self._utf8.decode(self._table[token_id], final=False))

    def flush(self) -> str:
        """Everything held, at the end of the sequence: incomplete bytes become U+FFFD."""
        text, _ = self._release(self._utf8.decode(b"", final=True), final=True)
        return text

    def _release(self, new: str, final: bool = False) -> tuple[str, bool]:
        if not self._stop:
            return new, False
        text = self._held + new
        hits = [i for i in (text.find(s) for s in self._stop) if i >= 0]
        if hits:
            self._held = ""
            return text[:min(hits)], True
        keep = 0 if final else self._partial_stop_suffix(text)
        self._held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep], False

    def _partial_stop_suffix(self, text: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of a stop string."""
        best = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best
