"""The REST port's TLS, tokens, client certificates, scopes and audit: the gRPC port's, checked
from the outside with tritonclient.http, requests and raw sockets (real certificates from
tests/tls_helpers.py, access files written by ``ecgx token``'s functions).

Servers (module scope, one repository): ``tls`` (TLS + access file, health open, audited) and
``mtls`` (mutual TLS + the same access file, audited); each serves gRPC and REST from one core.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import tritonclient.http as tch
from repo_helpers import make_package
from tls_helpers import Issued, Pki, make_pki
from tritonclient.utils import InferenceServerException

from ecgx.core.dataset import load_dataset
from ecgx.service.audit import AuditLog
from ecgx.service.oip_http import RestServer, rest_ssl_context, start_rest
from ecgx.service.repository import ModelRepository
from ecgx.service.security import load_server_security
from ecgx.service.server import build_server
from ecgx.token_cli import add_certificate, add_token

MODEL, PASSED = "ecg", "gradcam"
SCOPES = {"predictor": ["predict"], "explainer": ["predict", "explain"], "reader": []}


@dataclass
class Served:
    rest: RestServer
    audit: Path
    stop: Any

    @property
    def address(self) -> str:
        return f"localhost:{self.rest.port}"

    def audit_of(self, request_id: str) -> dict[str, Any]:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            lines = {d["request_id"]: d for d in map(json.loads, self.audit.read_text().splitlines())}
            if request_id in lines:
                return lines[request_id]
            time.sleep(0.02)
        raise AssertionError(f"no audit line for {request_id}")


def start(repository: ModelRepository, tmp: Path, name: str, pki: Pki, access: Path, mutual: bool) -> Served:
    tls = {
        "tls_cert": pki.server.cert,
        "tls_key": pki.server.key,
        "tls_client_ca": pki.ca.path if mutual else None,
    }
    security = load_server_security(tokens_file=access, open_health=True, env={}, **tls)
    audit = AuditLog(tmp / f"{name}.jsonl")
    built = build_server(repository, security=security, host="127.0.0.1", port=0, max_batch=4, audit=audit)
    built.server.start()
    security.start()
    rest = start_rest(
        built.servicer.core, security, observers=[audit], ssl_context=rest_ssl_context(env={}, **tls)
    )

    def stop() -> None:
        rest.stop(1)
        built.server.stop(None)
        security.stop()
        audit.close()

    return Served(rest, tmp / f"{name}.jsonl", stop)


@pytest.fixture(scope="module")
def world(gated, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("http_security")
    pki = make_pki(tmp / "pki")
    make_package(gated, tmp / "repo" / MODEL / "1", 0)
    repository = ModelRepository(tmp / "repo", [gated["public"]], engine_options={"threads": 1})
    access = tmp / "access.toml"
    tokens = {name: add_token(access, name, scopes) for name, scopes in SCOPES.items()}
    add_certificate(access, "ward-7-viewer", ["predict", "explain"])
    servers = {
        "tls": start(repository, tmp, "tls", pki, access, mutual=False),
        "mtls": start(repository, tmp, "mtls", pki, access, mutual=True),
    }
    beats = np.asarray(load_dataset(gated["family"]["data"]).signals[:2], dtype=np.float32)
    yield {"pki": pki, "tokens": tokens, "beats": beats, **servers}
    for s in servers.values():
        s.stop()
    repository.stop()


def client(served: Served, pki: Pki, cert: Issued | None = None) -> tch.InferenceServerClient:
    options: dict[str, Any] = {"ca_certs": str(pki.ca.path)}
    if cert is not None:
        options.update(certfile=str(cert.cert), keyfile=str(cert.key))
    return tch.InferenceServerClient(served.address, ssl=True, ssl_options=options)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def infer(c: tch.InferenceServerClient, beats: np.ndarray, token: str | None = None, **kw: Any) -> Any:
    x = tch.InferInput("ecg", list(beats.shape), "FP32")
    x.set_data_from_numpy(beats)
    return c.infer(MODEL, [x], headers=bearer(token) if token else None, **kw)


def status_of(call: Any) -> tuple[str, str]:
    with pytest.raises(InferenceServerException) as e:
        call()
    return str(e.value.status()), e.value.message()


def test_tls_and_a_token_serve_tritonclient_http(world) -> None:
    c = client(world["tls"], world["pki"])
    result = infer(c, world["beats"], world["tokens"]["explainer"], parameters={"method": PASSED})
    assert result.as_numpy("attribution").shape == (2, 12, 600)
    assert c.is_server_live(headers=bearer(world["tokens"]["reader"]))


def test_no_bad_or_malformed_token_is_401_and_audited(world) -> None:
    c, beats = client(world["tls"], world["pki"]), world["beats"]
    assert status_of(lambda: infer(c, beats))[0] == "401"
    assert status_of(lambda: infer(c, beats, "ecgx_not-a-real-token"))[0] == "401"
    r = requests.post(
        f"https://{world['tls'].address}/v2/models/{MODEL}/infer",
        headers={"Authorization": "Basic dXNlcjpwYXNz"},
        data=b"{}",
        verify=str(world["pki"].ca.path),
        timeout=10,
    )
    assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith("Bearer")
    assert "Bearer" in r.json()["error"]
    line = world["tls"].audit_of(r.headers["X-Request-Id"])
    assert line["code"] == "UNAUTHENTICATED" and line["refusal"] == "unauthenticated" and line["caller"] == ""


def test_scopes_are_the_grpc_ports(world) -> None:
    c, beats, tokens = client(world["tls"], world["pki"]), world["beats"], world["tokens"]
    assert infer(c, beats, tokens["predictor"]).as_numpy("probabilities").shape[0] == 2
    code, message = status_of(lambda: infer(c, beats, tokens["predictor"], parameters={"method": PASSED}))
    assert code == "403" and "explain" in message
    assert status_of(lambda: infer(c, beats, tokens["reader"]))[0] == "403"
    assert c.get_model_metadata(MODEL, headers=bearer(tokens["reader"]))["name"] == MODEL


def test_plaintext_to_the_tls_port_gets_no_answer(world) -> None:
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(f"http://{world['tls'].address}/v2/health/live", timeout=5)


def test_mutual_tls_names_the_caller_by_certificate(world) -> None:
    pki, beats = world["pki"], world["beats"]
    c = client(world["mtls"], pki, pki.client)
    result = infer(c, beats, parameters={"method": PASSED})
    assert result.as_numpy("attribution").shape == (2, 12, 600)
    code, message = status_of(lambda: infer(client(world["mtls"], pki, pki.unlisted), beats))
    assert code == "403" and "access list" in message
    for missing in (None, pki.foreign):  # no certificate, or one another CA signed: no handshake
        with pytest.raises(Exception):  # noqa: B017 - geventhttpclient raises ssl or socket errors
            infer(client(world["mtls"], pki, missing), beats)


def test_a_silent_tls_client_does_not_hold_up_others(world) -> None:
    """Connections that never start their handshake are served in their own threads: a real
    client is answered at once (cheroot's #748 stalls every connection this way)."""
    silent = [socket.create_connection(("127.0.0.1", world["tls"].rest.port)) for _ in range(4)]
    try:
        t0 = time.monotonic()
        assert client(world["tls"], world["pki"]).is_server_live(headers=bearer(world["tokens"]["reader"]))
        assert time.monotonic() - t0 < 2
    finally:
        for s in silent:
            s.close()


def test_expect_100_continue_is_answered_only_after_the_credentials(world) -> None:
    """An unauthenticated client that waits for "100 Continue" gets its 401 instead (its body is
    never invited); an authenticated one is invited, sends, and is served."""
    context = ssl.create_default_context(cafile=str(world["pki"].ca.path))
    x = world["beats"][:1]
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "ecg",
                    "datatype": "FP32",
                    "shape": [1, 12, 600],
                    "parameters": {"binary_data_size": 28800},
                }
            ]
        }
    ).encode()
    body = head + x.astype("<f4").tobytes()
    lengths = f"Inference-Header-Content-Length: {len(head)}\r\nContent-Length: {len(body)}\r\n".encode()
    port = world["tls"].rest.port
    for token, first in ((None, b"HTTP/1.1 401"), (world["tokens"]["predictor"], b"HTTP/1.1 100 Continue")):
        auth = b"" if token is None else f"Authorization: Bearer {token}\r\n".encode()
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname="localhost") as s,
        ):
            s.sendall(
                b"POST /v2/models/ecg/infer HTTP/1.1\r\nHost: localhost\r\nExpect: 100-continue\r\n"
                + auth
                + lengths
                + b"\r\n"
            )
            assert s.recv(64).startswith(first)
            if token is not None:
                s.sendall(body)
                answer = b""
                while b"\r\n\r\n" not in answer:
                    answer += s.recv(4096)
                assert answer.startswith(b"HTTP/1.1 200")


def _rss() -> int:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _flood(address: tuple[str, int], context: ssl.SSLContext, body: memoryview, answers: list[bytes]) -> None:
    """One unauthenticated upload of ``body``; keep the first bytes of the answer."""
    try:
        with (
            socket.create_connection(address, timeout=20) as raw,
            context.wrap_socket(raw, server_hostname="localhost") as s,
        ):
            s.sendall(
                b"POST /v2/models/ecg/infer HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n"
                % len(body)
            )
            with contextlib.suppress(OSError):  # the server answered and closed without reading it
                s.sendall(body)
            answers.append(s.recv(256))
    except OSError as e:
        answers.append(repr(e).encode())


def test_24_unauthenticated_57_mb_uploads_are_refused_without_buffering(world) -> None:
    """Issue 19's flood: memory may rise by at most 100 MB (it rose 1.3-1.7 GB on gRPC before)."""
    body = memoryview(bytes(57 * 2**20))
    context = ssl.create_default_context(cafile=str(world["pki"].ca.path))
    address = ("127.0.0.1", world["tls"].rest.port)
    baseline, peak, done = _rss(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    answers: list[bytes] = []
    threads = [threading.Thread(target=_flood, args=(address, context, body, answers)) for _ in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    done.set()
    sampler.join()
    growth = peak[0] - baseline
    assert growth < 100 * 2**20, f"RSS rose {growth / 2**20:.0f} MB"
    assert sum(b" 401 " in a for a in answers) >= 20, answers  # a few may see the reset first
