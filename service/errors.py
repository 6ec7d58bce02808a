"""Typed errors of the service: each maps onto one gRPC status code.

No bare ValueError crosses the service boundary: the engine and the repository raise
these (all are ValueErrors, so existing callers that catch ValueError keep working).
"""

from __future__ import annotations

# Each class names its grpc.StatusCode in ``code`` (a string, so this module needs no grpc);
# ecgx.service.server maps them one to one. Anything else that escapes a handler is INTERNAL.


class ServiceError(ValueError):
    """Base of the service's typed errors; the message says what is wrong."""

    code = "UNKNOWN"  # grpc.StatusCode name


class InvalidArgument(ServiceError):
    """Bad input: wrong shape, NaN/Inf, out-of-range parameter (INVALID_ARGUMENT)."""

    code = "INVALID_ARGUMENT"  # grpc.StatusCode name


class NotFound(ServiceError):
    """An unknown model, version, method or target (NOT_FOUND)."""

    code = "NOT_FOUND"  # grpc.StatusCode name


class FailedPrecondition(ServiceError):
    """The request is valid but cannot be served now: a version that does not serve, a method
    the gate did not pass (FAILED_PRECONDITION)."""

    code = "FAILED_PRECONDITION"  # grpc.StatusCode name


class ResourceExhausted(ServiceError):
    """Over a limit: batch size, concurrency, cost cap (RESOURCE_EXHAUSTED)."""

    code = "RESOURCE_EXHAUSTED"  # grpc.StatusCode name


class Cancelled(ServiceError):
    """The client cancelled or its deadline passed (CANCELLED)."""

    code = "CANCELLED"  # grpc.StatusCode name


class DeadlineExceeded(ServiceError):
    """The client's deadline passed before the work was done (DEADLINE_EXCEEDED)."""

    code = "DEADLINE_EXCEEDED"  # grpc.StatusCode name


class Unauthenticated(ServiceError):
    """No credentials, or credentials that are not valid (UNAUTHENTICATED)."""

    code = "UNAUTHENTICATED"  # grpc.StatusCode name


class PermissionDenied(ServiceError):
    """The caller is known but lacks the scope the RPC needs (PERMISSION_DENIED)."""

    code = "PERMISSION_DENIED"  # grpc.StatusCode name
