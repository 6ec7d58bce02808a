"""How the serving port is secured: TLS material, who may call, which RPCs are open.

:func:`load_server_security` turns ``ecgx serve``'s flags (or the environment) into a
:class:`ServerSecurity`: TLS from PEM files, mutual TLS with a client CA, and the access list of
hashed tokens and certificate names (:mod:`ecgx.service.access`). A secure port needs TLS *and* a way
to identify callers; anything less is refused unless asked for explicitly (``--insecure``).

PEM material comes from a file, or from the environment variables ``ECGX_TLS_CERT``,
``ECGX_TLS_KEY`` and ``ECGX_TLS_CLIENT_CA`` (each the path of a file, or the PEM text itself).
Every mistake is one line naming the source: missing, unreadable, not PEM, a key where a
certificate belongs (and the reverse), an encrypted key, a key that does not belong to the
certificate, a server certificate that has expired or is not yet valid (refused: every client
would fail the handshake with a far less helpful message).

No PyTorch here (the serving path).
"""

from __future__ import annotations

import logging
import os
import re
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc

from ecgx.service.access import PROBE_RPCS, AccessList, SecurityConfigError
from ecgx.service.calls import Authenticator

log = logging.getLogger(__name__)

CERT_ENV, KEY_ENV, CLIENT_CA_ENV = "ECGX_TLS_CERT", "ECGX_TLS_KEY", "ECGX_TLS_CLIENT_CA"
EXPIRY_WARNING = timedelta(days=14)
_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n.*?-----END \1-----\r?\n?", re.DOTALL)
_KEY_LABELS = (b"PRIVATE KEY", b"RSA PRIVATE KEY", b"EC PRIVATE KEY", b"ENCRYPTED PRIVATE KEY")


# ------------------------------------------------------------------------------------- PEM input


@dataclass(frozen=True)
class Pem:
    """PEM text and where it came from (for messages: the source, never the bytes)."""

    data: bytes
    source: str
    path: Path | None = None  # the file it was read from

    def blocks(self, *labels: bytes) -> list[bytes]:
        return [m.group(0) for m in _PEM_BLOCK.finditer(self.data) if not labels or m.group(1) in labels]

    def key_blocks(self) -> list[bytes]:
        return self.blocks(*_KEY_LABELS)

    def labels(self) -> list[str]:
        return [m.group(1).decode() for m in _PEM_BLOCK.finditer(self.data)]


def read_pem(
    path: str | Path | None, env_var: str, option: str, env: Mapping[str, str] | None = None
) -> Pem | None:
    """PEM text from the file ``path`` (given as ``option``), else from the environment variable
    ``env_var`` (the path of a file, or PEM text starting with "-----BEGIN"); None when neither."""
    if path is not None and str(path) != "":
        return read_pem_file(Path(path), f"{option} {path}")
    value = (os.environ if env is None else env).get(env_var, "").strip()
    if not value:
        return None
    if value.startswith("-----BEGIN"):
        return _check_pem(Pem(value.encode() + b"\n", f"environment variable {env_var}"))
    if "\n" in value or len(value) > 4096:
        raise SecurityConfigError(
            f"environment variable {env_var} holds neither PEM text (starting with -----BEGIN) "
            "nor a file path"
        )
    return read_pem_file(Path(value), f"{env_var}={value}")


def read_pem_file(path: Path, source: str) -> Pem:
    """PEM text from ``path``; ``source`` names it in errors (e.g. "--tls-ca ca.pem")."""
    if not path.exists():
        raise SecurityConfigError(f"{source}: the file does not exist")
    if path.is_dir():
        raise SecurityConfigError(f"{source}: is a folder, where a PEM file is needed")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise SecurityConfigError(f"{source}: cannot be read ({(e.strerror or str(e)).lower()})") from None
    return _check_pem(Pem(data, source, path))


def _check_pem(pem: Pem) -> Pem:
    if pem.blocks():
        return pem
    if pem.data[:1] == b"\x30":  # an ASN.1 SEQUENCE: DER, the binary form of the same thing
        raise SecurityConfigError(
            f"{pem.source}: is binary DER, not PEM; convert it, e.g. "
            "`openssl x509 -inform der -in F -out F.pem` "
            "(or `openssl pkey -inform der ...` for a key)"
        )
    raise SecurityConfigError(f"{pem.source}: holds no PEM block (-----BEGIN ...-----); give a PEM file")


# ---------------------------------------------------------------------------- certificates, keys


def load_certificates(pem: Pem, what: str) -> list[Any]:
    """The X.509 certificates of ``pem`` (a chain or a CA bundle), in order; errors name ``what``."""
    from cryptography import x509

    blocks = pem.blocks(b"CERTIFICATE")
    if not blocks:
        raise SecurityConfigError(
            f"{pem.source}: {_what_it_holds(pem)}, where {what} (a CERTIFICATE) is needed"
        )
    certs = []
    for n, block in enumerate(blocks, 1):
        try:
            certs.append(x509.load_pem_x509_certificate(block))
        except ValueError:
            raise SecurityConfigError(
                f"{pem.source}: certificate #{n} is damaged (bad base64 or DER)"
            ) from None
    return certs


def load_tls_key(pem: Pem) -> Any:
    """The unencrypted private key of ``pem``; errors for certificates, public and encrypted keys."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    blocks = pem.key_blocks()
    if not blocks:
        raise SecurityConfigError(f"{pem.source}: {_what_it_holds(pem)}, where the PRIVATE KEY is needed")
    if len(blocks) > 1:
        raise SecurityConfigError(f"{pem.source}: holds {len(blocks)} private keys; give one")
    if b"ENCRYPTED" in blocks[0].split(b"\n", 2)[0] or b"Proc-Type: 4,ENCRYPTED" in blocks[0]:
        raise _encrypted(pem)
    try:
        return serialization.load_pem_private_key(blocks[0], password=None)
    except TypeError:  # cryptography's "encrypted, and no password given"
        raise _encrypted(pem) from None
    except (ValueError, UnsupportedAlgorithm):
        raise SecurityConfigError(
            f"{pem.source}: the private key is damaged or of an unsupported type"
        ) from None


def _encrypted(pem: Pem) -> SecurityConfigError:
    return SecurityConfigError(
        f"{pem.source}: the private key is encrypted; gRPC needs it unencrypted: decrypt it "
        "(`openssl pkey -in KEY -out KEY.plain`) and protect the file with permissions (chmod 600)"
    )


def _what_it_holds(pem: Pem) -> str:
    labels = pem.labels()
    if any(label.endswith("PRIVATE KEY") for label in labels):
        return "holds a private key"
    if "CERTIFICATE" in labels:
        return "holds a certificate"
    if "PUBLIC KEY" in labels:
        return "holds a bare public key"
    return f"holds PEM of type {', '.join(dict.fromkeys(labels))}"


def _spki(public_key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def describe_certificate(cert: Any) -> str:
    """Subject and expiry, for messages and the start-up log."""
    return (
        f"{cert.subject.rfc4514_string() or '(no subject)'}, valid until {cert.not_valid_after_utc:%Y-%m-%d}"
    )


def check_validity(cert: Any, source: str, now: datetime | None = None) -> None:
    """Refuse a server certificate that expired or is not yet valid; warn two weeks ahead."""
    now = now or datetime.now(UTC)
    name = cert.subject.rfc4514_string() or "(no subject)"
    if now > cert.not_valid_after_utc:
        raise SecurityConfigError(
            f"{source}: the certificate {name} expired on "
            f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC; every client would refuse it: renew it"
        )
    if now < cert.not_valid_before_utc:
        raise SecurityConfigError(
            f"{source}: the certificate {name} is not valid before "
            f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC (check this machine's clock)"
        )
    if cert.not_valid_after_utc - now < EXPIRY_WARNING:
        log.warning(
            "%s: the certificate %s expires on %s UTC: renew it",
            source,
            name,
            f"{cert.not_valid_after_utc:%Y-%m-%d}",
        )


@dataclass(frozen=True)
class TlsMaterial:
    """Checked PEM for ``grpc.ssl_server_credentials``: the chain (leaf first), its key, a client CA."""

    cert_chain: bytes
    key: bytes
    client_ca: bytes | None
    subject: str  # describe_certificate of the leaf


def load_tls(cert: Pem, key: Pem, client_ca: Pem | None = None, now: datetime | None = None) -> TlsMaterial:
    """Check the server's certificate chain and key (they belong together, the certificate is
    valid now) and the client CA bundle; :class:`SecurityConfigError` says what is wrong."""
    chain = load_certificates(cert, "the server certificate")
    private = load_tls_key(key)
    check_key_type(private, key.source)
    _check_key_mode(key)
    check_pair(chain, private, cert, key)
    check_validity(chain[0], cert.source, now)
    ca_pem = None
    if client_ca is not None:
        if client_ca.key_blocks():
            raise SecurityConfigError(
                f"{client_ca.source}: holds a private key; the client CA file holds certificates only"
            )
        for ca in load_certificates(client_ca, "the client CA certificate"):
            if (now or datetime.now(UTC)) > ca.not_valid_after_utc:
                log.warning(
                    "%s: the client CA %s has expired: no client certificate will verify",
                    client_ca.source,
                    describe_certificate(ca),
                )
        ca_pem = b"".join(client_ca.blocks(b"CERTIFICATE"))
    return TlsMaterial(
        b"".join(cert.blocks(b"CERTIFICATE")),
        key.key_blocks()[0],
        ca_pem,
        describe_certificate(chain[0]),
    )


# Curves gRPC's TLS (BoringSSL) signs handshakes with; other key types load fine and then fail
# every handshake (Ed25519: NO_COMMON_SIGNATURE_ALGORITHMS, in the server's log only).
GRPC_EC_CURVES = ("secp256r1", "secp384r1")


def check_key_type(private: Any, source: str) -> None:
    """Refuse a TLS key gRPC cannot sign handshakes with, at start-up rather than per handshake:
    gRPC accepts RSA (2048 bits or more) and ECDSA on P-256 or P-384."""
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    fix = "make a certificate with an ECDSA P-256 key: `ecgx tls dev-cert` for a local one (docs/security.md)"
    if isinstance(private, rsa.RSAPrivateKey):
        if private.key_size < 2048:
            raise SecurityConfigError(
                f"{source}: an RSA key of {private.key_size} bits is too short for TLS; {fix}"
            )
        return
    if isinstance(private, ec.EllipticCurvePrivateKey):
        if private.curve.name not in GRPC_EC_CURVES:
            raise SecurityConfigError(
                f"{source}: an EC key on {private.curve.name}, which gRPC's TLS does not sign with "
                f"(it takes {', '.join(GRPC_EC_CURVES)}); {fix}"
            )
        return
    kind = type(private).__name__.removeprefix("_").replace("PrivateKey", "") or "unknown"
    raise SecurityConfigError(
        f"{source}: a {kind} key, which gRPC's TLS cannot use: every handshake would fail "
        f"(NO_COMMON_SIGNATURE_ALGORITHMS) and clients would only see 'Socket closed'; gRPC takes RSA "
        f"or ECDSA P-256/P-384 keys; {fix}"
    )


def write_dev_certificate(
    out_dir: Path, names: Sequence[str] = ("localhost", "127.0.0.1"), days: int = 30, overwrite: bool = False
) -> tuple[Path, Path]:
    """A self-signed certificate for local testing (``OUT/cert.pem``) and its ECDSA P-256 key
    (``OUT/key.pem``, mode 600), valid for ``names`` (DNS names or IP addresses) for ``days``.
    Clients trust it with ``--tls-ca OUT/cert.pem``. Not for production: no CA vouches for it."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if not names:
        raise SecurityConfigError("a development certificate needs at least one name (--name localhost)")
    if days < 1:
        raise SecurityConfigError(f"--days must be at least 1, got {days}")
    out_dir = Path(out_dir)
    cert_path, key_path = out_dir / "cert.pem", out_dir / "key.pem"
    existing = [str(p) for p in (cert_path, key_path) if p.exists()]
    if existing and not overwrite:
        raise SecurityConfigError(f"{', '.join(existing)} exists; pass --overwrite to replace it")
    sans: list[x509.GeneralName] = []
    for name in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            sans.append(x509.DNSName(name))
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_pem)
    os.chmod(key_path, 0o600)  # an existing file keeps its mode through O_TRUNC
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def check_pair(chain: Sequence[Any], private: Any, cert: Pem, key: Pem) -> None:
    """The private key belongs to the first certificate of the chain."""
    cert_source, key_source = cert.source, key.source
    mine = _spki(private.public_key())
    if _spki(chain[0].public_key()) == mine:
        return
    if any(_spki(c.public_key()) == mine for c in chain[1:]):
        raise SecurityConfigError(
            f"{cert_source}: the certificate of the key {key_source} must come first in the chain"
        )
    raise SecurityConfigError(
        f"{key_source}: the private key does not belong to the certificate in {cert_source} "
        f"({chain[0].subject.rfc4514_string()}); give the key the certificate was issued for"
    )


def _check_key_mode(key: Pem) -> None:
    try:
        mode = key.path.stat().st_mode if key.path is not None else 0
    except OSError:
        return
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        log.warning("%s: the private key is readable by other users; `chmod 600` it", key.source)


def server_credentials(cert: bytes, key: bytes, client_ca: bytes | None = None) -> grpc.ServerCredentials:
    """TLS credentials for the serving port; with ``client_ca`` every client must present a
    certificate that CA signed (mutual TLS), or the handshake fails."""
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


# ----------------------------------------------------------------------------------- the record


@dataclass(frozen=True)
class ServerSecurity:
    """The serving port's transport and access control.

    ``credentials`` None is plaintext; ``authenticator`` None lets every caller in unidentified.
    Either is insecure and must be asked for explicitly (``ecgx serve --insecure``).
    ``open_rpcs``: full method names, or service prefixes ending in "/", served without
    credentials (health and reflection for probes). ``mutual_tls``: clients must present a
    certificate. ``watch_interval_s``: how often :meth:`start` checks the access file.
    """

    credentials: grpc.ServerCredentials | None
    authenticator: Authenticator | None
    open_rpcs: tuple[str, ...] = ()
    mutual_tls: bool = False
    server_certificate: str = ""  # describe_certificate of the server's, for the start-up log
    watch_interval_s: float = 2.0

    @property
    def insecure(self) -> bool:
        return self.credentials is None or self.authenticator is None

    @classmethod
    def plaintext_unauthenticated(cls) -> ServerSecurity:
        """No TLS and no authentication: for a trusted loopback only (tests, the demo)."""
        return cls(credentials=None, authenticator=None)

    def describe(self) -> str:
        """One line for the start-up log; what is insecure is said in capitals."""
        if self.credentials is None:
            transport = "PLAINTEXT (no TLS: anyone on the network can read and alter requests)"
        else:
            transport = ("mutual TLS" if self.mutual_tls else "TLS") + (
                f" ({self.server_certificate})" if self.server_certificate else ""
            )
        if self.authenticator is None:
            access = "NO AUTHENTICATION (every caller may call everything)"
        else:
            detail = getattr(self.authenticator, "describe", lambda: "")()
            access = "authenticated callers only" + (f" ({detail})" if detail else "")
            if self.credentials is None:
                access += "; TOKENS TRAVEL IN PLAINTEXT"
        opened = "; health and reflection open without credentials" if self.open_rpcs else ""
        # No "INSECURE" prefix here: ecgx serve's start-up line adds it (and tests match "with PLAINTEXT").
        return f"{transport}, {access}{opened}"

    def start(self) -> None:
        """Start following the access file (reloads without restart); nothing to do without one."""
        watch = getattr(self.authenticator, "start_watching", None)
        if watch is not None:
            watch(self.watch_interval_s)

    def stop(self) -> None:
        """Stop following the access file."""
        stop = getattr(self.authenticator, "stop_watching", None)
        if stop is not None:
            stop()


# ---------------------------------------------------------------------------------- from flags


def load_server_security(
    *,
    tls_cert: str | Path | None = None,
    tls_key: str | Path | None = None,
    tls_client_ca: str | Path | None = None,
    tokens_file: str | Path | None = None,
    tls_crl: str | Path | None = None,
    open_health: bool = False,
    insecure: bool = False,
    env: Mapping[str, str] | None = None,
    watch_interval_s: float = 2.0,
) -> ServerSecurity:
    """The port's security from ``ecgx serve``'s flags, PEM from files or the environment.

    Secure means TLS (``tls_cert`` and ``tls_key``) and a way to identify callers (a client CA
    for mutual TLS and/or an access file of tokens). Anything less raises
    :class:`SecurityConfigError` naming what is missing, unless ``insecure``: then what was given
    is used (plaintext with tokens, TLS without authentication, or neither) and
    :meth:`ServerSecurity.describe` says so in capitals. Mutual TLS without an access file
    admits every certificate the client CA signed with the scopes predict and explain.
    ``tls_crl``: a revocation list of client certificates (mutual TLS only), signed by the client
    CA, followed like the access file.
    """
    cert = read_pem(tls_cert, CERT_ENV, "--tls-cert", env)
    key = read_pem(tls_key, KEY_ENV, "--tls-key", env)
    client_ca = read_pem(tls_client_ca, CLIENT_CA_ENV, "--tls-client-ca", env)
    if (cert is None) != (key is None):
        given, missing = ("--tls-cert", "--tls-key") if cert is not None else ("--tls-key", "--tls-cert")
        raise SecurityConfigError(
            f"{given} is given but {missing} is not: TLS needs both the certificate and its key"
        )
    if client_ca is not None and cert is None:
        raise SecurityConfigError(
            "--tls-client-ca (mutual TLS) needs the server's own certificate and key: "
            "give --tls-cert and --tls-key"
        )
    tls = load_tls(cert, key, client_ca) if cert is not None and key is not None else None
    if tls_crl is not None and client_ca is None:
        raise SecurityConfigError(
            "--tls-crl revokes client certificates: it needs mutual TLS (--tls-client-ca)"
        )
    access = None
    if tokens_file is not None or client_ca is not None:
        access = AccessList(
            tokens_file,
            client_certs=client_ca is not None,
            crl=tls_crl,
            client_ca_pem=tls.client_ca if tls is not None and tls.client_ca else b"",
        )
    if (tls is None or access is None) and not insecure:
        raise SecurityConfigError(_missing(tls is not None, access is not None))
    security = ServerSecurity(
        credentials=server_credentials(tls.cert_chain, tls.key, tls.client_ca) if tls is not None else None,
        authenticator=access,
        open_rpcs=PROBE_RPCS if open_health and access is not None else (),
        mutual_tls=client_ca is not None,
        server_certificate=tls.subject if tls is not None else "",
        watch_interval_s=watch_interval_s,
    )
    return security  # ecgx serve logs describe() at start, loudly when insecure


def _missing(has_tls: bool, has_identity: bool) -> str:
    missing = []
    if not has_tls:
        missing.append(f"TLS (--tls-cert and --tls-key, or {CERT_ENV} and {KEY_ENV})")
    if not has_identity:
        missing.append("a way to identify callers (--tls-client-ca for mutual TLS, and/or --tokens FILE)")
    return (
        f"refusing to serve without {' and '.join(missing)}; on a trusted network only, --insecure serves "
        "without them"
    )


__all__ = [
    "CERT_ENV",
    "CLIENT_CA_ENV",
    "KEY_ENV",
    "Pem",
    "SecurityConfigError",
    "ServerSecurity",
    "TlsMaterial",
    "check_key_type",
    "check_pair",
    "load_certificates",
    "load_server_security",
    "load_tls",
    "load_tls_key",
    "read_pem",
    "read_pem_file",
    "server_credentials",
    "write_dev_certificate",
]
