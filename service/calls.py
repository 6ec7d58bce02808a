"""Every RPC on the serving port passes one interceptor: it gives the call a request id, finds
out who is calling and whether they may, and when the call ends hands its record to the
observers (the audit log, the metrics).

The record (:class:`CallRecord`) is filled in by the interceptor (id, RPC, peer, caller,
outcome, latency) and by the handler that serves the call, through :func:`current_call`
(model, version, methods, targets, batch size, engine time). It holds no waveform and no
ECG identifier, by construction: nothing that comes from a request's ECGs has a field here.

The request id goes back to the client as the ``x-request-id`` trailing metadata, so a
hospital's support desk can find the audit line of a call a user reports.

No PyTorch here (the serving path).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Collection, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import grpc

from ecgx.service.errors import ServiceError
from ecgx.service.rpc import failure_status

log = logging.getLogger(__name__)

REQUEST_ID_KEY = "x-request-id"


@dataclass(frozen=True)
class Identity:
    """Who is calling: a token's or a certificate's name, how it was proven, what it may do."""

    name: str
    via: str  # "token" | "certificate" | "none" (an insecure server: nobody is identified)
    scopes: frozenset[str] = frozenset()


@dataclass
class CallRecord:
    """One RPC, as the audit log and the metrics see it (never a waveform or an ECG id)."""

    request_id: str
    rpc: str  # the full method name, "/ecgx.v1.ExplanationService/Explain"
    peer: str  # the client's address as gRPC reports it, "ipv4:10.1.2.3:51234"
    started: float = field(default_factory=time.time)  # UNIX time
    caller: str = ""  # Identity.name; "" when no one was identified
    auth: str = "none"  # Identity.via
    model: str = ""  # set by the handler, only to a name the repository has
    version: str = ""
    methods: tuple[str, ...] = ()
    targets: tuple[str, ...] = ()  # class keys explained
    batch_size: int = 0  # ECGs in the request
    code: str = "OK"  # grpc.StatusCode name of the outcome
    latency_s: float = 0.0
    engine_s: float = 0.0  # time spent in ONNX Runtime sessions
    clock: float = field(default_factory=time.perf_counter, repr=False)  # for latency_s
    identity: Identity | None = field(default=None, repr=False)  # for handlers' own scope checks

    @property
    def service(self) -> str:
        return self.rpc.rsplit("/", 2)[-2] if self.rpc.count("/") >= 2 else ""

    @property
    def method_name(self) -> str:
        """The RPC's own name, "Explain"."""
        return self.rpc.rsplit("/", 1)[-1]

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        del out["clock"], out["identity"]
        return out


_CURRENT: ContextVar[CallRecord | None] = ContextVar("ecgx_current_call", default=None)


def current_call() -> CallRecord | None:
    """The record of the RPC this thread is serving (None outside an intercepted call)."""
    return _CURRENT.get()


def note_call(
    served: Any = None,
    *,
    model: str | None = None,
    methods: Sequence[str] | None = None,
    targets: Sequence[str] | None = None,
    batch_size: int | None = None,
    engine_s: float | None = None,
) -> None:
    """Fill in the current call's record from the handler (no-op outside an intercepted call).

    ``served`` (a repository ``ServedVersion``) sets model and version, ``model`` the model
    alone: only names the repository has, never what the client typed, so log lines and metric
    labels stay bounded.
    """
    record = _CURRENT.get()
    if record is None:
        return
    if served is not None:
        record.model, record.version = served.model, served.version
    elif model is not None:
        record.model = model
    if methods is not None:
        record.methods = tuple(methods)
    if targets is not None:
        record.targets = tuple(targets)
    if batch_size is not None:
        record.batch_size = int(batch_size)
    if engine_s is not None:
        record.engine_s = float(engine_s)


class EngineClock:
    """Adds up the time spent in ``with`` blocks (the engine's share of a call)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._t0 = 0.0

    def __enter__(self) -> EngineClock:
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds += time.perf_counter() - self._t0


class Authenticator(Protocol):
    """Proves who calls (``identify``) and whether they may call an RPC (``authorize``)."""

    def identify(self, context: grpc.ServicerContext) -> Identity:
        """The caller, from the client certificate or a bearer token; raises
        :class:`ecgx.service.errors.Unauthenticated` when there is none or it is not valid."""

    def authorize(self, identity: Identity, rpc: str) -> None:
        """Raise :class:`ecgx.service.errors.PermissionDenied` when ``identity`` may not call ``rpc``."""


class CallObserver(Protocol):
    """Told about every call; must not raise (failures are logged and the call goes on)."""

    def call_started(self, record: CallRecord) -> None: ...

    def call_finished(self, record: CallRecord) -> None: ...


class CallInterceptor(grpc.ServerInterceptor):
    """Authenticates and authorises every RPC (except ``open_rpcs``), then tells the observers.

    Args:
        authenticator: None serves everyone unidentified (insecure mode, an explicit choice).
        open_rpcs: full method names, or service prefixes ending in "/", served without
            credentials (health and reflection, for probes); they are still audited.
        observers: told when each call starts and ends (audit log, metrics).
    """

    def __init__(
        self,
        authenticator: Authenticator | None,
        *,
        open_rpcs: Collection[str] = (),
        observers: Sequence[CallObserver] = (),
    ):
        self.authenticator = authenticator
        self.open_rpcs = tuple(open_rpcs)
        self.observers = tuple(observers)

    def is_open(self, rpc: str) -> bool:
        return any(rpc == o or (o.endswith("/") and rpc.startswith(o)) for o in self.open_rpcs)

    def intercept_service(self, continuation: Callable, handler_call_details: Any) -> Any:
        handler = continuation(handler_call_details)
        if handler is None:
            return None  # an unknown method: gRPC answers UNIMPLEMENTED
        rpc = handler_call_details.method
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(rpc, handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._streaming(rpc, handler.unary_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._unary(rpc, handler.stream_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return grpc.stream_stream_rpc_method_handler(
            self._streaming(rpc, handler.stream_stream),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    # ------------------------------------------------------------------ one call

    def _unary(self, rpc: str, behavior: Callable) -> Callable:
        def run(request: Any, context: grpc.ServicerContext) -> Any:
            record = self._begin(rpc, context)
            token = _CURRENT.set(record)
            failed: BaseException | None = None
            try:
                self._admit(record, context)
                return behavior(request, context)
            except BaseException as e:
                failed = e
                raise
            finally:
                _CURRENT.reset(token)
                self._end(record, context, failed)

        return run

    def _streaming(self, rpc: str, behavior: Callable) -> Callable:
        def run(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            # No current_call() here: a generator may be resumed in another context, and no
            # streaming RPC (health Watch, reflection) fills in a record anyway.
            record = self._begin(rpc, context)
            failed: BaseException | None = None
            try:
                self._admit(record, context)
                yield from behavior(request, context)
            except BaseException as e:
                failed = e
                raise
            finally:
                self._end(record, context, failed)

        return run

    def _begin(self, rpc: str, context: grpc.ServicerContext) -> CallRecord:
        record = CallRecord(request_id=uuid.uuid4().hex, rpc=rpc, peer=context.peer() or "")
        context.set_trailing_metadata(((REQUEST_ID_KEY, record.request_id),))
        self._tell("call_started", record)
        return record

    def _admit(self, record: CallRecord, context: grpc.ServicerContext) -> None:
        """Identify and authorise the caller, or abort with UNAUTHENTICATED / PERMISSION_DENIED."""
        if self.authenticator is None or self.is_open(record.rpc):
            return
        try:
            identity = self.authenticator.identify(context)
            record.caller, record.auth, record.identity = identity.name, identity.via, identity
            self.authenticator.authorize(identity, record.rpc)
        except ServiceError as e:
            code, message = failure_status(e, record.method_name)
            context.abort(code, message)

    def _end(self, record: CallRecord, context: grpc.ServicerContext, failed: BaseException | None) -> None:
        record.latency_s = time.perf_counter() - record.clock
        record.code = _outcome(context, failed)
        self._tell("call_finished", record)

    def _tell(self, event: str, record: CallRecord) -> None:
        for observer in self.observers:
            try:
                getattr(observer, event)(record)
            except Exception:  # an observer must never fail or hide a call
                log.exception("%s.%s failed", type(observer).__name__, event)


def _outcome(context: grpc.ServicerContext, failed: BaseException | None) -> str:
    """The status code name a call ended with."""
    code = context.code() if hasattr(context, "code") else None
    if isinstance(code, grpc.StatusCode):
        return code.name
    if failed is None:
        return "OK"
    if isinstance(failed, ServiceError):
        return failed.code
    return "UNKNOWN"  # gRPC answers an exception nobody turned into a status with UNKNOWN


__all__ = [
    "REQUEST_ID_KEY",
    "Authenticator",
    "CallInterceptor",
    "CallObserver",
    "CallRecord",
    "EngineClock",
    "Identity",
    "current_call",
    "note_call",
]
