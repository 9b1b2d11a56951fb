"""Who may start a request now: API keys, the server's phase, and the calls in flight.

Both front doors (the gRPC servicer and the REST shim, co-located or
standalone) admit through one `Admission`, so a key, a drain or a failed
engine reads the same on either port, and the drain waits for both.
"""

from __future__ import annotations

import asyncio
import enum
import hmac
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import grpc

from service.errors import ServiceError

MAX_REQUEST_ID_CHARS = 128  # longer ids are replaced: they are echoed, forwarded and written into every log line


def request_id(offered: str | None) -> str:
    """The caller's request id, or a new one when it sent none or one too long to log. An id must be printable
    ASCII, as gRPC metadata is: anything else is refused, naming the header, rather than passed on to fail later."""
    if not offered or len(offered) > MAX_REQUEST_ID_CHARS:
        return uuid.uuid4().hex
    if not all(" " <= ch <= "~" for ch in offered):
        raise ServiceError.invalid_field("x-request-id", "must be printable ASCII")
    return offered


@dataclass(frozen=True, slots=True)
class Call:
    """What a front door knows of one call, whichever transport carried it."""

    request_id: str
    deadline: float | None = None  # time.monotonic()
    authorization: str = ""        # as sent: the standalone REST shim forwards it upstream

    @property
    def timeout(self) -> float | None:
        """Seconds left before the deadline, for a call made on this one's behalf."""
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())


class Phase(enum.Enum):
    LOADING = "loading"
    SERVING = "serving"
    DRAINING = "draining"
    UNHEALTHY = "unhealthy"  # an engine failed for good: only a restart brings the server back


_REFUSALS = {
    Phase.LOADING: "the server is still loading its models",
    Phase.DRAINING: "the server is shutting down; retry on another replica",
    Phase.UNHEALTHY: "a model engine has failed; retry on another replica",
}


class Admission:
    """Read by both front doors and mirrored into gRPC health, so all three agree."""

    def __init__(self, api_keys: Sequence[str] = ()) -> None:
        self.phase = Phase.LOADING
        self.in_flight = 0
        self.cutoff = asyncio.Event()  # set when a drain's grace period ran out: front doors end what still runs
        self._keys = tuple(k.encode() for k in api_keys)

    def check_key(self, authorization: str, how_to_send: str) -> None:
        """Raises UNAUTHENTICATED unless `authorization` is `Bearer <a configured key>`. Every key is compared,
        in constant time, so the answer's timing says nothing about how much of a key was right."""
        if not self._keys:
            return
        scheme, _, key = authorization.partition(" ")
        offered = key.encode("utf-8", "surrogateescape")
        matched = False
        for known in self._keys:
            matched |= hmac.compare_digest(known, offered)
        if scheme.lower() != "bearer" or not matched:
            raise ServiceError(grpc.StatusCode.UNAUTHENTICATED, f"missing or invalid API key ({how_to_send})")

    def admit(self) -> None:
        """Raises UNAVAILABLE unless serving: the client should go to another replica, or retry later."""
        if self.phase is not Phase.SERVING:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, _REFUSALS[self.phase])

    @contextmanager
    def tracked(self) -> Iterator[None]:
        """Counts a running call, which a drain waits for."""
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1

    async def drain(self, grace_period: float) -> int:
        """Refuses new calls and waits up to `grace_period` for running ones; returns how many did not finish,
        and sets `cutoff` when some did not, so that each ends with an error its client can read."""
        if self.phase is Phase.SERVING or self.phase is Phase.LOADING:
            self.phase = Phase.DRAINING
        deadline = time.monotonic() + grace_period
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.in_flight:
            self.cutoff.set()
        return self.in_flight

    async def settled(self, timeout: float) -> None:
        """Waits, at most `timeout` seconds, for the calls that `cutoff` ended to have answered."""
        deadline = time.monotonic() + timeout
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
