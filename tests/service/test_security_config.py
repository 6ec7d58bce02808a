"""Security configuration without a server: TLS material from files and the environment, the
access file's checks, the RPC -> scope table and the audit log's file handling.

Every bad input must be one SecurityConfigError line naming the source; certificates are real
(tests/tls_helpers.py), files are real.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from tls_helpers import Pki, make_pki

from ecgx.service.access import (
    ADMIN,
    EXPLAIN,
    PREDICT,
    READ,
    AccessList,
    expand_scopes,
    read_access_file,
    required_scope,
    token_hash,
)
from ecgx.service.audit import AuditLog, audit_line
from ecgx.service.calls import CallRecord
from ecgx.service.security import (
    CERT_ENV,
    CLIENT_CA_ENV,
    KEY_ENV,
    SecurityConfigError,
    ServerSecurity,
    load_server_security,
    read_pem,
)

HASH = "ab" * 32


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def access(tmp_path: Path) -> Path:
    path = tmp_path / "access.toml"
    path.write_text(f'[[token]]\nname = "a"\nsha256 = "{HASH}"\nscopes = ["predict"]\n')
    path.chmod(0o600)
    return path


def secure(pki: Pki, access: Path | None = None, **kw) -> ServerSecurity:
    return load_server_security(
        tls_cert=pki.server.cert, tls_key=pki.server.key, tokens_file=access, env={}, **kw
    )


# ------------------------------------------------------------------------------------ TLS material


def test_tls_with_tokens_is_secure_and_says_so(pki: Pki, access: Path) -> None:
    s = secure(pki, access)
    assert not s.insecure and s.credentials is not None and not s.mutual_tls
    assert s.describe().startswith("TLS (CN=localhost") and "1 token(s)" in s.describe()
    assert "PLAINTEXT" not in s.describe() and s.open_rpcs == ()


def test_mutual_tls_alone_is_secure(pki: Pki) -> None:
    s = load_server_security(
        tls_cert=pki.server.cert, tls_key=pki.server.key, tls_client_ca=pki.ca.path, open_health=True, env={}
    )
    assert not s.insecure and s.mutual_tls and s.open_rpcs
    assert "mutual TLS" in s.describe() and "client CA signed may predict and explain" in s.describe()


@pytest.mark.parametrize(
    ("given", "missing"),
    [
        ({}, "TLS (--tls-cert and --tls-key"),
        ({"tokens": True}, "TLS (--tls-cert"),
        ({"tls": True}, "a way to identify callers (--tls-client-ca"),
    ],
)
def test_less_than_secure_is_refused_naming_what_is_missing(pki: Pki, access: Path, given, missing) -> None:
    kw = {"tls_cert": pki.server.cert, "tls_key": pki.server.key} if given.get("tls") else {}
    with pytest.raises(SecurityConfigError) as e:
        load_server_security(tokens_file=access if given.get("tokens") else None, env={}, **kw)
    assert missing in str(e.value) and "--insecure" in str(e.value) and "\n" not in str(e.value)


def test_insecure_builds_what_it_can_and_says_so_loudly(pki: Pki, access: Path) -> None:
    s = load_server_security(tokens_file=access, insecure=True, env={})
    assert s.insecure and s.credentials is None and s.authenticator is not None
    assert s.describe().startswith("PLAINTEXT (no TLS") and "TOKENS TRAVEL IN PLAINTEXT" in s.describe()
    s = load_server_security(insecure=True, env={})
    assert s.authenticator is None and "NO AUTHENTICATION" in s.describe()
    assert ServerSecurity.plaintext_unauthenticated().describe().startswith("PLAINTEXT (no TLS")


def test_tls_material_from_the_environment_as_path_or_pem(pki: Pki, access: Path) -> None:
    env = {
        CERT_ENV: str(pki.server.cert),
        KEY_ENV: pki.server.key_pem.decode(),
        CLIENT_CA_ENV: str(pki.ca.path),
    }
    s = load_server_security(tokens_file=access, env=env)
    assert s.mutual_tls and not s.insecure
    assert read_pem(None, CERT_ENV, "--tls-cert", {CERT_ENV: "  "}) is None


def pem_error(path: Path | None = None, env: dict[str, str] | None = None, **files: Path) -> str:
    with pytest.raises(SecurityConfigError) as e:
        load_server_security(tokens_file=path, env=env or {}, **files)
    message = str(e.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def test_each_wrong_tls_file_is_named(pki: Pki, access: Path, tmp_path: Path) -> None:
    c, k = pki.server.cert, pki.server.key
    assert "--tls-cert /nope.pem: the file does not exist" in pem_error(
        access, tls_cert="/nope.pem", tls_key=k
    )
    assert "is a folder" in pem_error(access, tls_cert=tmp_path, tls_key=k)
    junk = tmp_path / "junk.pem"
    junk.write_text("hello")
    assert f"--tls-cert {junk}: holds no PEM block" in pem_error(access, tls_cert=junk, tls_key=k)
    der = tmp_path / "cert.der"
    der.write_bytes(pki.ca.cert.public_bytes(serialization.Encoding.DER))
    assert "is binary DER, not PEM" in pem_error(access, tls_cert=der, tls_key=k)
    assert "holds a private key, where the server certificate" in pem_error(access, tls_cert=k, tls_key=k)
    assert f"--tls-key {c}: holds a certificate, where the PRIVATE KEY" in pem_error(
        access, tls_cert=c, tls_key=c
    )
    assert "--tls-key is given but --tls-cert is not" in pem_error(access, tls_key=k)
    assert "--tls-cert is given but --tls-key is not" in pem_error(access, tls_cert=c)
    assert "needs the server's own certificate" in pem_error(access, tls_client_ca=pki.ca.path)
    assert "holds a private key; the client CA file" in pem_error(
        access, tls_cert=c, tls_key=k, tls_client_ca=k
    )


def test_a_key_of_another_certificate_is_refused(pki: Pki, access: Path, tmp_path: Path) -> None:
    message = pem_error(access, tls_cert=pki.server.cert, tls_key=pki.client.key)
    assert f"--tls-key {pki.client.key}: the private key does not belong to the certificate" in message
    chain = tmp_path / "chain.pem"
    chain.write_bytes(pki.ca.pem + pki.server.cert_pem)
    assert "must come first in the chain" in pem_error(access, tls_cert=chain, tls_key=pki.server.key)
    chain.write_bytes(pki.server.cert_pem + pki.ca.pem)  # leaf first: fine
    assert not secure_with(pki, access, chain).insecure


def secure_with(pki: Pki, access: Path, cert: Path) -> ServerSecurity:
    return load_server_security(tls_cert=cert, tls_key=pki.server.key, tokens_file=access, env={})


def test_an_encrypted_key_is_refused_with_advice(pki: Pki, access: Path, tmp_path: Path) -> None:
    key = serialization.load_pem_private_key(pki.server.key_pem, None)
    locked = tmp_path / "locked.key"
    locked.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    assert "the private key is encrypted; gRPC needs it unencrypted" in pem_error(
        access, tls_cert=pki.server.cert, tls_key=locked
    )


def test_an_expired_server_certificate_is_refused(pki: Pki, access: Path) -> None:
    message = pem_error(access, tls_cert=pki.expired.cert, tls_key=pki.expired.key)
    assert "the certificate CN=localhost expired on" in message and "renew it" in message


def test_environment_values_that_are_neither_pem_nor_a_file(pki: Pki, access: Path) -> None:
    env = {CERT_ENV: "/no/such/cert.pem", KEY_ENV: str(pki.server.key)}
    assert f"{CERT_ENV}=/no/such/cert.pem: the file does not exist" in pem_error(access, env=env)
    env = {CERT_ENV: "line one\nline two", KEY_ENV: str(pki.server.key)}
    assert f"environment variable {CERT_ENV} holds neither PEM text" in pem_error(access, env=env)
    damaged = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----"
    env = {CERT_ENV: damaged, KEY_ENV: str(pki.server.key)}
    assert f"environment variable {CERT_ENV}: certificate #1 is damaged" in pem_error(access, env=env)


# ------------------------------------------------------------------------------------- access file


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '[[token]]\nname = "a"\nsha256 = "xyz"\nscopes = []\n',
            "[[token]] #1 (a): 'sha256' is not 64 hex digits",
        ),
        ('[[token]]\nname = "a"\nscopes = []\n', "'sha256' is missing"),
        (f'[[token]]\nname = "a"\nsha256 = "{HASH}"\n', "'scopes' is missing"),
        (f'[[token]]\nname = "a"\nsha256 = "{HASH}"\nscopes = ["write"]\n', "unknown scope 'write'"),
        (f'[[token]]\nname = "a"\nsha256 = "{HASH}"\nscopes = []\nexpiry = 1\n', "unknown key 'expiry'"),
        (f'[[token]]\nname = "a"\nsha256 = "{HASH}"\nscopes = []\nexpires = 1\n', "'expires' must be a str"),
        (
            f'[[token]]\nname = "a"\nsha256 = "{HASH}"\nscopes = []\nexpires = "soon"\n',
            "'expires' must be an ISO-8601 date",
        ),
        ('[[certificate]]\nname = "x"\nscopes = []\nexpires = "2030-01-01"\n', "unknown key 'expires'"),
        ('[[token]]\nname = ""\nscopes = []\n', "[[token]] #1: 'name' must be 1-200 printable"),
        (
            '[[certificate]]\nname = "x"\nscopes = []\n[[certificate]]\nname = "x"\nscopes = []\n',
            "'x' is given twice",
        ),
        (
            f'[[token]]\nname = "a"\nsha256 = "{HASH}"\nscopes = []\n'
            f'[[token]]\nname = "b"\nsha256 = "{HASH.upper()}"\nscopes = []\n',
            "tokens 'a' and 'b' have the same hash",
        ),
        ('[[users]]\nname = "a"\n', "unknown table 'users'"),
        ("token = [", "is not valid TOML"),
        ("token = 3\n", "token must be a list of [[token]] tables"),
    ],
)
def test_access_file_mistakes_name_file_entry_and_key(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path / "access.toml", text)
    with pytest.raises(SecurityConfigError) as e:
        read_access_file(path)
    assert expected in str(e.value) and str(path) in str(e.value)


def test_a_world_writable_access_file_is_refused_a_readable_one_warned(access: Path, caplog) -> None:
    access.chmod(0o666)
    with pytest.raises(SecurityConfigError, match="writable by every user"):
        AccessList(access)
    access.chmod(0o644)
    with caplog.at_level(logging.WARNING):
        AccessList(access)
    assert "readable by every user" in caplog.text


def test_a_missing_or_binary_access_file(tmp_path: Path) -> None:
    with pytest.raises(SecurityConfigError, match="does not exist; create it with `ecgx token new"):
        read_access_file(tmp_path / "none.toml")
    (tmp_path / "bin.toml").write_bytes(b"\xff\xfe")
    with pytest.raises(SecurityConfigError, match="is not UTF-8 text"):
        read_access_file(tmp_path / "bin.toml")


def test_an_invalid_reload_keeps_the_old_list_and_says_so(access: Path, caplog) -> None:
    acl = AccessList(access)
    write(access, "garbage = [")
    with caplog.at_level(logging.ERROR):
        assert not acl.reload()
    assert "ACCESS FILE NOT RELOADED, the previous access list stays in force" in caplog.text
    assert "1 token(s)" in acl.describe()
    access.unlink()
    assert not acl.reload() and "1 token(s)" in acl.describe()  # a deleted file locks nobody out


def test_the_rpc_scope_table() -> None:
    assert required_scope("/ecgx.v1.ExplanationService/Predict") == PREDICT
    assert required_scope("/ecgx.v1.ExplanationService/Explain") == EXPLAIN
    assert required_scope("/ecgx.v1.ExplanationService/GetModel") == READ
    assert required_scope("/inference.GRPCInferenceService/ModelInfer") == PREDICT
    assert required_scope("/grpc.health.v1.Health/Watch") == READ
    assert required_scope("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo") == READ
    assert required_scope("/inference.GRPCInferenceService/RepositoryModelLoad") == ADMIN  # not in the table
    assert expand_scopes([ADMIN]) == {ADMIN, PREDICT, EXPLAIN, READ}
    assert expand_scopes([]) == {READ}
    assert len(token_hash("x")) == 64


# ---------------------------------------------------------------------------------------- audit log


def record(**kw) -> CallRecord:
    base = {"request_id": "r1", "rpc": "/ecgx.v1.ExplanationService/Predict", "peer": "ipv4:127.0.0.1:5"}
    return CallRecord(**{**base, **kw})


def test_audit_lines_are_json_with_the_issue_fields(tmp_path: Path) -> None:
    r = record(started=0.5, caller="a\nb", model="ecg", methods=("gradcam",), batch_size=2, latency_s=0.0123)
    line = audit_line(r)
    assert "\n" not in line  # a name cannot break a line
    doc = json.loads(line)
    assert doc["time"] == "1970-01-01T00:00:00.500Z" and doc["latency_ms"] == 12.3 and doc["caller"] == "a\nb"
    assert list(doc) == [
        "time", "request_id", "caller", "auth", "peer", "rpc", "transport", "model", "version", "methods",
        "targets", "batch_size", "code", "refusal", "latency_ms", "engine_ms", "prev",
    ]  # fmt: skip
    log = AuditLog(tmp_path / "audit.jsonl")
    log.call_finished(r)
    log.call_finished(record(request_id="r2"))
    log.close()
    path = tmp_path / "audit.jsonl"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [json.loads(x)["request_id"] for x in path.read_text().splitlines()] == ["r1", "r2"]


def test_a_full_disk_is_logged_once_and_never_raises(caplog) -> None:
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    log = AuditLog("/dev/full")
    with caplog.at_level(logging.ERROR):
        log.call_finished(record())
        log.call_finished(record())
    log.close()
    assert caplog.text.count("AUDIT LOG /dev/full: cannot write") == 1
    log.call_finished(record())  # after close(): logged, not raised


def test_a_certificate_that_expires_soon_is_warned_about(pki: Pki, caplog) -> None:
    from cryptography import x509

    from ecgx.service.security import check_validity

    cert = x509.load_pem_x509_certificate(pki.server.cert_pem)
    with caplog.at_level(logging.WARNING):
        check_validity(cert, "--tls-cert x", cert.not_valid_after_utc - timedelta(days=5))
    assert "expires on" in caplog.text and "renew it" in caplog.text
    with pytest.raises(SecurityConfigError, match=r"is not valid before .* \(check this machine's clock\)"):
        check_validity(cert, "--tls-cert x", cert.not_valid_before_utc - timedelta(days=1))
