"""The one error hierarchy of ecgx.

Every error ecgx raises on purpose is an :class:`EcgxError`; its class says whose fault it is and
how each front end reports it: ``code`` is the gRPC status name the servers answer with (the
HTTP transport maps it on), ``exit_code`` is what the command line exits with. Anything that is
not an ``EcgxError`` is a bug: the servers answer INTERNAL and log it, the command line shows its
traceback.

Every category is also a ``ValueError`` (and :class:`NotFound` a ``LookupError``), as the
service's typed errors were, so code that catches those keeps working; the root is not, so a
handler that catches ``EcgxError`` never swallows a bug's ``ValueError``.
"""

from __future__ import annotations

from typing import ClassVar

EXIT_USAGE = 2  # bad input, a missing file or setting: fix the command and run it again
EXIT_UNAVAILABLE = 69  # sysexits EX_UNAVAILABLE: a resource or service was not there
EXIT_INTERNAL = 70  # sysexits EX_SOFTWARE


class EcgxError(Exception):
    """Root of every deliberate ecgx error; the message says what is wrong and what to do."""

    code: ClassVar[str] = "INTERNAL"  # grpc.StatusCode name
    exit_code: ClassVar[int] = EXIT_INTERNAL


class InvalidArgument(EcgxError, ValueError):
    """Bad input: a wrong shape, NaN/Inf, an out-of-range setting, a malformed file."""

    code = "INVALID_ARGUMENT"
    exit_code = EXIT_USAGE


class NotFound(EcgxError, ValueError, LookupError):
    """An unknown model, version, method, class or file."""

    code = "NOT_FOUND"
    exit_code = EXIT_USAGE


class FailedPrecondition(EcgxError, ValueError):
    """Valid, but not possible in the present state: a version that does not serve, a method the
    gate did not pass, an output that exists."""

    code = "FAILED_PRECONDITION"
    exit_code = EXIT_USAGE


class ResourceExhausted(EcgxError, ValueError):
    """Over a limit: a cost budget, a quota, a size cap."""

    code = "RESOURCE_EXHAUSTED"
    exit_code = EXIT_USAGE


class Cancelled(EcgxError, ValueError):
    """The caller cancelled."""

    code = "CANCELLED"
    exit_code = 130


class DeadlineExceeded(EcgxError, ValueError):
    """The caller's deadline passed before the work was done."""

    code = "DEADLINE_EXCEEDED"
    exit_code = EXIT_UNAVAILABLE


class Unauthenticated(EcgxError, ValueError):
    """No credentials, or credentials that are not valid."""

    code = "UNAUTHENTICATED"
    exit_code = EXIT_USAGE


class PermissionDenied(EcgxError, ValueError):
    """The caller is known but lacks the scope it needs."""

    code = "PERMISSION_DENIED"
    exit_code = EXIT_USAGE


class Unavailable(EcgxError, ValueError):
    """A resource the work needs is not available now (e.g. the audit log cannot be written)."""

    code = "UNAVAILABLE"
    exit_code = EXIT_UNAVAILABLE
