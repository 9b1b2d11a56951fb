"""The shortest completion of a partial JSON number, inside a schema's range.

An unbounded number only needs its syntax finished (`-` -> `-0`, `1.` -> `1.0`).
A bounded one is what xgrammar's range grammar writes: no exponent, at most six
decimals, no leading zeros. The text so far is always a prefix xgrammar allowed,
so a completion exists; this finds the one with the fewest characters, solving
per added length rather than searching digit by digit.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_CEILING, Decimal

MAX_DECIMALS = 6
_DIGITS = 40


@dataclass(frozen=True, slots=True)
class Range:
    integer: bool
    lo: Decimal | None = None
    lo_exclusive: bool = False
    hi: Decimal | None = None
    hi_exclusive: bool = False

    @property
    def bounded(self) -> bool:
        return self.lo is not None or self.hi is not None

    def mirrored(self) -> Range:
        return Range(self.integer, -self.hi if self.hi is not None else None, self.hi_exclusive,
                     -self.lo if self.lo is not None else None, self.lo_exclusive)

    def allows(self, x: Decimal) -> bool:
        if self.lo is not None and (x < self.lo or (x == self.lo and self.lo_exclusive)):
            return False
        return self.hi is None or x < self.hi or (x == self.hi and not self.hi_exclusive)


def completion(text: str, r: Range) -> str | None:
    """The fewest characters that make `text` a whole number in `r` (None: none can, or an exponent is open)."""
    if not r.bounded:
        if text in ("", "-"):
            return "1" if r.integer and text else "0"
        return "0" if text[-1] in ".eE+-" else ""
    if "e" in text or "E" in text:
        return None
    if text.startswith("-"):
        return _unsigned(text[1:], r.mirrored(), nonzero=True)
    found = [c for c in (_unsigned(text, r, nonzero=False),) if c is not None]
    if not text:
        negative = _unsigned("", r.mirrored(), nonzero=True)
        if negative is not None:
            found.append("-" + negative)
    return min(found, key=len) if found else None


def _ceil(value: Decimal, step: Decimal) -> Decimal:
    return (value / step).to_integral_value(rounding=ROUND_CEILING) * step


def _lowest(lo: Decimal, hi: Decimal, step: Decimal, r: Range, nonzero: bool) -> Decimal | None:
    """The least multiple of `step` in [lo, hi] that `r` allows."""
    if r.lo is not None and r.lo > lo:
        lo = r.lo
    x = _ceil(lo, step)
    if (r.lo is not None and r.lo_exclusive and x == r.lo) or (nonzero and x == 0):
        x += step
    return x if x <= hi and r.allows(x) else None


def _unsigned(q: str, r: Range, nonzero: bool) -> str | None:
    """The shortest suffix making the unsigned number text `q` a number that `r` allows."""
    if r.hi is not None and r.hi < 0:
        return None
    if "." in q:
        whole, fraction = q.split(".")
        base = Decimal(f"{whole}.{fraction or '0'}")
        unit = Decimal(1).scaleb(-len(fraction))
        for decimals in range(max(1, len(fraction)), MAX_DECIMALS + 1):
            step = Decimal(1).scaleb(-decimals)
            x = _lowest(base, base + unit - step, step, r, nonzero)
            if x is not None:
                return f"{x:.{decimals}f}"[len(q):]
        return None
    bound = max((abs(b) for b in (r.lo, r.hi) if b is not None), default=Decimal(0))
    most = min(_DIGITS, len(str(int(bound))) + 2)
    best: str | None = None
    for k in range(0 if q else 1, most + 1):
        if best is not None and k >= len(best):
            break
        if q == "0" and k > 0:
            break
        if q:
            low = Decimal(int(q)).scaleb(k)
            high = low + Decimal(1).scaleb(k) - 1
        else:
            low, high = (Decimal(0), Decimal(9)) if k == 1 else (Decimal(1).scaleb(k - 1), Decimal(1).scaleb(k) - 1)
        x = _lowest(low, high, Decimal(1), r, nonzero)
        if x is not None:
            best = str(int(x))[len(q):]
            break
        if r.integer:
            continue
        for decimals in range(1, MAX_DECIMALS + 1):
            if best is not None and k + 1 + decimals >= len(best):
                break
            step = Decimal(1).scaleb(-decimals)
            x = _lowest(low, high + 1 - step, step, r, nonzero)
            if x is not None:
                best = f"{x:.{decimals}f}"[len(q):]
                break
    return best
