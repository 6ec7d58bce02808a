"""Who may call what: the access file of hashed bearer tokens and client-certificate names, the
RPC -> scope table, and :class:`AccessList`, the :class:`ecgx.service.calls.Authenticator` built on them.

The access file (TOML, written by ``ecgx token``; docs/security.md)::

    [[token]]
    name = "ward-7-viewer"          # the caller's name in the audit log
    sha256 = "9f86d0...(64 hex)"    # SHA-256 of the token; the token itself is never stored
    scopes = ["predict", "explain"]
    expires = "2027-03-01T00:00:00Z"  # optional: from then on the token is UNAUTHENTICATED

    [[certificate]]
    name = "pacs.hospital.example"  # a SAN (DNS, URI, e-mail) or the subject CN of a client certificate
    scopes = ["predict"]

Scopes: ``predict``, ``explain``, ``admin`` (everything). Every listed caller may also call the
read-only metadata RPCs (the implied scope ``read``). Health and reflection are ``read`` too
unless the server opens them for probes.

Mutual TLS can follow a certificate revocation list (``--tls-crl``): its signature must verify
against the client CA, it is reloaded like the access file, and a client certificate whose serial
it lists is UNAUTHENTICATED (gRPC's TLS has no CRL option, so the check is here, per call).

No PyTorch here (the serving path).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import stat
import tempfile
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from pathlib import Path
from typing import Any

from ecgx.core.config_file import ConfigError, check_keys, parse_toml, read_toml, table_arrays
from ecgx.core.errors import InvalidArgument, PermissionDenied, Unauthenticated
from ecgx.service.calls import Identity

log = logging.getLogger(__name__)


class SecurityConfigError(InvalidArgument):
    """Bad security configuration: TLS material, an access file, a missing piece (one line)."""


# ------------------------------------------------------------------------------------------ scopes

PREDICT, EXPLAIN, ADMIN = "predict", "explain", "admin"
READ = "read"  # implied for every listed caller: the read-only metadata RPCs
GRANTABLE = (PREDICT, EXPLAIN, ADMIN)
# Callers with a verified client certificate when mTLS runs without an access file: the client CA
# is ecgx's own, so what it signed may use the service, but nothing beyond (admin is never implied).
CA_SCOPES = frozenset({PREDICT, EXPLAIN, READ})

_ECGX = "/ecgx.v1.ExplanationService/"
_OIP = "/inference.GRPCInferenceService/"
HEALTH_PREFIX = "/grpc.health.v1.Health/"
REFLECTION_PREFIXES = ("/grpc.reflection.v1alpha.ServerReflection/", "/grpc.reflection.v1.ServerReflection/")
# What ``open_health`` serves without credentials (probes, grpcurl's describe).
PROBE_RPCS = (HEALTH_PREFIX, *REFLECTION_PREFIXES)

# The one table of what each RPC needs: full method names, or service prefixes ending in "/".
# Anything not here needs admin: a new RPC is closed until someone decides who may call it.
RPC_SCOPES: Mapping[str, str] = {
    _ECGX + "Predict": PREDICT,
    _ECGX + "Explain": EXPLAIN,
    _ECGX + "ListModels": READ,
    _ECGX + "GetModel": READ,
    _ECGX + "GetGateReport": READ,
    _OIP + "ModelInfer": PREDICT,  # with the parameter "method" it explains too; see required_scope
    _OIP + "ServerLive": READ,
    _OIP + "ServerReady": READ,
    _OIP + "ModelReady": READ,
    _OIP + "ServerMetadata": READ,
    _OIP + "ModelMetadata": READ,
    HEALTH_PREFIX: READ,
    **dict.fromkeys(REFLECTION_PREFIXES, READ),
}


def required_scope(rpc: str) -> str:
    """The scope ``rpc`` (a full method name) needs: from :data:`RPC_SCOPES`, else admin."""
    if rpc in RPC_SCOPES:
        return RPC_SCOPES[rpc]
    for prefix, scope in RPC_SCOPES.items():
        if prefix.endswith("/") and rpc.startswith(prefix):
            return scope
    return ADMIN


def expand_scopes(granted: Iterable[str]) -> frozenset[str]:
    """What a caller listed with ``granted`` may do: admin implies every scope, everyone reads."""
    scopes = set(granted) | {READ}
    if ADMIN in scopes:
        scopes |= {PREDICT, EXPLAIN}
    return frozenset(scopes)


# ------------------------------------------------------------------------------------------ tokens

TOKEN_PREFIX = "ecgx_"  # lets secret scanners and people recognise a leaked token


def new_token() -> str:
    """A fresh bearer token: 256 random bits, URL-safe, with a recognisable prefix."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    """Hex SHA-256 of a token, as the access file stores it.

    No salt and no slow hash, on purpose: tokens are 256-bit random strings, not passwords a
    person chose, so no dictionary or brute-force search can invert the hash; a salt or key
    stretching would only slow every request down.
    """
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


# ------------------------------------------------------------------------------------- access file

_NAME = re.compile(r"[^\x00-\x1f\x7f]{1,200}")  # printable, no control characters: audit-log safe
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
_KEYS = {
    "token": {"name", "sha256", "scopes", "created", "note", "expires"},
    "certificate": {"name", "scopes", "note"},
}
_HEADER = (
    "# ecgx access list (docs/security.md): bearer tokens, stored as SHA-256 hashes only, and\n"
    "# client-certificate names. Scopes: predict, explain, admin. `ecgx token new|revoke` rewrite\n"
    "# this file in this format; keep remarks in an entry's `note`, not in comments.\n"
)


@dataclass(frozen=True)
class AccessEntry:
    """One caller of the access file: a token (by its hash) or a certificate name."""

    kind: str  # "token" | "certificate"
    name: str
    scopes: tuple[str, ...]  # as written in the file (see :func:`expand_scopes`)
    sha256: str = ""  # tokens only, lower-case hex
    created: str = ""
    note: str = ""
    expires: str = ""  # tokens only: ISO-8601 UTC ("2027-03-01T00:00:00Z"); "" never expires

    def expiry(self) -> datetime | None:
        """When the token stops working (None: never)."""
        return parse_time(self.expires) if self.expires else None


@dataclass(frozen=True)
class AccessFile:
    """The parsed access file: its token and certificate entries."""

    path: Path
    tokens: tuple[AccessEntry, ...] = ()
    certificates: tuple[AccessEntry, ...] = ()

    @property
    def entries(self) -> tuple[AccessEntry, ...]:
        return self.tokens + self.certificates

    def find(self, name: str) -> AccessEntry | None:
        return next((e for e in self.entries if e.name == name), None)


def read_access_file(path: Path | str) -> AccessFile:
    """Parse and check the access file; :class:`SecurityConfigError` names the file, entry and key."""
    path = Path(path)
    hint = f"create it with `ecgx token new --file {path} --name NAME --scope predict`"
    with _as_security_error():
        return _checked(path, read_toml(path, "access file", if_missing=hint))


@contextmanager
def _as_security_error() -> Iterator[None]:
    # The shared loader's errors, as the one error type of every security setting (each names the file).
    try:
        yield
    except ConfigError as e:
        raise SecurityConfigError(str(e)) from None


def _checked(path: Path, data: Mapping[str, Any]) -> AccessFile:
    arrays = table_arrays(data, tuple(_KEYS), f"access file {path}")
    tokens, certificates = (
        tuple(_entry(path, kind, n, item) for n, item in enumerate(arrays[kind], 1))
        for kind in ("token", "certificate")
    )
    _check_unique(path, [*tokens, *certificates])
    return AccessFile(path, tokens, certificates)


def _entry(path: Path, kind: str, n: int, item: Mapping[str, Any]) -> AccessEntry:
    where = f"access file {path}, [[{kind}]] #{n}"
    name = item.get("name")
    if isinstance(name, str) and _NAME.fullmatch(name) and name.strip() == name:
        where += f" ({name})"
    else:
        raise SecurityConfigError(f"{where}: 'name' must be 1-200 printable characters, got {name!r}")
    check_keys(item, _KEYS[kind], where)
    scopes = _scopes(where, item.get("scopes"))
    digest = item.get("sha256", "")
    if kind == "token" and not (isinstance(digest, str) and _HEX64.fullmatch(digest)):
        shown = "missing" if "sha256" not in item else "not 64 hex digits"
        raise SecurityConfigError(
            f"{where}: 'sha256' is {shown}; it is the SHA-256 of the token (`ecgx token new` writes it)"
        )
    extra = {k: item.get(k, "") for k in ("created", "note", "expires") if k in _KEYS[kind]}
    for key, value in extra.items():
        if not isinstance(value, str):
            raise SecurityConfigError(f"{where}: {key!r} must be a string")
    if extra.get("expires"):
        try:
            extra["expires"] = format_time(parse_time(extra["expires"]))
        except ValueError as e:
            raise SecurityConfigError(f"{where}: 'expires' {e}") from None
    return AccessEntry(kind, name, scopes, digest.lower() if kind == "token" else "", **extra)


def _scopes(where: str, scopes: Any) -> tuple[str, ...]:
    if scopes is None:
        raise SecurityConfigError(
            f"{where}: 'scopes' is missing; give a list of {', '.join(GRANTABLE)} ([] for metadata only)"
        )
    if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
        raise SecurityConfigError(f"{where}: 'scopes' must be a list of strings, got {scopes!r}")
    for s in scopes:
        if s not in GRANTABLE:
            raise SecurityConfigError(f"{where}: unknown scope {s!r}; scopes are {', '.join(GRANTABLE)}")
    return tuple(dict.fromkeys(scopes))


def _check_unique(path: Path, entries: Sequence[AccessEntry]) -> None:
    # Names must be unique across the file: the audit log names callers, and must name one entry.
    seen: dict[str, AccessEntry] = {}
    hashes: dict[str, str] = {}
    for e in entries:
        if e.name in seen:
            raise SecurityConfigError(
                f"access file {path}: the name {e.name!r} is given twice; names must be unique"
            )
        seen[e.name] = e
        if e.sha256 and e.sha256 in hashes:
            raise SecurityConfigError(
                f"access file {path}: tokens {hashes[e.sha256]!r} and {e.name!r} have the same hash; "
                "one token must name one caller"
            )
        if e.sha256:
            hashes[e.sha256] = e.name


def check_file_mode(path: Path) -> None:
    """Refuse an access file anyone on the machine may write (they could grant themselves admin);
    warn when others may read it (hashes cannot be inverted, but names and scopes are nobody's business)."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return  # reading it says what is wrong
    if mode & stat.S_IWOTH:
        raise SecurityConfigError(
            f"access file {path} is writable by every user of this machine, who could grant themselves "
            f"access; run `chmod o-w {path}` (0600 is best)"
        )
    if mode & stat.S_IROTH:
        log.warning(
            "access file %s is readable by every user of this machine; `chmod 600 %s` is best", path, path
        )


def write_access_file(access: AccessFile) -> None:
    """Write ``access`` to its path atomically (a temporary file renamed over it), 0600 when new,
    keeping an existing file's permissions. Comments are not kept: the format is fixed."""
    path = access.path
    mode = stat.S_IMODE(path.stat().st_mode) if path.exists() else 0o600
    text = "\n".join([_HEADER] + [_toml_entry(e) for e in access.entries])
    # Read back before writing: what the server would refuse is never written.
    with _as_security_error():
        written = _checked(path, parse_toml(text, f"access file {path}"))
    if written != access:
        raise SecurityConfigError(f"access file {path}: an entry does not survive writing; not written")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _toml_entry(e: AccessEntry) -> str:
    # JSON strings with ASCII escapes are valid TOML basic strings.
    lines = [f"[[{e.kind}]]", f"name = {json.dumps(e.name)}"]
    if e.kind == "token":
        lines.append(f"sha256 = {json.dumps(e.sha256)}")
    lines.append(f"scopes = {json.dumps(list(e.scopes))}")
    if e.created:
        lines.append(f"created = {json.dumps(e.created)}")
    if e.expires:
        lines.append(f"expires = {json.dumps(e.expires)}")
    if e.note:
        lines.append(f"note = {json.dumps(e.note)}")
    return "\n".join(lines) + "\n"


def now_iso() -> str:
    return format_time(datetime.now(UTC))


def format_time(when: datetime) -> str:
    """ISO-8601 UTC to the second, "2027-03-01T00:00:00Z" (the access file's form)."""
    return when.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def parse_time(text: str) -> datetime:
    """An ISO-8601 date ("2027-03-01": its first second, UTC) or date and time (UTC unless it
    names a zone); ValueError says what was expected."""
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise InvalidArgument(
            f"must be an ISO-8601 date or date and time (2027-03-01, 2027-03-01T12:00:00Z), got {text!r}"
        ) from None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


_DURATION = re.compile(r"(\d{1,6})([smhdw])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def expiry_from(text: str, now: datetime | None = None) -> datetime:
    """When a token given ``--expires text`` expires: a duration from ``now`` ("90d", "12h",
    "30m", "2w", "45s") or an ISO date or date and time. In the past is a ValueError."""
    now = now or datetime.now(UTC)
    m = _DURATION.fullmatch(text.strip().lower())
    if m:
        when = now + timedelta(seconds=int(m[1]) * _UNIT_S[m[2]])
    else:
        try:
            when = parse_time(text)
        except ValueError:
            raise InvalidArgument(
                f"--expires must be a duration (90d, 12h, 30m, 2w) or an ISO-8601 date or date and time "
                f"(2027-03-01, 2027-03-01T12:00:00Z), got {text!r}"
            ) from None
    if when <= now:
        raise InvalidArgument(f"--expires {text!r} is in the past ({format_time(when)}); give a later time")
    return when


# ------------------------------------------------------------------------------------ credentials


def bearer_token(headers: Iterable[tuple[str, Any]]) -> str | None:
    """The token of the ``authorization: Bearer <token>`` header among ``(name, value)`` pairs
    (gRPC metadata or HTTP headers); None when there is none. A malformed or repeated header is
    :class:`Unauthenticated` (the token is never echoed)."""
    values = [value for key, value in headers if isinstance(key, str) and key.lower() == "authorization"]
    if not values:
        return None
    if len(values) > 1:
        raise Unauthenticated("more than one authorization header; send one: authorization: Bearer <token>")
    value = values[0] if isinstance(values[0], str) else ""
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("the authorization header must be 'Bearer <token>'")
    return token.strip()


@dataclass(frozen=True)
class CertificateNames:
    """The names a client certificate proves: SANs (DNS, URI, e-mail) then the subject CN; and
    its issuer and serial number, which a revocation list names."""

    names: tuple[str, ...]
    issuer: bytes = b""  # DER of the issuer's name
    serial: int = 0

    @property
    def display(self) -> str:
        return self.names[0] if self.names else "(a certificate without names)"


@lru_cache(maxsize=256)  # a client presents the same certificate on every call
def certificate_names(pem: bytes) -> CertificateNames:
    """The names, issuer and serial of a verified client certificate (PEM)."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    cert = x509.load_pem_x509_certificate(pem)
    names: list[str] = []
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        for kind in (x509.DNSName, x509.UniformResourceIdentifier, x509.RFC822Name):
            names += [str(v) for v in san.get_values_for_type(kind)]
    except x509.ExtensionNotFound:
        pass
    names += [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    return CertificateNames(tuple(dict.fromkeys(names)), cert.issuer.public_bytes(), cert.serial_number)


# ------------------------------------------------------------------------------ revocation list


@dataclass(frozen=True)
class RevocationList:
    """The serial numbers a CRL revokes, under its issuer; checked per call."""

    issuer: bytes  # DER of the CA's name
    serials: frozenset[int]
    next_update: datetime | None = None

    def revokes(self, cert: CertificateNames) -> bool:
        return cert.issuer == self.issuer and cert.serial in self.serials


def read_crl(path: Path, client_ca_pem: bytes, now: datetime | None = None) -> RevocationList:
    """Parse the CRL at ``path`` (PEM or DER) and verify its signature with the client CA that
    issued it; :class:`SecurityConfigError` names the file and what is wrong."""
    from cryptography import x509

    source = f"--tls-crl {path}"
    try:
        data = path.read_bytes()
    except OSError as e:
        raise SecurityConfigError(f"{source}: cannot be read ({(e.strerror or str(e)).lower()})") from None
    try:
        crl = x509.load_pem_x509_crl(data) if b"-----BEGIN" in data else x509.load_der_x509_crl(data)
    except ValueError:
        raise SecurityConfigError(
            f"{source}: is not a certificate revocation list (PEM 'X509 CRL' or DER)"
        ) from None
    cas = x509.load_pem_x509_certificates(client_ca_pem) if client_ca_pem else []
    issuers = [ca for ca in cas if ca.subject == crl.issuer]
    if not issuers:
        raise SecurityConfigError(
            f"{source}: issued by {crl.issuer.rfc4514_string()}, which is not a client CA (--tls-client-ca)"
        )
    if not any(_signed_by(crl, ca) for ca in issuers):
        raise SecurityConfigError(f"{source}: its signature does not verify against the client CA; refused")
    next_update = crl.next_update_utc
    if next_update is not None and next_update < (now or datetime.now(UTC)):
        log.warning("%s: its next update was due %s; publish a fresh CRL", source, format_time(next_update))
    return RevocationList(crl.issuer.public_bytes(), frozenset(r.serial_number for r in crl), next_update)


def _signed_by(crl: Any, ca: Any) -> bool:
    try:
        return bool(crl.is_signature_valid(ca.public_key()))
    except (TypeError, ValueError):  # a key type that cannot sign CRLs
        return False


# ------------------------------------------------------------------------------------ access list


@dataclass(frozen=True)
class _Snapshot:
    """One loaded state of the access list: replaced whole on reload, so readers never see half."""

    access: AccessFile | None
    token_digests: tuple[tuple[bytes, AccessEntry, datetime | None], ...]
    certificates: Mapping[str, AccessEntry]
    signature: tuple[tuple[int, ...], ...] = ()  # (device, inode, size, mtime, ctime) of each file read
    crl: RevocationList | None = None


class AccessList:
    """The :class:`ecgx.service.calls.Authenticator` of ``ecgx serve``: bearer tokens and client
    certificates checked against the access file, scopes from :data:`RPC_SCOPES`.

    Args:
        path: the access file; None for mutual TLS alone (every verified certificate gets
            :data:`CA_SCOPES`).
        client_certs: the port verifies client certificates (mutual TLS), so one names a caller.
        crl: a certificate revocation list for client certificates (reloaded like the file).
        client_ca_pem: the client CA bundle, against which the CRL's signature is verified.

    With both a token and a certificate, the token names the caller: the certificate has already
    admitted the connection, and a token is the finer, revocable grant. A bad token is never
    overlooked in favour of the certificate. A verified certificate that the file does not list
    is known but may do nothing (PERMISSION_DENIED), so the audit log still names it.
    """

    def __init__(
        self,
        path: Path | str | None,
        *,
        client_certs: bool = False,
        crl: Path | str | None = None,
        client_ca_pem: bytes = b"",
    ):
        self.path = Path(path) if path is not None else None
        self.client_certs = client_certs
        self.crl_path = Path(crl) if crl is not None else None
        self.client_ca_pem = client_ca_pem
        if self.crl_path is not None and not client_certs:
            raise SecurityConfigError(
                "--tls-crl revokes client certificates: it needs mutual TLS (--tls-client-ca)"
            )
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._state = self._load()  # at start-up a bad file is an error, not a warning

    # -- loading

    def _files(self) -> tuple[Path, ...]:
        return tuple(p for p in (self.path, self.crl_path) if p is not None)

    def _load(self) -> _Snapshot:
        signature = tuple(_signature(p) for p in self._files())
        crl = read_crl(self.crl_path, self.client_ca_pem) if self.crl_path is not None else None
        if self.path is None:
            return _Snapshot(None, (), {}, signature, crl)
        check_file_mode(self.path)
        access = read_access_file(self.path)
        if access.certificates and not self.client_certs:
            log.warning(
                "access file %s lists %d certificate(s), which have no effect: the port does not ask for "
                "client certificates (give --tls-client-ca for mutual TLS)",
                self.path,
                len(access.certificates),
            )
        digests = tuple((bytes.fromhex(e.sha256), e, e.expiry()) for e in access.tokens)
        return _Snapshot(access, digests, {e.name: e for e in access.certificates}, signature, crl)

    def reload(self) -> bool:
        """Read the access file again. True when the new list is in force; False when it could not
        be read or is invalid: the old list stays (never everybody locked out or let in by a typo)
        and the error is logged."""
        if not self._files():
            return True
        with self._lock:
            try:
                self._state = self._load()
            except SecurityConfigError as e:
                log.error("ACCESS FILE NOT RELOADED, the previous access list stays in force: %s", e)
                return False
        log.warning("access list reloaded: %s", self.describe())
        return True

    def changed(self) -> bool:
        """Whether the access file or the CRL differs (inode, size, mtime or ctime) from the one
        last loaded."""
        return bool(self._files()) and self._signatures() != self._state.signature

    def _signatures(self) -> tuple[tuple[int, ...], ...]:
        return tuple(_signature(p) for p in self._files())

    def start_watching(self, interval_s: float = 2.0) -> None:
        """Reload whenever a file changes, checked every ``interval_s`` seconds (a daemon thread)."""
        if not self._files() or self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._watch, args=(interval_s,), name="ecgx-access-watch", daemon=True
        )
        self._thread.start()

    def stop_watching(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _watch(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            try:
                if self.changed() and not self.reload():
                    # A file that stays bad is logged once, not every interval: remember what was seen.
                    with self._lock:
                        self._state = replace(self._state, signature=self._signatures())
            except Exception:  # the watcher must outlive any surprise, or revocations stop working
                log.exception("access list: checking %s for changes failed", self._files())

    def describe(self) -> str:
        state = self._state
        parts = []
        if state.access is not None:
            parts.append(
                f"access file {self.path}: {len(state.access.tokens)} token(s), "
                f"{len(state.access.certificates)} certificate(s)"
            )
        if self.client_certs and state.access is None:
            parts.append("every client certificate the client CA signed may predict and explain")
        if state.crl is not None:
            parts.append(f"CRL {self.crl_path}: {len(state.crl.serials)} revoked certificate(s)")
        return "; ".join(parts) or "no callers"

    # -- the Authenticator protocol

    def identify(self, headers: Iterable[tuple[str, Any]], peer_cert_pem: bytes | None = None) -> Identity:
        """The caller: by bearer token if one is sent, else by the verified client certificate
        (PEM). A revoked certificate is refused even with a good token: it admitted the connection."""
        state = self._state
        cert = certificate_names(peer_cert_pem) if self.client_certs and peer_cert_pem else None
        if cert is not None and state.crl is not None and state.crl.revokes(cert):
            raise Unauthenticated("the client certificate has been revoked")
        token = bearer_token(headers)
        if token is not None:
            return self._token_identity(state, token)
        if cert is not None:
            return _certificate_identity(state, cert)
        raise Unauthenticated(
            "no credentials: send a bearer token (authorization: Bearer <token>)"
            + (" or a client certificate" if self.client_certs else "")
        )

    def _token_identity(self, state: _Snapshot, token: str) -> Identity:
        if state.access is None:
            raise Unauthenticated("this server takes no bearer tokens (mutual TLS only); send no token")
        digest = hashlib.sha256(token.encode("utf-8")).digest()
        found = None
        # Every entry is compared, in constant time each, with no early exit: the response time
        # tells nothing about which hash (or how much of it) matched.
        expires = None
        for expected, entry, expiry in state.token_digests:
            if hmac.compare_digest(digest, expected) and found is None:
                found, expires = entry, expiry
        if found is None:
            raise Unauthenticated("the bearer token is not valid (unknown or revoked)")
        if expires is not None and datetime.now(UTC) >= expires:
            # Says that it expired (the holder needs a new one), not whose it was or when.
            raise Unauthenticated("the bearer token has expired; ask for a new one")
        return Identity(found.name, "token", expand_scopes(found.scopes))

    def authorize(self, identity: Identity, rpc: str) -> None:
        """PERMISSION_DENIED unless ``identity`` holds the scope :func:`required_scope` names."""
        need = required_scope(rpc)
        if need in identity.scopes:
            return
        method = rpc.rsplit("/", 1)[-1]
        if not identity.scopes:
            raise PermissionDenied(
                f"client certificate {identity.name!r} is valid but not in the access list, so it may call "
                f"nothing; ask the administrator to add a [[certificate]] entry for it"
            )
        granted = ", ".join(sorted(identity.scopes - {READ})) or "none"
        raise PermissionDenied(
            f"{identity.name!r} may not call {method}: it needs the scope {need!r} (granted: {granted})"
        )


def require_scope(identity: Identity | None, scope: str, what: str) -> None:
    """For a handler whose request decides the scope (OIP ModelInfer with a ``method`` explains):
    PERMISSION_DENIED unless ``identity`` holds ``scope``. None (no authentication) passes."""
    if identity is not None and identity.via != "none" and scope not in identity.scopes:
        raise PermissionDenied(f"{identity.name!r} may not {what}: it needs the scope {scope!r}")


def _certificate_identity(state: _Snapshot, cert: CertificateNames) -> Identity:
    if state.access is None:  # mutual TLS without an access file
        return Identity(cert.display, "certificate", CA_SCOPES)
    for name in cert.names:  # SANs first, then the CN: the first listed name wins
        entry = state.certificates.get(name)
        if entry is not None:
            return Identity(entry.name, "certificate", expand_scopes(entry.scopes))
    return Identity(cert.display, "certificate", frozenset())  # known, but granted nothing


def _signature(path: Path) -> tuple[int, ...]:
    try:
        st = path.stat()
    except OSError:
        return ()
    # ctime too: an edit that keeps size and mtime (touch -r, a fast same-size rewrite) changes it.
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


__all__ = [
    "ADMIN",
    "CA_SCOPES",
    "EXPLAIN",
    "GRANTABLE",
    "PREDICT",
    "PROBE_RPCS",
    "READ",
    "RPC_SCOPES",
    "AccessEntry",
    "AccessFile",
    "AccessList",
    "CertificateNames",
    "RevocationList",
    "SecurityConfigError",
    "bearer_token",
    "certificate_names",
    "expand_scopes",
    "expiry_from",
    "format_time",
    "new_token",
    "parse_time",
    "read_access_file",
    "read_crl",
    "require_scope",
    "required_scope",
    "token_hash",
    "write_access_file",
]
