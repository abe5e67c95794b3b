"""Domain-independent errors that service code raises and the gRPC layer maps to statuses.

Each error carries an AIP-193 style ``reason`` (UPPER_SNAKE_CASE, stable, machine-readable)
and optional string ``metadata``; the error-mapping interceptor turns them into a
``google.rpc.Status`` with ``ErrorInfo`` (and ``BadRequest`` for invalid arguments).
Envoy's transcoder then maps the gRPC code to the HTTP status noted on each class.
"""

# The class names mirror gRPC status codes (the API contract), hence no "Error" suffix.
# ruff: noqa: N818

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import grpc

ERROR_DOMAIN = "cake"


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One invalid request field; ``field`` is a path such as ``email`` or ``items[0].sku``."""

    field: str
    description: str


class CakeError(Exception):
    """Base of every error a Cake service raises on purpose.

    ``message`` is shown to API clients as-is, so it must never contain secrets or internals.
    """

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN
    default_reason: ClassVar[str] = "UNKNOWN"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
        retry_after_seconds: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.metadata: dict[str, str] = dict(metadata or {})
        self.retry_after_seconds = retry_after_seconds
        """When set, the answer carries a ``retry-after`` header (seconds) saying when a
        retry may succeed."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, reason={self.reason!r})"


class InvalidArgument(CakeError):
    """The request is malformed (HTTP 400); carries one violation per bad field."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    default_reason = "INVALID_ARGUMENT"

    def __init__(
        self,
        message: str,
        violations: Sequence[FieldViolation] = (),
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message, reason=reason, metadata=metadata)
        self.violations: list[FieldViolation] = list(violations)


class NotFound(CakeError):
    """The addressed resource does not exist (HTTP 404)."""

    code = grpc.StatusCode.NOT_FOUND
    default_reason = "NOT_FOUND"


class AlreadyExists(CakeError):
    """The resource to create conflicts with an existing one (HTTP 409)."""

    code = grpc.StatusCode.ALREADY_EXISTS
    default_reason = "ALREADY_EXISTS"


class Aborted(CakeError):
    """The request conflicts with one still in progress; retry later (HTTP 409)."""

    code = grpc.StatusCode.ABORTED
    default_reason = "ABORTED"


class Unauthenticated(CakeError):
    """Missing, invalid, expired or revoked credentials (HTTP 401)."""

    code = grpc.StatusCode.UNAUTHENTICATED
    default_reason = "UNAUTHENTICATED"


class PermissionDenied(CakeError):
    """The caller is known but not allowed to do this (HTTP 403)."""

    code = grpc.StatusCode.PERMISSION_DENIED
    default_reason = "PERMISSION_DENIED"


class ResourceExhausted(CakeError):
    """A quota or rate limit was hit (HTTP 429)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_reason = "RESOURCE_EXHAUSTED"


class FailedPrecondition(CakeError):
    """The request is well-formed but the system state forbids it (HTTP 400)."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    default_reason = "FAILED_PRECONDITION"


class Unavailable(CakeError):
    """A dependency is down; the caller may retry later (HTTP 503)."""

    code = grpc.StatusCode.UNAVAILABLE
    default_reason = "UNAVAILABLE"
