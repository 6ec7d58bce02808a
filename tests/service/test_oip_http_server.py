"""The HTTP layer under the REST transport (service/http_server.py) on its own: real sockets on
loopback against small applications that use it as the REST transport does (read the body only
when they choose, watch ``request.connected()`` while they work). What is tested is the
server's own behaviour under slow, idle, many and departing clients."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from ecgx.core.errors import EcgxError
from ecgx.service.http_server import HttpLimits, HttpRequest, HttpResponse, HttpServer, error_response


def serve(app: Callable[[HttpRequest], HttpResponse], **limits: float) -> HttpServer:
    return HttpServer(app, limits=HttpLimits(**limits)).start()


def reading_app(request: HttpRequest) -> HttpResponse:
    try:
        return HttpResponse.json(200, {"bytes": len(request.body())})
    except EcgxError as e:
        return error_response(400, str(e))


def exchange(port: int, data: bytes, wait_s: float = 10) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=wait_s) as s:
        s.sendall(data)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except (TimeoutError, ConnectionResetError):
            pass
        return out


@pytest.fixture
def server_of() -> Iterator[Callable[..., HttpServer]]:
    servers: list[HttpServer] = []

    def make(app: Callable[[HttpRequest], HttpResponse], **limits: float) -> HttpServer:
        servers.append(serve(app, **limits))
        return servers[-1]

    yield make
    for s in servers:
        s.stop(0.5)


def test_a_body_trickled_slower_than_the_minimum_rate_is_cut_off(server_of) -> None:
    """Each byte arrives well within the per-read timeout; the whole-body deadline still holds."""
    server = server_of(reading_app, body_timeout_s=1.0, min_body_rate=100)  # 100 bytes: 2 s in all
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"POST /x HTTP/1.1\r\nContent-Length: 100\r\n\r\n")
        t0 = time.monotonic()
        answer = b""
        for _ in range(100):
            try:
                s.sendall(b"a")
            except OSError:
                break
            s.settimeout(0.4)
            try:
                answer += s.recv(4096)
            except TimeoutError:
                continue
            except ConnectionResetError:
                break
            if answer:
                break
        # The headers and the body may arrive in separate segments: read to the close.
        s.settimeout(2.0)
        while answer:
            try:
                chunk = s.recv(4096)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 400") and b"stalled" in answer, answer
    assert time.monotonic() - t0 < 3.5


def test_a_complete_body_on_a_kept_alive_connection_is_read_twice(server_of) -> None:
    server = server_of(reading_app)
    request = b"POST /x HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello"
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(request + request)  # pipelined
        answer = b""
        while answer.count(b'"bytes": 5') < 2:
            answer += s.recv(4096)
    assert answer.count(b"HTTP/1.1 200") == 2


def test_when_every_connection_is_busy_a_new_one_gets_503(server_of) -> None:
    release = threading.Event()

    def busy(request: HttpRequest) -> HttpResponse:
        release.wait(10)
        return HttpResponse.json(200, {})

    server = server_of(busy, max_connections=2)
    held = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(2)]
    try:
        for s in held:
            s.sendall(b"GET / HTTP/1.1\r\n\r\n")
        time.sleep(0.3)  # both are being served (busy: not evictable)
        answer = exchange(server.port, b"GET / HTTP/1.1\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 503") and b"connection limit" in answer
    finally:
        release.set()
        for s in held:
            s.close()


def test_stop_gives_busy_requests_the_grace_period_then_closes_their_connections(server_of) -> None:
    """A request that watches its connection (as the core's cancel token does) ends once stop
    closes it after the grace period: stop takes the grace period, not the request's time."""
    ended = threading.Event()

    def watching(request: HttpRequest) -> HttpResponse:
        deadline = time.monotonic() + 30
        while request.connected() and time.monotonic() < deadline:
            time.sleep(0.01)
        ended.set()
        return HttpResponse.json(200, {})

    server = serve(watching)
    client = socket.create_connection(("127.0.0.1", server.port))
    client.sendall(b"GET / HTTP/1.1\r\n\r\n")
    time.sleep(0.2)
    t0 = time.monotonic()
    server.stop(0.5)
    assert ended.is_set() and 0.4 < time.monotonic() - t0 < 2
    client.close()


def test_a_client_that_leaves_is_seen_by_the_request_it_left(server_of) -> None:
    seen = threading.Event()

    def watching(request: HttpRequest) -> HttpResponse:
        deadline = time.monotonic() + 10
        while request.connected() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not request.connected():
            seen.set()
        return HttpResponse.json(200, {})

    server = server_of(watching)
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(b"GET / HTTP/1.1\r\n\r\n")
        time.sleep(0.2)
    assert seen.wait(2)
