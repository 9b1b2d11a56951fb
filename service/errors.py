"""The one error type the serving core raises.

It carries a gRPC status code and, for bad input, every offending field, so
the gRPC layer can answer with google.rpc.BadRequest details and the REST shim
with OpenAI's error shape, from the same object.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc


@dataclass(frozen=True, slots=True)
class FieldViolation:
    field: str          # a path into the request, e.g. "messages[1].role"
    description: str


class ServiceError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str, violations: tuple[FieldViolation, ...] = ()) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.violations = violations

    @classmethod
    def invalid(cls, violations: list[FieldViolation]) -> ServiceError:
        summary = "; ".join(f"{v.field}: {v.description}" for v in violations)
        return cls(grpc.StatusCode.INVALID_ARGUMENT, f"invalid request: {summary}", tuple(violations))

    @classmethod
    def invalid_field(cls, field: str, description: str) -> ServiceError:
        return cls.invalid([FieldViolation(field, description)])
