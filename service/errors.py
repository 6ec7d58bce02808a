"""Typed errors of the service: each maps onto one gRPC status code.

No bare ValueError crosses the service boundary: the engine and the repository raise
these (all are ValueErrors, so existing callers that catch ValueError keep working).
"""

from __future__ import annotations


class ServiceError(ValueError):
    """Base of the service's typed errors; the message says what is wrong."""


class InvalidArgument(ServiceError):
    """Bad input: wrong shape, NaN/Inf, out-of-range parameter (INVALID_ARGUMENT)."""


class NotFound(ServiceError):
    """An unknown model, version, method or target (NOT_FOUND)."""


class FailedPrecondition(ServiceError):
    """The request is valid but cannot be served now: a version that does not serve, a method
    the gate did not pass (FAILED_PRECONDITION)."""


class ResourceExhausted(ServiceError):
    """Over a limit: batch size, concurrency, cost cap (RESOURCE_EXHAUSTED)."""


class Cancelled(ServiceError):
    """The client cancelled or its deadline passed (CANCELLED)."""
