"""What both gRPC servicers (ecgx.v1 in service/server.py, the OIP in service/oip.py) share:
typed errors to status codes, status details of bounded size, the call's cancel token and
caller for the serving core."""

from __future__ import annotations

import logging

import grpc

from ecgx.core.errors import EcgxError
from ecgx.service.requests import CancelToken

log = logging.getLogger(__name__)

# Status details travel in HTTP/2 trailers, whose size is limited (8 kB by default): a message
# that echoes long client input (lead names) is cut rather than lost.
MAX_DETAILS_CHARS = 2000


def status_of(error: EcgxError) -> grpc.StatusCode:
    """The gRPC status code of a typed service error (each class names its code)."""
    return grpc.StatusCode[getattr(error, "code", "UNKNOWN")]


def clip_details(message: str) -> str:
    return message if len(message) <= MAX_DETAILS_CHARS else message[: MAX_DETAILS_CHARS - 3] + "..."


def failure_status(error: Exception, where: str) -> tuple[grpc.StatusCode, str]:
    """The status a handler aborts with: a typed error's own code and message, anything else
    INTERNAL with a generic message (the traceback goes to the log, never the request's samples)."""
    if isinstance(error, EcgxError):
        code, message = status_of(error), clip_details(str(error))
        # DEBUG: the message may echo what the client typed (names, a sample value); the audit
        # log and the metrics already count every refusal by code.
        log.debug("%s: %s %s", where, code.name, message)
        return code, message
    log.error("%s: internal error", where, exc_info=error)
    return grpc.StatusCode.INTERNAL, f"internal error in {where}; see the server log"


def cancel_token(context: grpc.ServicerContext) -> CancelToken:
    """The core's cancel token of a gRPC call: the client's deadline and its going away (the
    engine looks at it before every chunk of model rows)."""
    return CancelToken(is_active=context.is_active, time_remaining=context.time_remaining)
