"""Access control the rest of the way (issue 19), over real loopback channels: expiring tokens
(``ecgx token new --expires``), a client-certificate revocation list for mutual TLS (verified
against the client CA, reloaded like the access file), metrics over TLS; and the small items:
a same-size, same-mtime edit is noticed, stale ``ecgx repo add`` temporaries are reported and
removed.
"""

from __future__ import annotations

import argparse
import http.client
import os
import ssl
import time
import urllib.error
import urllib.request
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from calls_helpers import LIST_MODELS, bearer, code_of, empty_repository, raw_unary, start_in_process
from cli_helpers import run_ecgx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from prometheus_client import CollectorRegistry, Counter
from tls_helpers import Authority, Pki, make_pki

from ecgx.cli import _add_common
from ecgx.service.access import (
    AccessList,
    SecurityConfigError,
    expiry_from,
    format_time,
    read_access_file,
    write_access_file,
)
from ecgx.service.metrics import start_metrics_endpoint
from ecgx.service.proto_gen.ecgx.v1 import ecgx_pb2 as pb
from ecgx.service.security import load_server_security
from ecgx.service.serve_config import ServeConfig, ServeConfigError
from ecgx.service.server import build_server
from ecgx.token_cli import add_parser

LIST = pb.ListModelsRequest().SerializeToString()
OK, UNAUTHENTICATED = grpc.StatusCode.OK, grpc.StatusCode.UNAUTHENTICATED


# ----------------------------------------------------------------------------------- expiry


def _expire(access: Path, name: str, when: datetime) -> None:
    """Set a token's expiry in the access file (past times cannot be given to ``ecgx token new``)."""
    acl = read_access_file(access)
    tokens = tuple(replace(e, expires=format_time(when)) if e.name == name else e for e in acl.tokens)
    write_access_file(replace(acl, tokens=tokens))


def test_an_expired_token_is_unauthenticated_and_says_only_that_it_expired(tmp_path: Path) -> None:
    server = start_in_process(tmp_path, {"ward-7-viewer": [], "still-valid": []}, audit=True)
    try:
        access = tmp_path / "access.toml"
        _expire(access, "ward-7-viewer", datetime.now(UTC) - timedelta(minutes=1))
        _expire(access, "still-valid", datetime.now(UTC) + timedelta(days=1))
        deadline = time.monotonic() + 10  # the watcher reloads the file
        call = raw_unary(server.channel(), LIST_MODELS)
        while time.monotonic() < deadline:
            code, details, request_id = code_of(call, LIST, bearer(server.tokens["ward-7-viewer"]))
            if code != OK:
                break
            time.sleep(0.1)
        assert code == UNAUTHENTICATED and "expired" in details, (code, details)
        assert "ward-7-viewer" not in details and str(datetime.now(UTC).year) not in details
        assert server.audit_of(request_id)["refusal"] == "unauthenticated"
        assert code_of(call, LIST, bearer(server.tokens["still-valid"]))[0] == OK
    finally:
        server.stop()


def test_token_new_expires_takes_a_duration_or_a_date_and_stores_it(tmp_path: Path, capsys) -> None:
    parser = argparse.ArgumentParser(prog="ecgx")
    add_parser(parser.add_subparsers(dest="command"), _add_common)
    access = tmp_path / "access.toml"
    for name, when in (("quarter", "90d"), ("fixed", "2031-05-01"), ("zoned", "2031-05-01T12:00:00+02:00")):
        args = parser.parse_args(["token", "new", "--file", str(access), "--name", name, "--scope", "predict",
                                  "--expires", when])  # fmt: skip
        assert args.func(args) == 0
    stored = {e.name: e.expires for e in read_access_file(access).tokens}
    assert stored["fixed"] == "2031-05-01T00:00:00Z" and stored["zoned"] == "2031-05-01T10:00:00Z"
    quarter = datetime.fromisoformat(stored["quarter"].replace("Z", "+00:00"))
    assert abs(quarter - (datetime.now(UTC) + timedelta(days=90))) < timedelta(minutes=1)
    assert "expires 2031-05-01T00:00:00Z" in run_ecgx("token", "list", "--file", str(access)).stdout
    for bad in ("2001-01-01", "soon", "-5d"):
        with pytest.raises(ValueError):
            expiry_from(bad)
    result = run_ecgx("token", "new", "--file", str(access), "--name", "x", "--scope", "predict",
                      "--expires", "2001-01-01")  # fmt: skip
    assert result.returncode == 2 and "--expires '2001-01-01' is in the past" in result.stderr, result.stderr
    assert read_access_file(access).find("x") is None


# ---------------------------------------------------------------------------------------- CRL


def write_crl(ca: Authority, path: Path, serials: list[int]) -> None:
    now = datetime.now(UTC)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(now - timedelta(minutes=1))
        .next_update(now + timedelta(days=1))
    )
    for serial in serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build()
        )
    path.write_bytes(builder.sign(ca.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))


def serial(pem: bytes) -> int:
    return x509.load_pem_x509_certificate(pem).serial_number


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _mtls_call(port: int, pki: Pki, client) -> tuple[grpc.StatusCode, str]:
    credentials = grpc.ssl_channel_credentials(pki.ca.pem, client.key_pem, client.cert_pem)
    with grpc.secure_channel(f"localhost:{port}", credentials) as channel:
        code, details, _ = code_of(raw_unary(channel, LIST_MODELS), LIST, timeout=10)
    return code, details


def test_a_revoked_client_certificate_is_refused_and_a_new_crl_is_picked_up(tmp_path: Path, pki: Pki) -> None:
    crl = tmp_path / "clients.crl"
    write_crl(pki.ca, crl, [serial(pki.unlisted.cert_pem)])
    repository, _ = empty_repository(tmp_path)
    security = load_server_security(
        tls_cert=pki.server.cert, tls_key=pki.server.key, tls_client_ca=pki.ca.path, tls_crl=crl,
        env={}, watch_interval_s=0.2,
    )  # fmt: skip
    assert "1 revoked certificate(s)" in security.describe()
    server, port, _, _ = build_server(repository, security=security, port=0)
    server.start()
    security.start()
    try:
        code, details = _mtls_call(port, pki, pki.unlisted)
        assert code == UNAUTHENTICATED and "revoked" in details, (code, details)
        assert _mtls_call(port, pki, pki.client)[0] == OK
        write_crl(pki.ca, crl, [serial(pki.client.cert_pem)])  # reloaded like the access file
        deadline = time.monotonic() + 10
        while _mtls_call(port, pki, pki.client)[0] == OK and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _mtls_call(port, pki, pki.client)[0] == UNAUTHENTICATED
        assert _mtls_call(port, pki, pki.unlisted)[0] == OK
        # A CRL another CA signed is refused on reload: the last good one stays in force.
        write_crl(pki.other_ca, crl, [])
        time.sleep(1)
        assert _mtls_call(port, pki, pki.client)[0] == UNAUTHENTICATED
    finally:
        server.stop(None)
        security.stop()


def test_a_crl_that_does_not_verify_or_lacks_mutual_tls_is_refused(tmp_path: Path, pki: Pki) -> None:
    crl = tmp_path / "other.crl"
    write_crl(pki.other_ca, crl, [])
    tls = {"tls_cert": pki.server.cert, "tls_key": pki.server.key, "env": {}}
    with pytest.raises(SecurityConfigError, match="not a client CA"):
        load_server_security(tls_client_ca=pki.ca.path, tls_crl=crl, **tls)
    forged = Authority(tmp_path / "forged", "ecgx test CA")  # the same name, another key
    write_crl(forged, crl, [])
    with pytest.raises(SecurityConfigError, match="signature does not verify"):
        load_server_security(tls_client_ca=pki.ca.path, tls_crl=crl, **tls)
    crl.write_text("not a CRL")
    with pytest.raises(SecurityConfigError, match="is not a certificate revocation list"):
        load_server_security(tls_client_ca=pki.ca.path, tls_crl=crl, **tls)
    with pytest.raises(SecurityConfigError, match="needs mutual TLS"):
        load_server_security(tokens_file=None, tls_crl=crl, insecure=True, **tls)


# ------------------------------------------------------------------------------- metrics TLS


def test_metrics_can_be_served_over_tls(pki: Pki) -> None:
    registry = CollectorRegistry()
    Counter("ecgx_probe_total", "a probe", registry=registry).inc()
    endpoint = start_metrics_endpoint(registry, "127.0.0.1", 0, (str(pki.server.cert), str(pki.server.key)))
    try:
        assert endpoint.url.startswith("https://")
        context = ssl.create_default_context(cafile=str(pki.ca.path))
        url = endpoint.url.replace("127.0.0.1", "localhost")
        with urllib.request.urlopen(url, context=context, timeout=10) as response:
            assert b"ecgx_probe_total 1.0" in response.read()
        with pytest.raises((urllib.error.URLError, ConnectionError, http.client.HTTPException)):
            urllib.request.urlopen(url.replace("https://", "http://"), timeout=5).read()
    finally:
        endpoint.close()
    with pytest.raises(SecurityConfigError, match="--metrics-tls-key"):
        start_metrics_endpoint(registry, "127.0.0.1", 0, (str(pki.server.cert), str(pki.server.cert)))


def test_serve_config_metrics_tls_reuses_the_serving_files_or_names_what_is_missing() -> None:
    cfg = ServeConfig(repo=Path("."), tls_cert="s.crt", tls_key="s.key", metrics_tls_cert="serving",
                      metrics_tls_key="serving")  # fmt: skip
    assert cfg.check("x").metrics_tls() == ("s.crt", "s.key")
    with pytest.raises(ServeConfigError, match="needs both"):
        ServeConfig(repo=Path("."), metrics_tls_cert="m.crt").check("x")
    with pytest.raises(ServeConfigError, match="as files"):
        ServeConfig(repo=Path("."), metrics_tls_cert="serving", metrics_tls_key="serving").check("x")
    with pytest.raises(ServeConfigError, match="audit_required needs an audit log"):
        ServeConfig(repo=Path("."), audit_required=True).check("x")


# ----------------------------------------------------------------------------- small items


def test_an_in_place_same_size_same_mtime_edit_is_noticed(tmp_path: Path) -> None:
    from ecgx.service.repository import _fingerprint

    (tmp_path / "model.onnx").write_bytes(b"aaaa")
    before_stat = (tmp_path / "model.onnx").stat()
    before = _fingerprint(tmp_path)
    time.sleep(0.01)
    with open(tmp_path / "model.onnx", "r+b") as f:  # the same inode and size
        f.write(b"bbbb")
    os.utime(tmp_path / "model.onnx", ns=(before_stat.st_atime_ns, before_stat.st_mtime_ns))
    assert _fingerprint(tmp_path) != before
    # The access file's watcher notices it too.
    access = tmp_path / "access.toml"
    access.write_text("")
    acl = AccessList(access)
    stat0 = access.stat()
    time.sleep(0.01)
    with open(access, "r+") as f:
        f.write("")
    os.utime(access, ns=(stat0.st_atime_ns, stat0.st_mtime_ns))
    os.chmod(access, 0o600)  # a metadata change: ctime moves, size and mtime do not
    assert acl.changed()


def test_stale_repo_add_temporaries_are_listed_and_removed(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    old = repo / "ecg" / ".3.k2j4h.ecgx-tmp"
    fresh = repo / "ecg" / ".4.q8w7e.ecgx-tmp"
    for folder in (old, fresh):
        folder.mkdir(parents=True)
        (folder / "model.onnx").write_bytes(b"x" * 1000)
    hours_ago = time.time() - 3 * 3600
    os.utime(old, (hours_ago, hours_ago))
    listed = run_ecgx("repo", "stale", "--repo", str(repo))
    assert listed.returncode == 0 and str(old) in listed.stdout and str(fresh) not in listed.stdout, listed
    assert "ecgx repo stale --repo" in listed.stdout and "--remove" in listed.stdout
    removed = run_ecgx("repo", "stale", "--repo", str(repo), "--remove")
    assert removed.returncode == 0 and "1 stale temporary folder(s) removed" in removed.stdout, removed
    assert not old.exists() and fresh.exists()  # a promotion may still be writing the fresh one
