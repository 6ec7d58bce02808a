"""The HTTP/1.1 server under the REST transport: bounded, TLS, credentials before bodies.

Built on the standard library (``socketserver`` for the accept loop, ``http.server`` for request
line and header parsing) with what a hostile network needs added here, in one place:

- **Bounded**: at most ``max_connections`` open connections, each served by one thread of a
  fixed pool. A connection that is *idle* (TLS handshake, waiting for or still reading a
  request's headers) can be closed to make room: at the cap a new connection evicts the oldest
  idle one, so idle or slow-header clients cannot lock the port; only connections whose request
  is being served are safe. With every connection busy a new one is refused at once (503 on
  plaintext, closed on TLS).
- **Timeouts** on every read: the TLS handshake, the wait for the next request on a kept-alive
  connection, each header line, each body read; and a deadline for the whole body (its size at
  ``min_body_rate``), so a client trickling its body cannot hold a thread.
- **TLS** with the handshake in the connection's own thread (never in the accept loop, where
  one silent client would stall every other: cheroot's open issue #748), and the client
  certificate (mutual TLS) handed to the application as PEM.
- **Bodies are read only when the application asks** (:meth:`HttpRequest.body`), after it has
  checked the credentials in the headers; ``Expect: 100-continue`` is answered only then.
  Content-Length over ``max_body_bytes`` is refused before a byte of the body is read; a body
  the application did not read is never buffered: the answer goes out with
  ``Connection: close`` and at most ``drain_bytes`` are read (and dropped) so the client sees it.
  ``Transfer-Encoding`` (chunked uploads) is refused: every OIP client sends Content-Length.
- **Clean shutdown**: :meth:`HttpServer.stop` stops accepting, closes idle connections, lets
  requests in flight finish within the grace period, then closes the rest.

Parse errors are answered with a JSON body ``{"error": "..."}`` and logged at most once a
minute per kind (:class:`ecgx.service.calls.ThrottledLog`), with no request content.
No PyTorch here (the serving path).
"""

from __future__ import annotations

import contextlib
import json
import logging
import select
import socket
import socketserver
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any

from ecgx.core.errors import InvalidArgument, ResourceExhausted
from ecgx.service.calls import ThrottledLog

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024 * 1024  # as the gRPC port's message limit
_READ_CHUNK = 1024 * 1024
DRAIN_S = 1.0  # the longest an unread body is read (and dropped) after the answer


class BodyTooLarge(ResourceExhausted):
    """Content-Length over the server's limit (HTTP 413; RESOURCE_EXHAUSTED in the audit)."""


class BodyIncomplete(InvalidArgument):
    """The body ended, or stalled past the timeout, before Content-Length bytes (HTTP 400)."""


@dataclass(frozen=True)
class HttpLimits:
    """Connection and size limits of an :class:`HttpServer`."""

    max_connections: int = 64
    max_body_bytes: int = MAX_BODY_BYTES
    handshake_timeout_s: float = 5.0
    idle_timeout_s: float = 15.0  # a kept-alive connection's wait for its next request
    header_timeout_s: float = 10.0  # each read of a request's line and headers
    body_timeout_s: float = 30.0  # each read of the body (a stalled upload)
    min_body_rate: int = 256 * 1024  # bytes/s: the whole body's deadline is body_timeout_s + size / rate
    drain_bytes: int = 1024 * 1024  # read and dropped after refusing a body, so the answer arrives

    def __post_init__(self) -> None:
        if self.max_connections < 1 or self.max_body_bytes < 0 or self.min_body_rate < 1:
            raise ValueError(f"HttpLimits: out of range: {self}")


@dataclass(frozen=True)
class HttpResponse:
    """What the application answers: status, body parts (written in order, never joined)."""

    status: int
    body: Sequence[bytes] = ()
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def json(cls, status: int, value: Any, headers: Iterable[tuple[str, str]] = ()) -> HttpResponse:
        return cls(status, (json.dumps(value).encode("utf-8"),), headers=tuple(headers))

    @property
    def length(self) -> int:
        return sum(len(b) for b in self.body)


def error_response(status: int, message: str, headers: Iterable[tuple[str, str]] = ()) -> HttpResponse:
    """The JSON error body every refusal carries (KServe v2: ``{"error": "..."}``)."""
    return HttpResponse.json(status, {"error": message}, headers)


@dataclass
class HttpRequest:
    """One request as the application sees it: line and headers read, the body not yet."""

    method: str
    path: str  # percent-encoded, without the query
    query: str
    headers: Mapping[str, str]  # case-insensitive (email.message.Message)
    peer: str  # "ipv4:127.0.0.1:51234", as gRPC names peers
    client_certificate: bytes | None  # PEM of the verified client certificate (mutual TLS)
    content_length: int
    connected: Callable[[], bool] = field(repr=False, default=lambda: True)  # False: the client left
    _read: Callable[[], bytearray] = field(repr=False, default=lambda: bytearray())
    _body: bytearray | None = field(repr=False, default=None)

    def body(self) -> bytearray:
        """The body (read on the first call): BodyTooLarge over the limit, BodyIncomplete when
        the client stops short."""
        if self._body is None:
            self._body = self._read()
        return self._body

    @property
    def body_read(self) -> bool:
        return self._body is not None or self.content_length == 0


Application = Callable[[HttpRequest], HttpResponse]


class _Logs:
    """Throttled log lines of one server, one per kind: a flood must not flood the log."""

    def __init__(self) -> None:
        self.refused = ThrottledLog(log)  # unparseable requests
        self.full = ThrottledLog(log)  # the connection cap with every connection busy
        self.dropped = ThrottledLog(log)  # TLS handshakes and connections that failed


def _peer(address: Any) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"ipv6:[{host}]:{port}" if ":" in str(host) else f"ipv4:{host}:{port}"
    return str(address)


class _Connections:
    """The open connections and which are idle (evictable); thread-safe."""

    def __init__(self, limit: int):
        self.limit = limit
        self._idle_since: dict[socket.socket, float | None] = {}  # None: busy
        self._lock = threading.Lock()
        self.drained = threading.Condition(self._lock)

    def admit(self, sock: socket.socket) -> bool:
        """Register ``sock``; at the cap evict the oldest idle one first. False: every one is busy."""
        with self._lock:
            if len(self._idle_since) >= self.limit:
                idle = [(t, s) for s, t in self._idle_since.items() if t is not None]
                if not idle:
                    return False
                _, victim = min(idle, key=lambda ts: ts[0])
                del self._idle_since[victim]
                _shut(victim)
            self._idle_since[sock] = time.monotonic()
            return True

    def mark(self, sock: socket.socket, *, busy: bool) -> bool:
        """Mark ``sock`` busy or idle; False when it was evicted meanwhile (stop serving it)."""
        with self._lock:
            if sock not in self._idle_since:
                return False
            self._idle_since[sock] = None if busy else time.monotonic()
            return True

    def forget(self, sock: socket.socket) -> None:
        with self._lock:
            self._idle_since.pop(sock, None)
            self.drained.notify_all()

    def close_idle(self) -> None:
        with self._lock:
            for sock, since in list(self._idle_since.items()):
                if since is not None:
                    _shut(sock)

    def close_all(self) -> None:
        with self._lock:
            for sock in list(self._idle_since):
                _shut(sock)

    def wait_empty(self, timeout_s: float) -> None:
        """Wait until every connection has ended, or ``timeout_s`` passed."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while self._idle_since and time.monotonic() < deadline:
                self.drained.wait(min(0.1, max(0.0, deadline - time.monotonic())))

    def __len__(self) -> int:
        with self._lock:
            return len(self._idle_since)


def _connected(sock: socket.socket) -> bool:
    """Whether the client still holds the connection open: a non-blocking peek at the raw
    descriptor (under TLS too: encrypted bytes are only looked at, never consumed)."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        if not readable:
            return True  # nothing sent, still open
        # Readable: data (a pipelined request) or the end of the stream; the peek cannot block.
        return socket.socket.recv(sock, 1, socket.MSG_PEEK) != b""
    except (OSError, ValueError):
        return False  # reset, shut down, or closed (fileno -1)


def _shut(sock: socket.socket) -> None:
    """Wake the thread blocked reading ``sock``: shut the descriptor down, not the TLS object
    (``SSLSocket.shutdown`` would drop the SSL state under that thread)."""
    with contextlib.suppress(OSError):  # already closed by its thread
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    """One connection: TLS handshake, then requests until close, timeout or eviction."""

    protocol_version = "HTTP/1.1"
    server_version = "ecgx"
    sys_version = ""
    server: _Server

    # -- connection

    def setup(self) -> None:
        self.client_certificate: bytes | None = None
        limits = self.server.limits
        sock = self.request
        if isinstance(sock, ssl.SSLSocket):
            sock.settimeout(limits.handshake_timeout_s)
            sock.do_handshake()  # failures end the connection in _Server.process_connection
            der = sock.getpeercert(binary_form=True)
            if der:
                self.client_certificate = ssl.DER_cert_to_PEM_cert(der).encode("ascii")
        self.timeout = limits.idle_timeout_s
        super().setup()

    def handle_one_request(self) -> None:
        """Read one request's line and headers (idle: evictable), then serve it (busy)."""
        limits, sock = self.server.limits, self.request
        self.close_connection = True
        if not self.server.connections.mark(sock, busy=False):
            return
        sock.settimeout(limits.idle_timeout_s)
        try:
            self.raw_requestline = self.rfile.readline(65537)
        except (TimeoutError, OSError):  # idle past the timeout, evicted, or reset: just close
            return
        if not self.raw_requestline:
            return  # the client closed, or was evicted
        if len(self.raw_requestline) > 65536:
            self.requestline, self.request_version, self.command = "", "", ""
            self._refuse(414, "the request line is longer than 64 KiB")
            return
        sock.settimeout(limits.header_timeout_s)
        if not self.parse_request():  # answered (send_error) already
            return
        if not self.server.connections.mark(sock, busy=True):
            return  # evicted while its headers arrived
        self._serve()

    def handle_expect_100(self) -> bool:
        # "100 Continue" invites the body: only once the application asks for it (after the
        # credentials in the headers were checked), in _read_body.
        return True

    # -- one request

    def _serve(self) -> None:
        if self.headers.get("Transfer-Encoding") is not None:
            self._refuse(411, "Transfer-Encoding is not supported: send the body with a Content-Length")
            return
        length = self._content_length()
        if length is None:
            return
        path, _, query = self.path.partition("?")
        request = HttpRequest(
            method=self.command,
            path=path,
            query=query,
            headers=self.headers,
            peer=_peer(self.client_address),
            client_certificate=self.client_certificate,
            content_length=length,
            connected=lambda: _connected(self.request),
            _read=lambda: self._read_body(length),
        )
        try:
            response = self.server.dispatch(request)
        except Exception as e:  # the application maps every error; this is a bug
            log.error("HTTP %s: internal error", self.command, exc_info=e)
            response = error_response(500, "internal error; see the server log")
        if not request.body_read:
            self.close_connection = True  # the unread body is never buffered
        if self.headers.get("Connection", "").lower() == "close" or self.command == "HEAD":
            self.close_connection = True  # (a HEAD client reads no body: the connection ends with it)
        self._write(response)
        if not request.body_read:
            self._drain()

    def _content_length(self) -> int | None:
        values = self.headers.get_all("Content-Length") or []
        if len(set(v.strip() for v in values)) > 1:
            self._refuse(400, "conflicting Content-Length headers")
            return None
        if not values:
            return 0
        text = values[0].strip()
        if not text.isascii() or not text.isdigit() or len(text) > 18:
            self._refuse(400, "Content-Length must be a non-negative integer")
            return None
        return int(text)

    def _read_body(self, length: int) -> bytearray:
        limit = self.server.limits.max_body_bytes
        if length > limit:
            raise BodyTooLarge(f"the body is {length} bytes; this server takes at most {limit}")
        if self.headers.get("Expect", "").lower() == "100-continue":
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            self.wfile.flush()
        limits = self.server.limits
        # A deadline for the whole body besides the per-read timeout: a client trickling its body
        # cannot hold a connection (and its thread) longer than its size at min_body_rate allows.
        deadline = time.monotonic() + limits.body_timeout_s + length / limits.min_body_rate
        body = bytearray(length)
        view, got = memoryview(body), 0
        try:
            while got < length and (left := deadline - time.monotonic()) > 0:
                self.request.settimeout(min(limits.body_timeout_s, left))
                n = self.rfile.readinto1(view[got : got + _READ_CHUNK])  # one read: the deadline holds
                if not n:
                    break
                got += n
        except (TimeoutError, OSError):
            pass
        if got < length:
            self.close_connection = True
            raise BodyIncomplete(
                f"the body ended or stalled after {got} of its {length} bytes (Content-Length; at least "
                f"{limits.min_body_rate // 1024} KiB/s)"
            )
        return body

    def _write(self, response: HttpResponse) -> None:
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(response.length))
        for name, value in response.headers:
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        for part in response.body:
            self.wfile.write(part)
        self.wfile.flush()

    def _drain(self) -> None:
        """Read (and drop) a little of an unread body, so the client reads the answer rather than a
        reset; bounded in bytes and time, never buffered."""
        deadline = time.monotonic() + DRAIN_S  # in all: a trickling client cannot hold the thread here
        try:
            socket.socket.shutdown(self.request, socket.SHUT_WR)
            left = self.server.limits.drain_bytes
            while left > 0 and (wait := deadline - time.monotonic()) > 0:
                self.request.settimeout(wait)
                chunk = self.request.recv(min(65536, left))
                if not chunk:
                    break
                left -= len(chunk)
        except OSError:
            pass

    # -- errors and logging

    def _refuse(self, status: int, message: str) -> None:
        self.close_connection = True
        # The log gets the kind of error only: http.server's messages quote the client's bytes.
        kind = message.split(" (", 1)[0]
        self.server.logs.refused.warning("HTTP request refused: %s %s", status, kind)
        self._write(error_response(status, message[:300]))

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's parse errors (bad request line, headers too long or too many), as JSON."""
        text = message or self.responses.get(code, ("error",))[0]
        if code == 431 or (code == 400 and "header" in text.lower()):
            text = f"{text} (at most 100 headers of 64 KiB each)"
        self._refuse(code, text)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        return  # no access log (below)

    def log_message(self, format: str, *args: Any) -> None:
        # No access log here: paths carry client-typed names; the audit log records calls.
        return


class _Server(socketserver.TCPServer):
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(
        self,
        address: tuple[str, int],
        app: Application,
        limits: HttpLimits,
        ssl_context: ssl.SSLContext | None,
    ):
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.app = app
        # (prefix, application) pairs served before ``app`` (HttpServer.mount); replaced whole,
        # never changed in place, so a request in flight sees one consistent tuple.
        self.mounts: tuple[tuple[str, Application], ...] = ()
        self.limits = limits
        self.ssl_context = ssl_context
        self.connections = _Connections(limits.max_connections)
        self.logs = _Logs()
        # One thread per open connection, a few spare while evicted ones wind down.
        self.pool = futures.ThreadPoolExecutor(limits.max_connections + 4, thread_name_prefix="ecgx-http")
        super().__init__(address, _Handler)

    def dispatch(self, request: HttpRequest) -> HttpResponse:
        """The mounted application whose prefix holds the path, else the main one."""
        for prefix, app in self.mounts:
            if request.path == prefix or request.path.startswith(prefix + "/"):
                return app(request)
        return self.app(request)

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, address = self.socket.accept()
        if self.ssl_context is not None:
            # The handshake runs in the connection's thread (_Handler.setup), never here.
            sock = self.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        if self.connections.admit(request):
            return True
        self.logs.full.warning("HTTP port full: %d busy connections; refusing", len(self.connections))
        if not isinstance(request, ssl.SSLSocket):
            try:
                request.settimeout(0.05)
                body = b'{"error": "the server is at its connection limit; retry later"}'
                request.sendall(
                    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                    b"Connection: close\r\nRetry-After: 1\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
                )
            except OSError:
                pass
        return False

    def process_request(self, request: Any, client_address: Any) -> None:
        try:
            self.pool.submit(self.process_connection, request, client_address)
        except RuntimeError:  # the pool is shut down: stopping
            self.connections.forget(request)
            self.shutdown_request(request)

    def process_connection(self, request: Any, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except (ssl.SSLError, TimeoutError, ConnectionError) as e:
            self.logs.dropped.warning("HTTP connection dropped: %s", type(e).__name__)
        except OSError:
            pass  # evicted or shut down under the thread
        except Exception:
            log.exception("HTTP connection failed")
        finally:
            self.connections.forget(request)
            self.shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.exception("HTTP accept loop error")


class HttpServer:
    """A started-on-demand HTTP server for ``app``; ``port`` 0 picks a free one.

    Raises OSError when the address cannot be bound (port in use, not this machine's).
    """

    def __init__(
        self,
        app: Application,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        limits: HttpLimits = HttpLimits(),
        ssl_context: ssl.SSLContext | None = None,
    ):
        self._server = _Server((host, port), app, limits, ssl_context)
        self.host = host
        self.port = self._server.server_address[1]
        self.tls = ssl_context is not None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    @property
    def open_connections(self) -> int:
        return len(self._server.connections)

    def mount(self, prefix: str, app: Application) -> None:
        """Serve the paths ``prefix`` and ``prefix/...`` with ``app`` instead of the main
        application (the web viewer beside the REST transport, service/viewer.py). ``app`` gets
        the same connection limits, TLS, timeouts and lazy bodies; it checks credentials itself."""
        if not prefix.startswith("/") or prefix.endswith("/") or "?" in prefix:
            raise ValueError(f"a mount prefix is a path like /viewer, got {prefix!r}")
        server = self._server
        server.mounts = (*(m for m in server.mounts if m[0] != prefix), (prefix, app))

    def start(self) -> HttpServer:
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name="ecgx-http-accept",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self, grace_s: float = 5.0) -> None:
        """Stop accepting; close idle connections; give busy ones ``grace_s``; close the rest."""
        server = self._server
        if self._thread is not None:
            server.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        server.server_close()
        server.connections.close_idle()
        server.connections.wait_empty(grace_s)
        server.connections.close_all()
        server.pool.shutdown(wait=True, cancel_futures=True)


def server_ssl_context(cert_chain: bytes, key: bytes, client_ca: bytes | None) -> ssl.SSLContext:
    """A TLS 1.2+ server context from PEM bytes; with ``client_ca`` every client must present a
    certificate that CA signed (mutual TLS), as on the gRPC port."""
    import os
    import tempfile

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # load_cert_chain reads files only: a private temporary folder, removed at once.
    with tempfile.TemporaryDirectory(prefix="ecgx-tls-") as tmp:
        cert_path, key_path = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
        for path, data in ((cert_path, cert_chain), (key_path, key)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        context.load_cert_chain(cert_path, key_path)
    if client_ca is not None:
        context.load_verify_locations(cadata=client_ca.decode("ascii"))
        context.verify_mode = ssl.CERT_REQUIRED
    return context


__all__ = [
    "MAX_BODY_BYTES",
    "Application",
    "BodyIncomplete",
    "BodyTooLarge",
    "HttpLimits",
    "HttpRequest",
    "HttpResponse",
    "HttpServer",
    "error_response",
    "server_ssl_context",
]
