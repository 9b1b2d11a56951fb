"""gRPC status -> HTTP status and OpenAI's error shape, one table for both front doors.

The REST shim raises and receives the same ServiceError as the gRPC servicer
(in process, or rebuilt from an upstream's status and BadRequest details), so
an error reads the same whichever door it came through: the HTTP status from
this table, `param` naming the first offending field, the message naming all.
The table is printed in docs/rest.md, and the tests check every row of it
against a running shim.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc

from service.errors import ServiceError


@dataclass(frozen=True, slots=True)
class HttpError:
    status: int
    type: str


_TABLE: dict[grpc.StatusCode, HttpError] = {
    grpc.StatusCode.INVALID_ARGUMENT: HttpError(400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: HttpError(400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: HttpError(400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: HttpError(401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: HttpError(403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: HttpError(404, "not_found_error"),
    grpc.StatusCode.ALREADY_EXISTS: HttpError(409, "conflict_error"),
    grpc.StatusCode.ABORTED: HttpError(409, "conflict_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: HttpError(429, "rate_limit_error"),
    grpc.StatusCode.CANCELLED: HttpError(499, "cancelled_error"),
    grpc.StatusCode.UNIMPLEMENTED: HttpError(501, "not_implemented_error"),
    grpc.StatusCode.UNAVAILABLE: HttpError(503, "service_unavailable_error"),
    grpc.StatusCode.DEADLINE_EXCEEDED: HttpError(504, "timeout_error"),
}
_INTERNAL = HttpError(500, "server_error")  # INTERNAL, UNKNOWN, DATA_LOSS and anything unforeseen


def http_error(code: grpc.StatusCode) -> HttpError:
    return _TABLE.get(code, _INTERNAL)


class BodyTooLarge(ServiceError):
    """A request body past --max-message-bytes: 413 on REST (RESOURCE_EXHAUSTED, as gRPC itself answers)."""

    def __init__(self, size: str, limit: int) -> None:
        super().__init__(grpc.StatusCode.RESOURCE_EXHAUSTED, f"the request body is {size} bytes; at most {limit} "
                                                             "are accepted (--max-message-bytes)")


def openai_error(error: ServiceError) -> tuple[int, dict[str, Any]]:
    """The HTTP status and `{"error": {message, type, param, code}}`; code is the gRPC status, lower-cased."""
    if isinstance(error, BodyTooLarge):
        return 413, {"error": {"message": error.message, "type": "invalid_request_error", "param": "body",
                               "code": error.code.name.lower()}}
    mapped = http_error(error.code)
    param = error.violations[0].field if error.violations else None
    return mapped.status, {"error": {"message": error.message, "type": mapped.type, "param": param,
                                     "code": error.code.name.lower()}}


def dataoorts_error(error: ServiceError) -> tuple[int, dict[str, Any]]:
    """The same error in the `/api/v1` wrapper: listed in `errors`, with success false."""
    status, body = openai_error(error)
    entry = {"code": status, "message": error.message, "param": body["error"]["param"]}
    return status, {"errors": [entry], "messages": [], "result": None, "success": False}


def route_error(status: int, method: str, path: str) -> dict[str, Any]:
    """An unknown route (404) or a method the route does not take (405), in the same shape as every other error."""
    if status == 405:
        return {"error": {"message": f"{method} is not allowed on {path}", "type": "invalid_request_error",
                          "param": None, "code": "method_not_allowed"}}
    return {"error": {"message": f"no route {method} {path}; see docs/rest.md for the routes",
                      "type": http_error(grpc.StatusCode.NOT_FOUND).type, "param": None, "code": "not_found"}}
