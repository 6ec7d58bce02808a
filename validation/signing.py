"""Ed25519 signatures of gate reports, and verification of a gated package.

A gate report certifies that a package passed (or failed) validation. The
signature covers the whole report (canonical JSON without the signature), so
no verdict or score can be edited; the report holds the SHA-256 of every package
file, so no file can change after gating without verification failing.

Keys are PEM files (PKCS8 private, SubjectPublicKeyInfo public), given as a file
or as the PEM text in an environment variable (for CI secrets).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from service.package import MANIFEST_FILE, sha256_file

SIGNING_KEY_ENV = "ECGX_GATE_SIGNING_KEY"
PUBLIC_KEY_ENV = "ECGX_GATE_PUBLIC_KEY"
PRIVATE_KEY_FILE = "gate_signing_key.pem"
PUBLIC_KEY_FILE = "gate_public_key.pem"
GATE_REPORT_FILE = "gate.json"
ALGORITHM = "Ed25519"
REPORT_SCHEMA = "ecgx-gate-report"
SUPPORTED_SCHEMA_VERSIONS = (1,)


class SigningError(ValueError):
    """A missing or bad key, a malformed or unsigned report, or a signature that does not verify."""


def generate_keypair(out_dir: Path | str, overwrite: bool = False) -> tuple[Path, Path]:
    """Write a new key pair to ``out_dir``; the private key is readable by its owner only."""
    out_dir = Path(out_dir)
    private_path, public_path = out_dir / PRIVATE_KEY_FILE, out_dir / PUBLIC_KEY_FILE
    existing = [p for p in (private_path, public_path) if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]} exists; pass --overwrite to replace the key pair")
    out_dir.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    # Created with 0600 from the start: the key is never readable by others, not even briefly.
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private_pem)
    os.chmod(private_path, 0o600)
    public_path.write_bytes(public_pem)
    return private_path, public_path


def _pem_from(
    path: Path | str | None, env: Mapping[str, str] | None, var: str, what: str
) -> tuple[bytes, str]:
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise SigningError(f"{what} file {path} does not exist")
        return path.read_bytes(), f"file {path}"
    env = os.environ if env is None else env
    text = env.get(var)
    if not text:
        option = "--signing-key FILE" if var == SIGNING_KEY_ENV else "--public-key FILE"
        raise SigningError(
            f"no {what} given: pass {option} or set the environment variable {var} to the PEM text "
            f"(create a key pair with `ecgx gate keygen --out DIR`)"
        )
    return text.encode(), f"environment variable {var}"


def load_private_key(
    path: Path | str | None = None, env: Mapping[str, str] | None = None
) -> Ed25519PrivateKey:
    """The signing key from ``path``, else from the environment variable ``ECGX_GATE_SIGNING_KEY``."""
    pem, source = _pem_from(path, env, SIGNING_KEY_ENV, "signing key")
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as e:
        raise SigningError(f"{source} does not hold an unencrypted PEM private key ({_reason(e)})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningError(f"{source} holds a {type(key).__name__}, not an Ed25519 private key")
    return key


def load_public_key(path: Path | str | None = None, env: Mapping[str, str] | None = None) -> Ed25519PublicKey:
    """The verification key from ``path``, else from the environment variable ``ECGX_GATE_PUBLIC_KEY``."""
    pem, source = _pem_from(path, env, PUBLIC_KEY_ENV, "public key")
    if b"PRIVATE KEY" in pem:
        raise SigningError(
            f"{source} holds a private key; verification needs the public key (keep the other secret)"
        )
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError) as e:
        raise SigningError(f"{source} does not hold a PEM public key ({_reason(e)})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SigningError(f"{source} holds a {type(key).__name__}, not an Ed25519 public key")
    return key


def _reason(e: Exception) -> str:
    # cryptography's messages describe the format problem; they never contain key bytes.
    return str(e).split("\n")[0][:120] or type(e).__name__


def key_id(public_key: Ed25519PublicKey) -> str:
    """Hex SHA-256 of the raw 32-byte public key."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def canonical_bytes(report: Mapping[str, Any]) -> bytes:
    """What the signature covers: the report without ``signature``, as canonical JSON."""
    body = {k: v for k, v in report.items() if k != "signature"}
    try:
        text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    except ValueError:
        raise SigningError("the report holds NaN or infinite numbers; reports must use null") from None
    return text.encode()


def sign_report(report: Mapping[str, Any], private_key: Ed25519PrivateKey) -> dict[str, Any]:
    """A copy of ``report`` with an Ed25519 ``signature`` over its canonical bytes."""
    value = private_key.sign(canonical_bytes(report))
    signed = {k: v for k, v in report.items() if k != "signature"}
    signed["signature"] = {
        "algorithm": ALGORITHM,
        "key_id": key_id(private_key.public_key()),
        "value": base64.b64encode(value).decode(),
    }
    return signed


def verify_signature(report: Mapping[str, Any], public_key: Ed25519PublicKey) -> None:
    """Raise :class:`SigningError` unless ``report`` carries a valid signature by ``public_key``."""
    sig = report.get("signature")
    if not isinstance(sig, Mapping):
        raise SigningError("the report is not signed")
    if sig.get("algorithm") != ALGORITHM:
        raise SigningError(
            f"the report is signed with {sig.get('algorithm')!r}; only {ALGORITHM} is accepted"
        )
    if sig.get("key_id") != key_id(public_key):
        raise SigningError("the report was signed by another key than the public key given")
    try:
        public_key.verify(base64.b64decode(sig.get("value", ""), validate=True), canonical_bytes(report))
    except (InvalidSignature, ValueError, TypeError):
        raise SigningError("the signature does not match: the report was modified after signing") from None


@dataclass(frozen=True)
class GateVerification:
    """Outcome of :func:`verify_gate`: ``ok`` when the report is authentic and every file unchanged."""

    report_path: Path
    package_path: Path
    verdict: str | None
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems


def read_report(report_path: Path | str) -> dict[str, Any]:
    report_path = Path(report_path)
    if not report_path.is_file():
        raise SigningError(f"gate report {report_path} does not exist; gate the package with `ecgx validate`")
    try:
        report = json.loads(report_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SigningError(f"gate report {report_path} is not valid JSON: {e}") from None
    if not isinstance(report, dict):
        raise SigningError(f"gate report {report_path} is not a JSON object")
    return report


def verify_gate(
    package_dir: Path | str, public_key: Ed25519PublicKey, report_path: Path | str | None = None
) -> GateVerification:
    """Check a package against its gate report: signature, schema, and every file's SHA-256.

    All problems are collected, not just the first. A report whose verdict is "fail"
    still verifies: verification is about authenticity and integrity; what a failed
    verdict means is the caller's decision.
    """
    package_dir = Path(package_dir)
    report_path = Path(report_path) if report_path is not None else package_dir / GATE_REPORT_FILE
    report = read_report(report_path)
    problems: list[str] = []
    try:
        verify_signature(report, public_key)
    except SigningError as e:
        problems.append(str(e))
    if report.get("schema") != REPORT_SCHEMA or report.get("schema_version") not in SUPPORTED_SCHEMA_VERSIONS:
        problems.append(
            f"not a gate report of a supported schema ({report.get('schema')!r} "
            f"version {report.get('schema_version')!r}; "
            f"this ecgx reads {REPORT_SCHEMA} {list(SUPPORTED_SCHEMA_VERSIONS)})"
        )
    problems += _file_problems(package_dir, report)
    verdict = report.get("verdict")
    return GateVerification(
        report_path, package_dir, verdict if isinstance(verdict, str) else None, tuple(problems)
    )


def _file_problems(package_dir: Path, report: Mapping[str, Any]) -> list[str]:
    package = report.get("package")
    files = package.get("files") if isinstance(package, Mapping) else None
    if not isinstance(files, Mapping) or not files:
        return ["the report lists no package files"]
    problems = []
    for name, digest in files.items():
        path = package_dir / name
        if not path.is_file():
            problems.append(f"{name} is missing from {package_dir}")
            continue
        actual = sha256_file(path)
        if actual != digest:
            problems.append(f"{name} changed after gating (SHA-256 {actual[:12]} != {str(digest)[:12]})")
    try:
        manifest = json.loads((package_dir / MANIFEST_FILE).read_text())
        listed = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [*problems, f"{MANIFEST_FILE} cannot be read: {e}"]
    problems += [f"{name} was added to the package after gating" for name in listed if name not in files]
    return problems
