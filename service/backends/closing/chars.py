"""Characters inside strings: an escape or a UTF-8 sequence a token left open, and the bytes that finish it."""

from __future__ import annotations

from service.backends.closing.regex import Ranges

ESCAPES = {0x22: '"', 0x5C: "\\", 0x2F: "/", 0x62: "\b", 0x66: "\f", 0x6E: "\n", 0x72: "\r", 0x74: "\t"}
HEX = frozenset(b"0123456789abcdefABCDEF")


def utf8_len(lead: int) -> int:
    return 2 if 0xC2 <= lead <= 0xDF else 3 if 0xE0 <= lead <= 0xEF else 4 if 0xF0 <= lead <= 0xF4 else 0


def code_points(pending: bytes) -> tuple[int, int] | None:
    """The code points whose UTF-8 encoding starts with `pending` (xgrammar admits encoded surrogates too)."""
    n = utf8_len(pending[0])
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


def decode(data: bytes) -> str | None:
    try:
        return data.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        return None


def lowest_allowed(lo: int, hi: int, allowed: list[Ranges] | None) -> int | None:
    if allowed is None:
        return lo
    best = None
    for ranges in allowed:
        for a, z in ranges:
            c = max(a, lo)
            if c <= min(z, hi) and (best is None or c < best):
                best = c
    return best


def finish_char(esc: str | None, pending: bytes, allowed: list[Ranges] | None) -> tuple[bytes, str] | None:
    """The bytes that finish a character left open by a token (an escape, or part of a UTF-8 sequence), and the
    character; `allowed` (a pattern's next classes) restricts which."""
    if pending:
        span = code_points(pending)
        c = None if span is None else lowest_allowed(*span, allowed)
        return None if c is None else (chr(c).encode("utf-8", "surrogatepass")[len(pending):], chr(c))
    if esc == "":
        for byte, ch in ((0x6E, "\n"), (0x22, '"'), (0x5C, "\\"), (0x2F, "/"), (0x74, "\t")):
            if allowed is None or lowest_allowed(ord(ch), ord(ch), allowed) is not None:
                return bytes([byte]), ch
        c = lowest_allowed(0x20, 0xFFFF, allowed)
        return None if c is None else (f"u{c:04x}".encode(), chr(c))
    assert esc is not None and esc.startswith("u")
    digits = esc[1:]
    width = 4 - len(digits)
    base = int(digits or "0", 16) << (4 * width)
    c = lowest_allowed(base, base + (1 << (4 * width)) - 1, allowed)
    return None if c is None else (f"{c:04x}"[len(digits):].encode(), chr(c))
