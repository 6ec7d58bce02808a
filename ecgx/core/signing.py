"""Gate reports as the serving path reads them: key loading, canonical bytes, signature
verification, report reading, and verification of a gated package against its report.

A gate report certifies that a package passed (or failed) validation. The signature covers the
whole report (canonical JSON without the signature), so no verdict or score can be edited; the
report holds the SHA-256 of every package file, so no file can change after gating without
verification failing.

Keys are PEM files (PKCS8 private, SubjectPublicKeyInfo public), given as a file or as the PEM
text in an environment variable (for CI secrets). Writing keys and signing reports are the gate's
(:mod:`ecgx.validation.signing`); everything here is what a server or a verifier needs, so it
sits in the core, below both.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ecgx.core.errors import InvalidArgument
from ecgx.core.package_reader import MANIFEST_FILE, PackageError, hash_package_file, is_plain_name

SIGNING_KEY_ENV = "ECGX_GATE_SIGNING_KEY"
ALLOWED_POLICIES_ENV = (
    "ECGX_ALLOWED_POLICIES"  # SHA-256 hashes of accepted policies, space or comma separated
)
PUBLIC_KEY_ENV = "ECGX_GATE_PUBLIC_KEY"
PRIVATE_KEY_FILE = "gate_signing_key.pem"
PUBLIC_KEY_FILE = "gate_public_key.pem"
GATE_REPORT_FILE = "gate.json"
ALGORITHM = "Ed25519"
REPORT_SCHEMA = "ecgx-gate-report"
SUPPORTED_SCHEMA_VERSIONS = (1, 2)  # 2: see ecgx.validation.gate.SCHEMA_VERSION

_KEYGEN_HINT = "create a key pair with `ecgx gate keygen --out DIR`"
_REGATE_HINT = "gate the package again (`ecgx validate`) to get a new signed report"


class SigningError(InvalidArgument):
    """A missing or bad key, a malformed or unsigned report, or a signature that does not verify."""


# ---------------------------------------------------------------------------------------------- keys


def load_private_key(
    path: Path | str | None = None, env: Mapping[str, str] | None = None
) -> Ed25519PrivateKey:
    """The signing key from the PEM file ``path``, else from the PEM text in the environment
    variable ``ECGX_GATE_SIGNING_KEY`` (``env`` defaults to ``os.environ``)."""
    pem, source = _pem_from(path, env, SIGNING_KEY_ENV, "signing key", "--signing-key FILE")
    if b"PUBLIC KEY" in pem and b"PRIVATE KEY" not in pem:
        raise SigningError(f"{source} holds a public key; signing needs the private key ({PRIVATE_KEY_FILE})")
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except TypeError:  # cryptography's way of saying "encrypted, and no password given"
        raise SigningError(
            f"{source} holds an encrypted private key; gate signing keys must be unencrypted PKCS8 PEM "
            f"(protect the file with permissions or a CI secret instead); {_KEYGEN_HINT}"
        ) from None
    except ValueError:
        # cryptography's message is not shown: it is generic, and nothing derived from the key belongs here.
        raise SigningError(
            f"{source} is not a readable PEM private key (bad base64, framing or key encoding); "
            f"{_KEYGEN_HINT}"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningError(
            f"{source} holds a private key of type {_kind(key)}, not Ed25519: gate reports are signed "
            f"with Ed25519 keys; {_KEYGEN_HINT}"
        )
    return key


def load_public_key(path: Path | str | None = None, env: Mapping[str, str] | None = None) -> Ed25519PublicKey:
    """The verification key from the PEM file ``path``, else from the PEM text in the environment
    variable ``ECGX_GATE_PUBLIC_KEY`` (``env`` defaults to ``os.environ``). Private keys are refused."""
    pem, source = _pem_from(path, env, PUBLIC_KEY_ENV, "public key", "--public-key FILE")
    if b"PRIVATE KEY" in pem:
        # Accepting it would work, but it would teach verifiers to hold the secret that forges reports.
        raise SigningError(
            f"{source} holds a private key; verification needs the public key ({PUBLIC_KEY_FILE}). "
            "Give that instead, and keep the private key only where reports are signed"
        )
    if b"-----BEGIN CERTIFICATE-----" in pem:
        # A TLS certificate is a different thing: gate reports are checked against the bare key.
        raise SigningError(
            f"{source} holds an X.509 certificate, not a public key; give the {PUBLIC_KEY_FILE} written by "
            "`ecgx gate keygen`"
        )
    try:
        key = serialization.load_pem_public_key(pem)
    except ValueError:
        raise SigningError(
            f"{source} is not a readable PEM public key (bad base64, framing or key encoding); "
            f"give the {PUBLIC_KEY_FILE} written by `ecgx gate keygen`"
        ) from None
    if not isinstance(key, Ed25519PublicKey):
        raise SigningError(
            f"{source} holds a public key of type {_kind(key)}, not Ed25519: gate reports are signed "
            f"with Ed25519 keys; give the {PUBLIC_KEY_FILE} written by `ecgx gate keygen`"
        )
    return key


def _pem_from(
    path: Path | str | None, env: Mapping[str, str] | None, var: str, what: str, option: str
) -> tuple[bytes, str]:
    """The PEM bytes and a description of where they came from (for messages; never the bytes)."""
    if path is not None:
        path = Path(path)
        source = f"{what} file {path}"
        if not path.is_file():
            reason = "is a folder, not a file" if path.is_dir() else "does not exist"
            raise SigningError(f"{source} {reason}")
        try:
            pem = path.read_bytes()
        except OSError as e:
            raise SigningError(f"{source} cannot be read: {e.strerror}") from None
    else:
        text = (os.environ if env is None else env).get(var, "")
        if not text.strip():
            raise SigningError(
                f"no {what} given: pass {option} or set the environment variable {var} to the PEM text "
                f"of the key ({_KEYGEN_HINT})"
            )
        pem, source = text.encode(), f"environment variable {var}"
    if b"-----BEGIN" not in pem:
        raise SigningError(f"{source} {_not_pem(pem, path is None, option)}; {_KEYGEN_HINT}")
    return pem, source


def _not_pem(data: bytes, from_env: bool, option: str) -> str:
    """Why ``data`` is no PEM key, with the likely mistake named."""
    if from_env:  # the usual mistake: the variable holds a path to the key instead of the key itself
        return (
            f"holds no PEM text (it must hold the key itself, not a path to it: to use a file, pass {option})"
        )
    if not data.strip():
        return "holds no PEM text (it is empty)"
    if data.startswith(b"ssh-"):
        return "holds no PEM text (it is an OpenSSH key; gate keys are PEM, from `ecgx gate keygen`)"
    if data[:1] == b"\x30":  # an ASN.1 SEQUENCE
        return "holds no PEM text (it is binary DER; convert it with `openssl pkey -inform der`)"
    return "holds no PEM text"


def _kind(key: object) -> str:
    # e.g. RSAPrivateKey -> "RSA"; names the key type without anything from the key itself.
    name = type(key).__name__
    for suffix in ("PrivateKey", "PublicKey"):
        name = name.removesuffix(suffix)
    return name.lstrip("_") or "non-Ed25519"


def key_id(public_key: Ed25519PublicKey) -> str:
    """Hex SHA-256 of the raw 32-byte public key: names the key in a report without holding it."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


# ------------------------------------------------------------------------------------------ signatures


def canonical_bytes(report: Mapping[str, Any]) -> bytes:
    """What the signature covers: the report without ``signature``, as canonical JSON
    (sorted keys, no whitespace, ASCII). NaN, infinities, non-string keys and values that are
    not JSON raise :class:`SigningError`: they would not survive a round trip through the file."""
    body = {k: v for k, v in report.items() if k != "signature"}
    _check_json(body, "report", set())
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return text.encode()


def _check_json(value: Any, where: str, parents: set[int]) -> None:
    """Raise :class:`SigningError` naming the first place where ``value`` is not plain, finite JSON."""
    if value is None or isinstance(value, (str, bool, int)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise SigningError(f"{where} is {value} (NaN or infinite); reports must use null instead")
        return
    if not isinstance(value, (dict, list, tuple)):
        raise SigningError(
            f"{where} is a {type(value).__name__}, not a JSON value; convert it (e.g. float(), str()) "
            "before signing"
        )
    if id(value) in parents:
        raise SigningError(f"{where} contains itself; a report must be a tree")
    parents.add(id(value))
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                # JSON turns it into a string, which sorts differently: the signature would break on reload.
                raise SigningError(f"{where} has the non-string key {k!r}; report keys must be strings")
            _check_json(v, f"{where}[{k!r}]", parents)
    else:
        for i, v in enumerate(value):
            _check_json(v, f"{where}[{i}]", parents)
    parents.discard(id(value))


def verify_signature(report: Mapping[str, Any], public_key: Ed25519PublicKey) -> None:
    """Raise :class:`SigningError` unless ``report`` carries a valid Ed25519 signature by ``public_key``."""
    sig = report.get("signature")
    if sig is None:
        raise SigningError(
            f"the report is not signed; sign it when gating (`ecgx validate --signing-key FILE`, or set "
            f"{SIGNING_KEY_ENV}) rather than with --unsigned"
        )
    if not isinstance(sig, Mapping) or not all(isinstance(sig.get(k), str) for k in ("key_id", "value")):
        raise SigningError(
            f"the report's signature is malformed (it must be an object with algorithm, key_id and value); "
            f"{_REGATE_HINT}"
        )
    if sig.get("algorithm") != ALGORITHM:
        raise SigningError(
            f"the report is signed with {sig.get('algorithm')!r}; only {ALGORITHM} is accepted"
        )
    expected = key_id(public_key)
    if sig["key_id"] != expected:
        raise SigningError(
            f"the report was signed by another key (key id {sig['key_id'][:12]}) than the public key given "
            f"(key id {expected[:12]}); verify with the public key of the key pair that signed it"
        )
    try:
        value = base64.b64decode(sig["value"], validate=True)
    except (binascii.Error, ValueError):
        raise SigningError(f"the report's signature value is not valid base64; {_REGATE_HINT}") from None
    try:
        public_key.verify(value, canonical_bytes(report))
    except InvalidSignature:
        raise SigningError(
            f"the signature does not verify: the report was modified after signing, or its signature "
            f"was altered; {_REGATE_HINT}"
        ) from None


# -------------------------------------------------------------------------------------- verification


@dataclass(frozen=True)
class GateVerification:
    """Outcome of :func:`verify_gate`: ``ok`` when the report is authentic, every file unchanged
    and (when an allow-list was given) its policy allowed.

    ``verdict`` is the report's own verdict ("pass" or "fail"), whether or not it verified;
    ``research`` whether it is a research report (``ecgx validate --research``, never servable).
    """

    report_path: Path
    package_path: Path
    verdict: str | None
    problems: tuple[str, ...]
    research: bool = False

    @property
    def servable(self) -> bool:
        """Verified, passed and not a research report: what ``ecgx gate verify`` exits 0 for."""
        return self.ok and self.verdict == "pass" and not self.research

    @property
    def ok(self) -> bool:
        """True when no problem was found (a "fail" verdict is not a problem)."""
        return not self.problems


def read_report(report_path: Path | str) -> dict[str, Any]:
    """The JSON object in ``report_path``; :class:`SigningError` if missing, unreadable or not an object."""
    report_path = Path(report_path)
    if not report_path.is_file():
        reason = "is a folder, not a file" if report_path.is_dir() else "does not exist"
        raise SigningError(f"gate report {report_path} {reason}; gate the package with `ecgx validate`")
    try:
        report = json.loads(report_path.read_text(encoding="utf-8"))
    except OSError as e:
        raise SigningError(f"gate report {report_path} cannot be read: {e.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SigningError(f"gate report {report_path} is not valid JSON: {e}") from None
    if not isinstance(report, dict):
        raise SigningError(f"gate report {report_path} is not a JSON object")
    return report


def verify_gate(
    package_dir: Path | str,
    public_key: Ed25519PublicKey,
    report_path: Path | str | None = None,
    allowed_policies: Collection[str] | None = None,
) -> GateVerification:
    """Check a package against its gate report (default ``package_dir/gate.json``): the signature,
    the report schema, and the SHA-256 of every package file, with no file added since gating.

    Every entry of the package folder must be a regular file the report lists (symbolic links
    and folders never are), except ``gate.json`` and the report itself; listed files are
    plain names in the folder, read without following links.

    A missing or non-JSON report raises :class:`SigningError`; everything else is collected into
    ``problems``, all of them rather than the first. A report whose verdict is "fail" still
    verifies: verification is about authenticity and integrity; what the verdict means is the
    caller's decision (:attr:`GateVerification.servable` is the usual one).

    ``allowed_policies`` (SHA-256 hashes, see :func:`ecgx.validation.signing.allowed_policy_hashes`):
    the report's ``policy.sha256`` must be one of them; None checks no policy.
    """
    package_dir = Path(package_dir)
    report_path = Path(report_path) if report_path is not None else package_dir / GATE_REPORT_FILE
    report = read_report(report_path)
    problems: list[str] = []
    try:
        verify_signature(report, public_key)
    except SigningError as e:
        problems.append(str(e))
    problems += _schema_problems(report)
    if package_dir.is_dir():
        problems += _file_problems(package_dir, report, report_path)
    else:
        problems.append(f"package folder {package_dir} does not exist")
    if allowed_policies is not None:
        problems += _policy_problems(report, allowed_policies)
    verdict = report.get("verdict")
    research = report.get("research", False) is not False
    return GateVerification(
        report_path, package_dir, verdict if isinstance(verdict, str) else None, tuple(problems), research
    )


def _policy_problems(report: Mapping[str, Any], allowed: Collection[str]) -> list[str]:
    policy = report.get("policy")
    digest = policy.get("sha256") if isinstance(policy, Mapping) else None
    if isinstance(digest, str) and digest.lower() in allowed:
        return []
    source = policy.get("source") if isinstance(policy, Mapping) else None
    return [
        f"the report's policy ({source or 'unnamed'}, sha256 {digest}) is not on the allow-list of "
        f"{len(allowed)} policy hash(es); accept it with --allowed-policy {digest} (or --allowed-policies "
        f"FILE, or {ALLOWED_POLICIES_ENV}), or gate the package under an allowed policy"
    ]


def _schema_problems(report: Mapping[str, Any]) -> list[str]:
    if report.get("schema") != REPORT_SCHEMA:
        return [f"not a gate report: its schema is {report.get('schema')!r}, not {REPORT_SCHEMA!r}"]
    if report.get("schema_version") not in SUPPORTED_SCHEMA_VERSIONS:
        return [
            f"gate report schema version {report.get('schema_version')!r} is not supported "
            f"(this ecgx reads {list(SUPPORTED_SCHEMA_VERSIONS)}); verify it with the ecgx that wrote it"
        ]
    return []


def _file_problems(package_dir: Path, report: Mapping[str, Any], report_path: Path) -> list[str]:
    """Files of the report that are missing, changed or not regular files; entries of the folder
    the report does not list; and files of the manifest the report lacks."""
    package = report.get("package")
    files = package.get("files") if isinstance(package, Mapping) else None
    if not isinstance(files, Mapping) or not files:
        return ["the report records no package files (package.files), so it certifies nothing"]
    problems = []
    for name, digest in files.items():
        if not is_plain_name(name):
            # Never hash a path the report points outside the package (an edited report could name any file).
            problems.append(f"the report lists {name!r}, which is not a file inside the package")
            continue
        path = package_dir / name
        if path.is_symlink():
            problems.append(f"{name} is a symbolic link; package files must be regular files in the package")
            continue
        if not path.exists():
            problems.append(f"{name} is missing from {package_dir}")
            continue
        try:
            actual = hash_package_file(package_dir, name)  # never follows a link, regular files only
        except PackageError as e:
            problems.append(str(e))
            continue
        if actual != digest:
            problems.append(f"{name} changed after gating (SHA-256 {actual[:12]} != {str(digest)[:12]})")
    if MANIFEST_FILE not in files:
        problems.append(f"the report does not record the SHA-256 of {MANIFEST_FILE}; {_REGATE_HINT}")
    added = _unlisted_entries(package_dir, files, report_path)
    problems += [f"{name} was added to the package after gating ({kind})" for name, kind in added.items()]
    listed, manifest_problem = _manifest_files(package_dir, missing_reported=MANIFEST_FILE in files)
    if manifest_problem:
        return [*problems, manifest_problem]
    problems += [
        f"{name} was added to the package after gating (listed in {MANIFEST_FILE})"
        for name in listed
        if name not in files and name not in added
    ]
    return problems


def _unlisted_entries(package_dir: Path, files: Mapping[str, Any], report_path: Path) -> dict[str, str]:
    """Name -> kind of every entry of the package folder that the report does not list, other
    than the gate report (``gate.json``, and the report verified when it lies in the folder) and
    the manifest (a report that does not list it is a problem of its own)."""
    exempt = {GATE_REPORT_FILE, MANIFEST_FILE}
    try:
        if report_path.resolve().parent == package_dir.resolve():
            exempt.add(report_path.name)
    except OSError:
        pass
    added = {}
    with os.scandir(package_dir) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            if entry.name in exempt or entry.name in files:  # listed files are checked by name
                continue
            if entry.is_symlink():
                added[entry.name] = "a symbolic link"
            elif entry.is_dir(follow_symlinks=False):
                added[entry.name] = "a folder"
            else:
                added[entry.name] = "a file the report does not list"
    return added


def _manifest_files(package_dir: Path, missing_reported: bool) -> tuple[list[str], str | None]:
    """The names in the current manifest's "files" table, or a problem saying why there are none."""
    path = package_dir / MANIFEST_FILE
    if path.is_symlink():
        return [], None  # never read through a link; the file check names it
    if not path.is_file():
        # Said once: the report's own file check already names the manifest as missing.
        return [], None if missing_reported else f"{MANIFEST_FILE} is missing from {package_dir}"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        return [], f"{MANIFEST_FILE} cannot be read ({e.strerror})"
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return [], f"{MANIFEST_FILE} is not valid JSON ({e}), so the package cannot be loaded"
    listed = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(listed, dict):
        return [], f'{MANIFEST_FILE} has no "files" table, so the package cannot be loaded'
    return list(listed), None
