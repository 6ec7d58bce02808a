"""Every call on the serving port passes one place: it gets a request id, its caller is proven and
authorised before its message is read, long-lived streams are admitted against their own cap, and
when it ends its record goes to the observers (the audit log, the metrics).

Two layers, so that every transport shares them:

- :class:`CallLedger` is transport-neutral. A transport (gRPC here, the OIP REST adapter) calls
  ``record = ledger.open(rpc, peer, transport)``, then ``ledger.admit(record, headers, peer_cert_pem)``
  (raises a :class:`ecgx.core.errors.EcgxError`: UNAUTHENTICATED, PERMISSION_DENIED,
  UNAVAILABLE when a required audit log cannot be written), runs the handler inside
  ``with ledger.serving(record):`` (so :func:`current_call` / :func:`note_call` work), and ends
  with ``code = ledger.close(record, outcome_code)``. ``close`` returns the code the client must
  get: UNAVAILABLE instead of the handler's when a required audit line could not be written
  (fail closed: an answer nobody recorded is not given). ``headers`` is any iterable of
  ``(name, value)`` pairs (gRPC metadata, or an HTTP header mapping's ``items()``, names lower
  case); ``peer_cert_pem`` the verified client certificate (mutual TLS) or None.
- :class:`CallInterceptor` is the gRPC transport of it. Every handler is re-registered with a
  streaming request and no deserializer, so gRPC reads nothing before the caller is admitted (a
  refused caller's message is never buffered, whatever its size), and the raw bytes are decoded
  here: a message that does not parse is INVALID_ARGUMENT, logged at most once a minute, never a
  traceback per request. Response streams (health Watch, reflection) count against
  :class:`StreamLimits`, never against the request slots; past the cap they are
  RESOURCE_EXHAUSTED, audited and counted like every refusal.

The record (:class:`CallRecord`) holds no waveform and no ECG identifier, by construction. The
request id goes back to the client as ``x-request-id`` trailing metadata.

No PyTorch here (the serving path).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import grpc

from ecgx.core.errors import EcgxError, InvalidArgument, ResourceExhausted, Unavailable
from ecgx.service.requests import Caller
from ecgx.service.rpc import failure_status

log = logging.getLogger(__name__)

REQUEST_ID_KEY = "x-request-id"
BAD_MESSAGE_LOG_INTERVAL_S = 60.0


# Fixed refusal categories (metric label values and the audit line's ``refusal``): bounded.
REFUSAL_AUTH = "unauthenticated"
REFUSAL_SCOPE = "permission_denied"
REFUSAL_MESSAGE = "bad_message"
REFUSAL_STREAMS = "stream_cap"
REFUSAL_AUDIT = "audit_unavailable"
REFUSAL_CLIENT_GONE = "client_gone"  # cancelled or past its deadline before the answer
REFUSAL_LIMIT = "resource_limit"  # RESOURCE_EXHAUSTED from a limit that did not name itself
# The message never arrived: the client cancelled while sending, or it was over gRPC's size limit
# (the C core then answers RESOURCE_EXHAUSTED itself; Python sees only a cancelled call).
REFUSAL_UNREAD = "request_not_received"


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
    # "grpc" or "http": the REST transport records its calls under the OIP gRPC method names (one
    # scope table, one set of metrics), so the audit line says which wire a call came over.
    transport: str = "grpc"
    started: float = field(default_factory=time.time)  # UNIX time
    caller: str = ""  # Identity.name; "" when no one was identified
    auth: str = "none"  # Identity.via
    model: str = ""  # set by the handler, only to a name the repository has
    version: str = ""
    methods: tuple[str, ...] = ()
    targets: tuple[str, ...] = ()  # class keys explained
    batch_size: int = 0  # ECGs in the request
    code: str = "OK"  # grpc.StatusCode name of the outcome
    refusal: str = ""  # why it was refused, a fixed category ("" when it was not)
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

    @property
    def peer_host(self) -> str:
        """The peer's address without its port ("ipv4:10.1.2.3"): one key per client machine."""
        return self.peer.rsplit(":", 1)[0] if self.peer.count(":") >= 2 else self.peer

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
    refusal: str | None = None,
) -> None:
    """Fill in the current call's record from the handler (no-op outside an intercepted call).

    ``served`` (a repository ``ServedVersion``) sets model and version, ``model`` the model
    alone: only names the repository has, never what the client typed, so log lines and metric
    labels stay bounded. ``refusal``: a fixed category naming the limit that refused the call
    (e.g. "slots", "quota", "cost"), counted by the metrics and written to the audit line.
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
    if refusal is not None:
        record.refusal = refusal


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


Headers = Iterable[tuple[str, Any]]


class Authenticator(Protocol):
    """Proves who calls (``identify``) and whether they may call an RPC (``authorize``).
    Transport-neutral: headers as ``(name, value)`` pairs, the client certificate as PEM."""

    def identify(self, headers: Headers, peer_cert_pem: bytes | None) -> Identity:
        """The caller, from the client certificate or a bearer token; raises
        :class:`ecgx.core.errors.Unauthenticated` when there is none or it is not valid."""

    def authorize(self, identity: Identity, rpc: str) -> None:
        """Raise :class:`ecgx.core.errors.PermissionDenied` when ``identity`` may not call ``rpc``."""


class CallObserver(Protocol):
    """Told about every call. ``call_started`` may raise :class:`Unavailable` (the call is then
    refused before any work) and ``call_finished`` may too (the answer is then withheld and the
    client gets UNAVAILABLE); any other exception is logged and the call goes on."""

    def call_started(self, record: CallRecord) -> None: ...

    def call_finished(self, record: CallRecord) -> None: ...


@dataclass(frozen=True)
class StreamLimits:
    """Long-lived response streams (health Watch, reflection) open at once: in all and per caller
    (a token's or certificate's name, else the client's address). Each holds a server thread."""

    total: int = 16
    per_caller: int = 4

    def __post_init__(self) -> None:
        if not 1 <= self.per_caller <= self.total:
            raise InvalidArgument(f"stream limits need 1 <= per_caller <= total, got {self}")


SPARE_THREADS = 8  # beyond request slots and streams: health Check, metadata, refusals


def worker_threads(request_threads: int, streams: StreamLimits) -> int:
    """The server's thread pool size: a thread for each request that may run or wait for a slot,
    each admitted stream, and :data:`SPARE_THREADS` more, so short calls (health Check, metadata,
    refusals) always find one."""
    return request_threads + streams.total + SPARE_THREADS


class _StreamCounter:
    """Open streams per caller, under the caps of :class:`StreamLimits`."""

    def __init__(self, limits: StreamLimits):
        self.limits = limits
        self._lock = threading.Lock()
        self._open: dict[str, int] = {}
        self._total = 0

    def enter(self, key: str) -> bool:
        with self._lock:
            mine = self._open.get(key, 0)
            if self._total >= self.limits.total or mine >= self.limits.per_caller:
                return False
            self._open[key] = mine + 1
            self._total += 1
            return True

    def leave(self, key: str) -> None:
        with self._lock:
            left = self._open.get(key, 0) - 1
            if left > 0:
                self._open[key] = left
            else:
                self._open.pop(key, None)
            self._total = max(0, self._total - 1)

    @property
    def total(self) -> int:
        return self._total


class ThrottledLog:
    """Logs one line at most every ``interval_s`` seconds, saying how many were held back:
    a client sending garbage in a loop must not fill the log."""

    def __init__(self, logger: logging.Logger, interval_s: float = BAD_MESSAGE_LOG_INTERVAL_S):
        self.logger = logger
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._next = 0.0
        self._held = 0

    def warning(self, message: str, *args: Any) -> None:
        with self._lock:
            now = time.monotonic()
            if now < self._next:
                self._held += 1
                return
            held, self._held, self._next = self._held, 0, now + self.interval_s
        suffix = f" (and {held} more since the last such line)" if held else ""
        self.logger.warning(message + suffix, *args)


class CallLedger:
    """The transport-neutral admission and record keeping of calls (see the module docstring).

    Args:
        authenticator: None serves everyone unidentified (insecure mode, an explicit choice).
        open_rpcs: full method names, or service prefixes ending in "/", served without
            credentials (health and reflection, for probes); they are still audited.
        observers: told when each call starts and ends (audit log first, then metrics).
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

    def open(self, rpc: str, peer: str, transport: str = "grpc") -> CallRecord:
        """A new call's record (observers are told in :meth:`admit`)."""
        return CallRecord(request_id=uuid.uuid4().hex, rpc=rpc, peer=peer or "", transport=transport)

    def admit(self, record: CallRecord, headers: Headers, peer_cert_pem: bytes | None) -> None:
        """Tell the observers the call started, then identify and authorise the caller; raises a
        EcgxError (UNAVAILABLE, UNAUTHENTICATED, PERMISSION_DENIED) to refuse it."""
        for observer in self.observers:
            try:
                observer.call_started(record)
            except Unavailable:
                record.refusal = REFUSAL_AUDIT
                raise
            except Exception:  # an observer must never fail or hide a call
                log.exception("%s.call_started failed", type(observer).__name__)
        if self.authenticator is None or self.is_open(record.rpc):
            return
        try:
            identity = self.authenticator.identify(headers, peer_cert_pem)
        except EcgxError:
            record.refusal = REFUSAL_AUTH
            raise
        record.caller, record.auth, record.identity = identity.name, identity.via, identity
        try:
            self.authenticator.authorize(identity, record.rpc)
        except EcgxError:
            record.refusal = REFUSAL_SCOPE
            raise

    @contextmanager
    def serving(self, record: CallRecord) -> Iterator[CallRecord]:
        """Make ``record`` the :func:`current_call` of this thread while the handler runs."""
        token = _CURRENT.set(record)
        try:
            yield record
        finally:
            _CURRENT.reset(token)

    def close(self, record: CallRecord, code: str) -> str:
        """Record the call's outcome ``code`` and tell every observer (each once). Returns the
        code the client must get: ``code``, or UNAVAILABLE when an observer (a required audit
        log) could not record it."""
        record.latency_s = time.perf_counter() - record.clock
        record.code = code
        if code == "RESOURCE_EXHAUSTED" and not record.refusal:
            record.refusal = REFUSAL_LIMIT  # every refusal is counted, named or not
        if code in ("CANCELLED", "DEADLINE_EXCEEDED") and not record.refusal:
            record.refusal = REFUSAL_CLIENT_GONE
        withheld = False
        for observer in self.observers:
            try:
                observer.call_finished(record)
            except Unavailable:
                # Later observers (metrics) count what the client really gets.
                withheld, record.code, record.refusal = True, Unavailable.code, REFUSAL_AUDIT
            except Exception:
                log.exception("%s.call_finished failed", type(observer).__name__)
        return Unavailable.code if withheld else code


AUDIT_UNAVAILABLE_MESSAGE = "the audit log cannot be written, and this server answers only calls it records"


class CallInterceptor(grpc.ServerInterceptor):
    """The gRPC transport of :class:`CallLedger` (arguments as there), plus the stream cap.

    Every handler is re-registered with a streaming request and no request deserializer: gRPC
    then reads the message only when this interceptor asks for it, after admission, and the
    decoding (and its failures) happen here, once for every service (ecgx.v1, OIP, health,
    reflection).
    """

    def __init__(
        self,
        authenticator: Authenticator | None,
        *,
        open_rpcs: Collection[str] = (),
        observers: Sequence[CallObserver] = (),
        streams: StreamLimits | None = None,
    ):
        self.ledger = CallLedger(authenticator, open_rpcs=open_rpcs, observers=observers)
        self.streams = _StreamCounter(streams or StreamLimits())
        self._bad_messages = ThrottledLog(log)
        self._wrapped: dict[str, tuple[Any, Any]] = {}  # rpc -> (gRPC's handler, ours)

    @property
    def authenticator(self) -> Authenticator | None:
        return self.ledger.authenticator

    def is_open(self, rpc: str) -> bool:
        return self.ledger.is_open(rpc)

    def intercept_service(self, continuation: Callable, handler_call_details: Any) -> Any:
        handler = continuation(handler_call_details)
        if handler is None:
            return None  # an unknown method: gRPC answers UNIMPLEMENTED
        rpc = handler_call_details.method
        # gRPC runs this for every call on its one polling thread: the wrapped handler is built
        # once per method (and per registered handler object) and reused, not rebuilt per call.
        cached = self._wrapped.get(rpc)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(rpc, handler)
        self._wrapped[rpc] = (handler, wrapped)
        return wrapped

    def _wrap(self, rpc: str, handler: Any) -> Any:
        decode = self._decoder(rpc, handler.request_deserializer)
        streaming_in = handler.request_streaming
        if handler.unary_unary is not None or handler.stream_unary is not None:
            behavior = handler.unary_unary or handler.stream_unary
            return grpc.stream_unary_rpc_method_handler(
                self._unary(rpc, behavior, decode, streaming_in),
                response_serializer=handler.response_serializer,
            )
        behavior = handler.unary_stream or handler.stream_stream
        return grpc.stream_stream_rpc_method_handler(
            self._streaming(rpc, behavior, decode, streaming_in),
            response_serializer=handler.response_serializer,
        )

    # ------------------------------------------------------------------ one call

    def _unary(self, rpc: str, behavior: Callable, decode: Callable, streaming_in: bool) -> Callable:
        def run(raw_requests: Iterator[bytes], context: grpc.ServicerContext) -> Any:
            record = self._open(rpc, context)
            with self.ledger.serving(record):
                try:
                    self._admit(record, context)
                    request = self._request(record, raw_requests, decode, streaming_in, context)
                    response = behavior(request, context)
                except BaseException as e:
                    self._settle(record, context, e)
                    raise
                self._settle(record, context, None)
                return response

        return run

    def _streaming(self, rpc: str, behavior: Callable, decode: Callable, streaming_in: bool) -> Callable:
        def run(raw_requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[Any]:
            # No current_call() here: a generator may be resumed in another context, and no
            # streaming RPC (health Watch, reflection) fills in a record anyway.
            record = self._open(rpc, context)
            key = ""
            try:
                self._admit(record, context)
                key = self._enter_stream(record, context)
                request = self._request(record, raw_requests, decode, streaming_in, context)
                yield from behavior(request, context)
            except BaseException as e:
                self._settle(record, context, e)
                raise
            finally:
                if key:
                    self.streams.leave(key)
            self._settle(record, context, None)

        return run

    def _open(self, rpc: str, context: grpc.ServicerContext) -> CallRecord:
        record = self.ledger.open(rpc, context.peer() or "")
        context.set_trailing_metadata(((REQUEST_ID_KEY, record.request_id),))
        return record

    def _admit(self, record: CallRecord, context: grpc.ServicerContext) -> None:
        """Admit the caller before anything is read, or abort (UNAUTHENTICATED, ...)."""
        try:
            self.ledger.admit(record, _metadata(context), _peer_pem(context))
        except EcgxError as e:
            _abort(context, e, record.method_name)

    def _enter_stream(self, record: CallRecord, context: grpc.ServicerContext) -> str:
        key = record.caller or record.peer_host
        if self.streams.enter(key):
            return key
        record.refusal = REFUSAL_STREAMS
        limits = self.streams.limits
        _abort(
            context,
            ResourceExhausted(
                f"too many open streams (health Watch, reflection): at most {limits.total} on this server "
                f"and {limits.per_caller} per caller; close one and retry"
            ),
            record.method_name,
        )
        return ""  # not reached: abort raises

    def _request(
        self,
        record: CallRecord,
        raw_requests: Iterator[bytes],
        decode: Callable,
        streaming_in: bool,
        context: grpc.ServicerContext,
    ) -> Any:
        """The decoded request (unary) or an iterator of decoded requests (streaming)."""
        if streaming_in:
            return _Decoded(record, raw_requests, decode, context)
        try:
            raw = next(raw_requests)
        except grpc.RpcError:
            record.refusal = REFUSAL_UNREAD
            raise
        except StopIteration:
            # No message: a client that sent none (answered here), or one over the size limit,
            # which gRPC's core refuses and cancels a moment later.
            if _ends_soon(context):
                record.refusal = REFUSAL_UNREAD
                raise grpc.RpcError("the request message never arrived") from None
            record.refusal = REFUSAL_MESSAGE
            _abort(context, InvalidArgument("the call carries no request message"), record.method_name)
        return _decode_or_abort(record, decode, raw, context)

    def _decoder(self, rpc: str, deserializer: Callable | None) -> Callable[[bytes], Any]:
        """Decode raw request bytes; what does not parse is InvalidArgument (logged throttled)."""
        kind = _message_name(deserializer)

        def decode(raw: bytes) -> Any:
            if deserializer is None:
                return raw
            try:
                return deserializer(raw)
            except Exception as e:  # DecodeError, RecursionError on deep nesting, ...
                self._bad_messages.warning(
                    "%s: a request that is not a valid %s message (%d bytes, %s) was refused",
                    rpc,
                    kind,
                    len(raw),
                    type(e).__name__,
                )
                raise InvalidArgument(
                    f"the request is not a valid {kind} message: its bytes do not decode ({type(e).__name__})"
                ) from None

        return decode

    def _settle(
        self, record: CallRecord, context: grpc.ServicerContext, failed: BaseException | None
    ) -> None:
        """Close the record with the call's real outcome; withhold the answer (UNAVAILABLE) when a
        required audit log could not record it."""
        code = _outcome(context, failed)
        final = self.ledger.close(record, code)
        if final != code and failed is None:
            context.abort(grpc.StatusCode.UNAVAILABLE, AUDIT_UNAVAILABLE_MESSAGE)


class _Decoded:
    """The request iterator of a client-streaming RPC (reflection), each message decoded."""

    def __init__(
        self, record: CallRecord, raw: Iterator[bytes], decode: Callable, context: grpc.ServicerContext
    ):
        self._record, self._raw, self._decode, self._context = record, raw, decode, context

    def __iter__(self) -> _Decoded:
        return self

    def __next__(self) -> Any:
        return _decode_or_abort(self._record, self._decode, next(self._raw), self._context)


def _decode_or_abort(record: CallRecord, decode: Callable, raw: bytes, context: grpc.ServicerContext) -> Any:
    try:
        return decode(raw)
    except InvalidArgument as e:
        record.refusal = REFUSAL_MESSAGE
        _abort(context, e, record.method_name)


def _ends_soon(context: grpc.ServicerContext, wait_s: float = 0.1) -> bool:
    """Whether the call stops being active within ``wait_s`` (gRPC's core cancelled it)."""
    deadline = time.monotonic() + wait_s
    while context.is_active():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)
    return True


def _abort(context: grpc.ServicerContext, error: EcgxError, where: str) -> None:
    code, message = failure_status(error, where or "request")
    context.abort(code, message)


def _metadata(context: grpc.ServicerContext) -> list[tuple[str, Any]]:
    return [(m.key, m.value) for m in context.invocation_metadata() or ()]


def _peer_pem(context: grpc.ServicerContext) -> bytes | None:
    """The verified client certificate (PEM) of a mutual-TLS connection, else None."""
    pem = (context.auth_context() or {}).get("x509_pem_cert")
    return pem[0] if pem else None


def _message_name(deserializer: Callable | None) -> str:
    owner = getattr(deserializer, "__self__", None)
    descriptor = getattr(owner, "DESCRIPTOR", None)
    return getattr(descriptor, "full_name", "request")


def _outcome(context: grpc.ServicerContext, failed: BaseException | None) -> str:
    """The status code name a call really ended with, as its client sees it."""
    code = context.code() if hasattr(context, "code") else None
    if isinstance(code, grpc.StatusCode) and code != grpc.StatusCode.OK:
        return code.name
    if isinstance(failed, EcgxError):
        return failed.code
    if isinstance(failed, grpc.RpcError) or (failed is None and not context.is_active()):
        # The client went away (or its deadline passed) before the answer: not an OK.
        remaining = context.time_remaining()
        return "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"
    if failed is None or isinstance(failed, GeneratorExit):
        return "OK" if failed is None else "CANCELLED"
    return "UNKNOWN"  # gRPC answers an exception nobody turned into a status with UNKNOWN


__all__ = [
    "AUDIT_UNAVAILABLE_MESSAGE",
    "REQUEST_ID_KEY",
    "Authenticator",
    "CallInterceptor",
    "CallLedger",
    "CallObserver",
    "CallRecord",
    "EngineClock",
    "Identity",
    "StreamLimits",
    "ThrottledLog",
    "Unavailable",
    "current_call",
    "note_call",
    "worker_threads",
]


def caller_of(context: grpc.ServicerContext) -> Caller:
    """Who calls, as the interceptor identified them (nobody outside an intercepted call)."""
    record = current_call()
    if record is None:
        return Caller.of(None, context.peer() or "")
    return Caller.of(record.identity, record.peer)  # the peer the record already read from gRPC
